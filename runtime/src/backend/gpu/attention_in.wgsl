// Inputs of `attention.wgsl` as the graph's Attention node has them: the chunk's queries [1, H, T, D]
// and new K/V rows [1, KVH, T, D], head-major, ready to use. (`q_scale`/`nk_scale` and the `qs`/`ks`
// arguments are the other inputs' head norms: none here.)
fn q_scale(h: u32, t: u32) -> f32 { return 1.0; }
fn nk_scale(g: u32, r: u32) -> f32 { return 1.0; }
fn q_in(h: u32, t: u32, i: u32, qs: f32) -> f32 { return Q[(h * pu(2u) + t) * pu(3u) + i]; }
fn nk_in(g: u32, r: u32, i: u32, ks: f32) -> f32 { return NK[(g * pu(2u) + r) * pu(3u) + i]; }
fn nv_in(g: u32, r: u32, i: u32) -> f32 { return NV[(g * pu(2u) + r) * pu(3u) + i]; }
fn nk4_in(g: u32, r: u32, i: u32, ks: f32) -> vec4<f32> {
    let e = (g * pu(2u) + r) * pu(3u) + i;
    return vec4<f32>(NK[e], NK[e + 1u], NK[e + 2u], NK[e + 3u]);
}
fn nv4_in(g: u32, r: u32, i: u32) -> vec4<f32> {
    let e = (g * pu(2u) + r) * pu(3u) + i;
    return vec4<f32>(NV[e], NV[e + 1u], NV[e + 2u], NV[e + 3u]);
}
