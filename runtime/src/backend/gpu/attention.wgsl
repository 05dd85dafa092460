// Attention of one chunk over the caller-owned static cache plus the chunk's own rows, and the write of
// those rows into the cache. The cache is token-major: slot j, KV head g at (j * KVH + g) * D (the layout
// of the host pages, see kv.rs). One workgroup (64 threads) a (head, token).
//
// Keys, in order: cache slots 0..npast, then the chunk's T rows. Only those are visited (slots beyond
// npast are never read). Scores get the additive mask: column j for slot j, column S + t' for row t'.
// Two passes: (A) per-thread running max/sum, combined; (B) tiles of 64 keys: probabilities in shared
// memory, each thread accumulating output dims lid, lid+64, ...
//
// P[0]=H P[1]=KVH P[2]=T P[3]=D P[4]=S P[5]=npast P[6]=write position P[7]=scale (f32)
// P[8]=output tokens-first P[9]=write the rows into the cache P[10]=has mask P[11]=mask row stride
// P[18]=soft cap of the scaled scores (f32; 0: none): s = c·tanh(s/c) before the mask
// P[19]=first key visited (a sliding window's start; `attention` and `attention_rows`)
// Split keys (`attention`, P[17] = keys a chunk > 0): workgroup z attends keys z·P[17] .. of the sequence
// (cache slots, then the chunk's rows) and writes the partial softmax (m, l, unnormalized acc[D]) to O as
// [chunk][H*T][D + 2] for `attention_combine` (P[16] = chunks): decode over a long context spreads over
// chunks × heads workgroups instead of heads alone.
// Cache element type: F16C (override): f16 two a word, else f32 bits.
override F16C: bool = true;

@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(2) var<storage, read> NK: array<f32>;
@group(0) @binding(3) var<storage, read> NV: array<f32>;
@group(0) @binding(4) var<storage, read> MASK: array<f32>;
@group(0) @binding(5) var<storage, read_write> CK: array<u32>;
@group(0) @binding(6) var<storage, read_write> CV: array<u32>;
@group(0) @binding(7) var<storage, read_write> O: array<f32>;

var<workgroup> sq: array<f32, 256>;
var<workgroup> sm: array<f32, 64>;
var<workgroup> sl: array<f32, 64>;
var<workgroup> sp: array<f32, 64>;

const NEG_INF: f32 = -3.4028235e38;

// The soft cap c·tanh(s/c) when P[18] = c > 0.
fn capped(s: f32) -> f32 { return soft_cap(s, pf(18u)); }

fn cache_at(is_k: bool, e: u32) -> f32 {
    if (F16C) {
        var w: u32;
        if (is_k) { w = CK[e / 2u]; } else { w = CV[e / 2u]; }
        return f16_at(w, (e & 1u) == 1u);
    }
    if (is_k) { return bitcast<f32>(CK[e]); }
    return bitcast<f32>(CV[e]);
}

// Score of key j for query row `qbase` (in shared sq), head group g, token t.
fn score(j: u32, g: u32, t: u32) -> f32 {
    let d = pu(3u);
    let npast = pu(5u);
    var s = 0.0;
    var col: u32;
    if (j < npast) {
        let base = (j * pu(1u) + g) * d;
        for (var i = 0u; i < d; i = i + 1u) { s = s + sq[i] * cache_at(true, base + i); }
        col = j;
    } else {
        let r = j - npast;
        let ks = nk_scale(g, r);
        for (var i = 0u; i < d; i = i + 1u) { s = s + sq[i] * nk_in(g, r, i, ks); }
        col = pu(4u) + r;
    }
    s = capped(s * pf(7u));
    if (pu(10u) == 1u) { s = s + MASK[t * pu(11u) + col]; }
    return s;
}

fn value_at(j: u32, g: u32, i: u32) -> f32 {
    let d = pu(3u);
    let npast = pu(5u);
    if (j < npast) { return cache_at(false, (j * pu(1u) + g) * d + i); }
    return nv_in(g, j - npast, i);
}

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let h_n = pu(0u);
    let t_n = pu(2u);
    let d = pu(3u);
    let item = wid.x + wid.y * nwg.x;
    let live = item < h_n * t_n;
    let h = min(item / t_n, h_n - 1u);
    let t = item % t_n;
    let g = h / (h_n / pu(1u));
    let nkeys = pu(5u) + t_n;
    let split = pu(17u) > 0u;
    var j_lo = min(pu(19u), nkeys);
    var j_hi = nkeys;
    if (split) {
        j_lo = min(pu(19u) + wid.z * pu(17u), nkeys);
        j_hi = min(j_lo + pu(17u), nkeys);
    }
    let qs = q_scale(h, t);
    for (var i = lid; i < d; i = i + 64u) { sq[i] = q_in(h, t, i, qs); }
    workgroupBarrier();

    // (A) running max and sum of exp per thread.
    var m = NEG_INF;
    var l = 0.0;
    for (var j = j_lo + lid; j < j_hi; j = j + 64u) {
        let s = score(j, g, t);
        if (s <= NEG_INF) { continue; }
        if (s > m) { l = l * exp(m - s) + 1.0; m = s; } else { l = l + exp(s - m); }
    }
    sm[lid] = m;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w = w >> 1u) {
        if (lid < w) { sm[lid] = max(sm[lid], sm[lid + w]); }
        workgroupBarrier();
    }
    let mx = sm[0];
    if (m > NEG_INF) { sl[lid] = l * exp(m - mx); } else { sl[lid] = 0.0; }
    workgroupBarrier();
    for (var w = 32u; w > 0u; w = w >> 1u) {
        if (lid < w) { sl[lid] = sl[lid] + sl[lid + w]; }
        workgroupBarrier();
    }
    let lsum = sl[0];
    // A split chunk leaves the weights unnormalized (the combine divides).
    var inv = 1.0;
    if (!split) { inv = 1.0 / lsum; }

    // (B) weighted sum of values, 64 keys a tile.
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var j0 = j_lo; j0 < j_hi; j0 = j0 + 64u) {
        let j = j0 + lid;
        var p = 0.0;
        if (j < j_hi) {
            let s = score(j, g, t);
            if (s > NEG_INF) { p = exp(s - mx) * inv; }
        }
        sp[lid] = p;
        workgroupBarrier();
        let cnt = min(64u, j_hi - j0);
        for (var k = 0u; k < cnt; k = k + 1u) {
            let pk = sp[k];
            if (pk == 0.0) { continue; }
            for (var c = 0u; c < 4u; c = c + 1u) {
                let i = lid + 64u * c;
                if (i < d) { acc[c] = acc[c] + pk * value_at(j0 + k, g, i); }
            }
        }
        workgroupBarrier();
    }
    if (!live) { return; }
    if (split) {
        let ob = (wid.z * h_n * t_n + item) * (d + 2u);
        if (lid == 0u) {
            O[ob] = mx;
            O[ob + 1u] = lsum;
        }
        for (var c = 0u; c < 4u; c = c + 1u) {
            let i = lid + 64u * c;
            if (i < d) { O[ob + 2u + i] = acc[c]; }
        }
    } else {
        for (var c = 0u; c < 4u; c = c + 1u) {
            let i = lid + 64u * c;
            if (i < d) {
                if (pu(8u) == 1u) { O[(t * h_n + h) * d + i] = acc[c]; } else { O[(h * t_n + t) * d + i] = acc[c]; }
            }
        }
    }

    // The chunk's rows go into the cache at slots pos..pos+T (the first head of each group writes; with
    // split keys, its first chunk's workgroup).
    if (pu(9u) == 1u && h % (h_n / pu(1u)) == 0u && wid.z == 0u) {
        let dst = ((pu(6u) + t) * pu(1u) + g) * d;
        let ks = nk_scale(g, t);
        if (F16C) {
            for (var i = lid; i < d / 2u; i = i + 64u) {
                CK[dst / 2u + i] = pack_f16(nk_in(g, t, 2u * i, ks), nk_in(g, t, 2u * i + 1u, ks));
                CV[dst / 2u + i] = pack_f16(nv_in(g, t, 2u * i), nv_in(g, t, 2u * i + 1u));
            }
        } else {
            for (var i = lid; i < d; i = i + 64u) {
                CK[dst + i] = bitcast<u32>(nk_in(g, t, i, ks));
                CV[dst + i] = bitcast<u32>(nv_in(g, t, i));
            }
        }
    }
}

// The same attention with one (head, token) an invocation and 64 a workgroup: the query and the output
// accumulator in private memory (vec4s: D % 4 == 0), one online-softmax pass over the keys, no shared
// memory and no barrier. For adapters that run invocations as CPU SIMD lanes (lavapipe), where barriers
// are expensive. llvmpipe stops any invocation's loops after 65535 iterations in all: the host picks this
// variant only when (3 D/4 + 2) x (S + T) stays below that (see `attention::rows_ok`).
fn cache4(is_k: bool, e: u32) -> vec4<f32> {
    if (F16C) {
        var w0: u32;
        var w1: u32;
        if (is_k) { w0 = CK[e / 2u]; w1 = CK[e / 2u + 1u]; } else { w0 = CV[e / 2u]; w1 = CV[e / 2u + 1u]; }
        return vec4<f32>(f16_at(w0, false), f16_at(w0, true), f16_at(w1, false), f16_at(w1, true));
    }
    if (is_k) { return bitcast<vec4<f32>>(vec4<u32>(CK[e], CK[e + 1u], CK[e + 2u], CK[e + 3u])); }
    return bitcast<vec4<f32>>(vec4<u32>(CV[e], CV[e + 1u], CV[e + 2u], CV[e + 3u]));
}

@compute @workgroup_size(64)
fn attention_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let h_n = pu(0u);
    let t_n = pu(2u);
    let d = pu(3u);
    let d4 = d / 4u;
    let item = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (item >= h_n * t_n) { return; }
    let h = item / t_n;
    let t = item % t_n;
    let group = h_n / pu(1u);
    let g = h / group;
    let npast = pu(5u);
    let nkeys = npast + t_n;
    var q: array<vec4<f32>, 64>;
    var acc: array<vec4<f32>, 64>;
    let qs = q_scale(h, t);
    for (var i = 0u; i < d4; i = i + 1u) {
        q[i] = vec4<f32>(q_in(h, t, 4u * i, qs), q_in(h, t, 4u * i + 1u, qs), q_in(h, t, 4u * i + 2u, qs),
                         q_in(h, t, 4u * i + 3u, qs));
        acc[i] = vec4<f32>(0.0);
    }
    var m = NEG_INF;
    var l = 0.0;
    for (var j = pu(19u); j < nkeys; j = j + 1u) {
        var s = 0.0;
        var col: u32;
        let past = j < npast;
        var base: u32;
        if (past) {
            base = (j * pu(1u) + g) * d;
            for (var i = 0u; i < d4; i = i + 1u) { s = s + dot(q[i], cache4(true, base + 4u * i)); }
            col = j;
        } else {
            base = j - npast;
            let ks = nk_scale(g, base);
            for (var i = 0u; i < d4; i = i + 1u) { s = s + dot(q[i], nk4_in(g, base, 4u * i, ks)); }
            col = pu(4u) + (j - npast);
        }
        s = capped(s * pf(7u));
        if (pu(10u) == 1u) { s = s + MASK[t * pu(11u) + col]; }
        if (s <= NEG_INF) { continue; }
        if (s > m) {
            let c = exp(m - s);
            l = l * c;
            for (var i = 0u; i < d4; i = i + 1u) { acc[i] = acc[i] * c; }
            m = s;
        }
        let p = exp(s - m);
        l = l + p;
        if (past) {
            for (var i = 0u; i < d4; i = i + 1u) { acc[i] = acc[i] + p * cache4(false, base + 4u * i); }
        } else {
            for (var i = 0u; i < d4; i = i + 1u) { acc[i] = acc[i] + p * nv4_in(g, base, 4u * i); }
        }
    }
    var inv = 0.0;
    if (l > 0.0) { inv = 1.0 / l; }
    for (var i = 0u; i < d4; i = i + 1u) {
        let v = acc[i] * inv;
        for (var c = 0u; c < 4u; c = c + 1u) {
            let k = 4u * i + c;
            if (pu(8u) == 1u) { O[(t * h_n + h) * d + k] = v[c]; } else { O[(h * t_n + t) * d + k] = v[c]; }
        }
    }
    if (pu(9u) == 1u && h % group == 0u) {
        let dst = ((pu(6u) + t) * pu(1u) + g) * d;
        let ks = nk_scale(g, t);
        if (F16C) {
            for (var i = 0u; i < d / 2u; i = i + 1u) {
                CK[dst / 2u + i] = pack_f16(nk_in(g, t, 2u * i, ks), nk_in(g, t, 2u * i + 1u, ks));
                CV[dst / 2u + i] = pack_f16(nv_in(g, t, 2u * i), nv_in(g, t, 2u * i + 1u));
            }
        } else {
            for (var i = 0u; i < d; i = i + 1u) {
                CK[dst + i] = bitcast<u32>(nk_in(g, t, i, ks));
                CV[dst + i] = bitcast<u32>(nv_in(g, t, i));
            }
        }
    }
}

// One segment of a cache split over several buffers (a layer's cache larger than one binding): keys of
// slots r0..min(r1, npast) from this segment's buffers (local slot j - r0), plus the chunk's own rows
// when P[14] = 1, as a partial online softmax (m, l, acc[D]) for `attention_combine`. Writes the chunk's
// rows that fall in r0..r1. One (head, token) an invocation, D % 4 == 0.
// P[12]=r0 P[13]=r1 P[14]=has the chunk's rows P[15]=segment index P[16]=segments; O: partials
// [seg][H*T][D + 2].
@compute @workgroup_size(64)
fn attention_part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let h_n = pu(0u);
    let t_n = pu(2u);
    let d = pu(3u);
    let d4 = d / 4u;
    let item = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (item >= h_n * t_n) { return; }
    let h = item / t_n;
    let t = item % t_n;
    let group = h_n / pu(1u);
    let g = h / group;
    let r0 = pu(12u);
    let past_end = max(r0, min(pu(13u), pu(5u)));
    var nnew = 0u;
    if (pu(14u) == 1u) { nnew = t_n; }
    let npast = past_end - r0;
    var q: array<vec4<f32>, 64>;
    var acc: array<vec4<f32>, 64>;
    let qs = q_scale(h, t);
    for (var i = 0u; i < d4; i = i + 1u) {
        q[i] = vec4<f32>(q_in(h, t, 4u * i, qs), q_in(h, t, 4u * i + 1u, qs), q_in(h, t, 4u * i + 2u, qs),
                         q_in(h, t, 4u * i + 3u, qs));
        acc[i] = vec4<f32>(0.0);
    }
    var m = NEG_INF;
    var l = 0.0;
    for (var j = 0u; j < npast + nnew; j = j + 1u) {
        var s = 0.0;
        var col: u32;
        let past = j < npast;
        var base: u32;
        if (past) {
            base = (j * pu(1u) + g) * d;
            for (var i = 0u; i < d4; i = i + 1u) { s = s + dot(q[i], cache4(true, base + 4u * i)); }
            col = r0 + j;
        } else {
            base = j - npast;
            let ks = nk_scale(g, base);
            for (var i = 0u; i < d4; i = i + 1u) { s = s + dot(q[i], nk4_in(g, base, 4u * i, ks)); }
            col = pu(4u) + (j - npast);
        }
        s = capped(s * pf(7u));
        if (pu(10u) == 1u) { s = s + MASK[t * pu(11u) + col]; }
        if (s <= NEG_INF) { continue; }
        if (s > m) {
            let c = exp(m - s);
            l = l * c;
            for (var i = 0u; i < d4; i = i + 1u) { acc[i] = acc[i] * c; }
            m = s;
        }
        let p = exp(s - m);
        l = l + p;
        if (past) {
            for (var i = 0u; i < d4; i = i + 1u) { acc[i] = acc[i] + p * cache4(false, base + 4u * i); }
        } else {
            for (var i = 0u; i < d4; i = i + 1u) { acc[i] = acc[i] + p * nv4_in(g, base, 4u * i); }
        }
    }
    let ob = (pu(15u) * h_n * t_n + item) * (d + 2u);
    O[ob] = m;
    O[ob + 1u] = l;
    for (var i = 0u; i < d4; i = i + 1u) {
        for (var c = 0u; c < 4u; c = c + 1u) { O[ob + 2u + 4u * i + c] = acc[i][c]; }
    }
    let slot = pu(6u) + t;
    if (pu(9u) == 1u && h % group == 0u && slot >= r0 && slot < pu(13u)) {
        let dst = ((slot - r0) * pu(1u) + g) * d;
        let ks = nk_scale(g, t);
        if (F16C) {
            for (var i = 0u; i < d / 2u; i = i + 1u) {
                CK[dst / 2u + i] = pack_f16(nk_in(g, t, 2u * i, ks), nk_in(g, t, 2u * i + 1u, ks));
                CV[dst / 2u + i] = pack_f16(nv_in(g, t, 2u * i), nv_in(g, t, 2u * i + 1u));
            }
        } else {
            for (var i = 0u; i < d; i = i + 1u) {
                CK[dst + i] = bitcast<u32>(nk_in(g, t, i, ks));
                CV[dst + i] = bitcast<u32>(nv_in(g, t, i));
            }
        }
    }
}
