// Inputs of `attention.wgsl` straight from the q/k/v projections: queries [T, H, D] and new K/V rows
// [T, KVH, D], token-major (the graph's Transposes absorbed); queries and keys rotated here as the graph's
// RotaryEmbedding does (same arithmetic as `rope.wgsl`: full rotary, INTERLEAVED pairs or halves, the
// position ids as i64 low words, cos/sin [positions, D/2]), and with an f16 cache (F16C) the new rows
// rounded through f16 as the graph's Cast pair does. Bindings 8-10: COS, SIN, POS.
override INTERLEAVED: bool = false;

@group(0) @binding(8) var<storage, read> COS: array<f32>;
@group(0) @binding(9) var<storage, read> SIN: array<f32>;
@group(0) @binding(10) var<storage, read> POS: array<u32>;

// (index of a, index of b, cos/sin column, whether element i is the first of its pair).
fn rope_pair(i: u32) -> vec4<u32> {
    let half = pu(3u) / 2u;
    if (INTERLEAVED) { return vec4<u32>(i & ~1u, (i & ~1u) + 1u, i / 2u, u32((i & 1u) == 0u)); }
    let j = i % half;
    return vec4<u32>(j, j + half, j, u32(i < half));
}

fn rope_cs(t: u32, j: u32) -> vec2<f32> {
    let at = POS[2u * t] * (pu(3u) / 2u) + j;
    return vec2<f32>(COS[at], SIN[at]);
}

fn round_f16(x: f32) -> f32 {
    if (F16C) { return f16_at(pack_f16(x, 0.0), false); }
    return x;
}

// Element i of the rotated head at `base` of token t's row (in Q when `is_q`, else NK).
fn rotated(is_q: bool, base: u32, t: u32, i: u32) -> f32 {
    let p = rope_pair(i);
    let cs = rope_cs(t, p.z);
    var a: f32;
    var b: f32;
    if (is_q) {
        a = Q[base + p.x];
        b = Q[base + p.y];
    } else {
        a = NK[base + p.x];
        b = NK[base + p.y];
    }
    return select(b * cs.x + a * cs.y, a * cs.x - b * cs.y, p.w == 1u);
}

fn q_in(h: u32, t: u32, i: u32) -> f32 { return rotated(true, (t * pu(0u) + h) * pu(3u), t, i); }

fn nk_in(g: u32, r: u32, i: u32) -> f32 {
    return round_f16(rotated(false, (r * pu(1u) + g) * pu(3u), r, i));
}

fn nv_in(g: u32, r: u32, i: u32) -> f32 { return round_f16(NV[(r * pu(1u) + g) * pu(3u) + i]); }

fn nk4_in(g: u32, r: u32, i: u32) -> vec4<f32> {
    return vec4<f32>(nk_in(g, r, i), nk_in(g, r, i + 1u), nk_in(g, r, i + 2u), nk_in(g, r, i + 3u));
}

fn nv4_in(g: u32, r: u32, i: u32) -> vec4<f32> {
    return vec4<f32>(nv_in(g, r, i), nv_in(g, r, i + 1u), nv_in(g, r, i + 2u), nv_in(g, r, i + 3u));
}
