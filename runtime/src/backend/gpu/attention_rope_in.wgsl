// Inputs of `attention.wgsl` straight from the q/k/v projections: queries [T, H, D] and new K/V rows
// [T, KVH, D], token-major (the graph's Transposes absorbed); queries and keys rotated here as the graph's
// RotaryEmbedding does (same arithmetic as `rope.wgsl`: full rotary, INTERLEAVED pairs or halves, the
// position ids as i64 low words, cos/sin [positions, D/2]), and with an f16 cache (F16C) the new rows
// rounded through f16 as the graph's Cast pair does. Bindings 8-10: COS, SIN, POS.
// QKNORM (a constant of the file compiled before this one: `attention_qk_norm.wgsl`, or none): each
// head of q and k RMS-normalized before the rotation (Qwen3's and Gemma 3's q/k norms) with the scales
// `qn(j)`, `kn(j)` and epsilons P[20], P[21]; a head's 1/rms is summed once (`q_scale`, `nk_scale`) and
// passed to the element reads.
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

// 1 / rms of the head at `base` (in Q when `is_q`, else NK) with epsilon P[eps]; 1 without QKNORM.
fn head_scale(is_q: bool, base: u32, eps: u32) -> f32 {
    if (!QKNORM) { return 1.0; }
    let d = pu(3u);
    var sq = 0.0;
    for (var i = 0u; i < d; i = i + 1u) {
        var v: f32;
        if (is_q) { v = Q[base + i]; } else { v = NK[base + i]; }
        sq = sq + v * v;
    }
    return inverseSqrt(sq / f32(d) + pf(eps));
}

fn q_scale(h: u32, t: u32) -> f32 { return head_scale(true, (t * pu(0u) + h) * pu(3u), 20u); }
fn nk_scale(g: u32, r: u32) -> f32 { return head_scale(false, (r * pu(1u) + g) * pu(3u), 21u); }

// Element j of the head at `base` (in Q when `is_q`, else NK), normalized by `s` (its 1/rms) and the
// norm's scale under QKNORM.
fn head_at(is_q: bool, base: u32, j: u32, s: f32) -> f32 {
    if (is_q) {
        if (QKNORM) { return Q[base + j] * s * qn(j); }
        return Q[base + j];
    }
    if (QKNORM) { return NK[base + j] * s * kn(j); }
    return NK[base + j];
}

// Element i of the rotated head at `base` of token t's row (in Q when `is_q`, else NK; `s`: the head's
// 1/rms under QKNORM).
fn rotated(is_q: bool, base: u32, t: u32, i: u32, s: f32) -> f32 {
    let p = rope_pair(i);
    let cs = rope_cs(t, p.z);
    let a = head_at(is_q, base, p.x, s);
    let b = head_at(is_q, base, p.y, s);
    return select(b * cs.x + a * cs.y, a * cs.x - b * cs.y, p.w == 1u);
}

fn q_in(h: u32, t: u32, i: u32, qs: f32) -> f32 {
    return rotated(true, (t * pu(0u) + h) * pu(3u), t, i, qs);
}

fn nk_in(g: u32, r: u32, i: u32, ks: f32) -> f32 {
    return round_f16(rotated(false, (r * pu(1u) + g) * pu(3u), r, i, ks));
}

fn nv_in(g: u32, r: u32, i: u32) -> f32 { return round_f16(NV[(r * pu(1u) + g) * pu(3u) + i]); }

fn nk4_in(g: u32, r: u32, i: u32, ks: f32) -> vec4<f32> {
    return vec4<f32>(nk_in(g, r, i, ks), nk_in(g, r, i + 1u, ks), nk_in(g, r, i + 2u, ks),
                     nk_in(g, r, i + 3u, ks));
}

fn nv4_in(g: u32, r: u32, i: u32) -> vec4<f32> {
    return vec4<f32>(nv_in(g, r, i), nv_in(g, r, i + 1u), nv_in(g, r, i + 2u), nv_in(g, r, i + 3u));
}
