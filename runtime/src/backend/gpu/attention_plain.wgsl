// A plain ONNX Attention (no past inputs, no mask): T queries over S fixed keys and values — Whisper's
// cross-attention over the encoder's K/V. One workgroup (64 threads) a (head, token).
// Q [1, H, T, D], K [1, KVH, S, D], V [1, KVH, S, DV], O [1, H, T, DV] (f32, head-major; head h reads
// KV head h / (H / KVH)).
// Two passes, as attention.wgsl: (A) per-thread running max and sum of exp, combined; (B) tiles of 64
// keys: the probabilities in shared memory, each thread accumulating output dims lid, lid + 64, ...
// P[0]=H P[1]=KVH P[2]=T P[3]=D P[4]=S P[5]=DV P[6]=scale (f32) P[7]=soft cap (f32; 0: none)
// P[8]=causal (query t attends keys 0..=t)

@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(2) var<storage, read> K: array<f32>;
@group(0) @binding(3) var<storage, read> V: array<f32>;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;

var<workgroup> sq: array<f32, 256>;
var<workgroup> red: array<f32, 64>;
var<workgroup> sp: array<f32, 64>;

const NEG_INF: f32 = -3.4028235e38;

// The soft cap c·tanh(s/c) when P[7] = c > 0.
fn capped(s: f32) -> f32 { return soft_cap(s, pf(7u)); }

// The scaled (and capped) score of key j at K offset `kb` (the KV head's first element).
fn score(kb: u32, j: u32) -> f32 {
    let d = pu(3u);
    var s = 0.0;
    let base = kb + j * d;
    for (var i = 0u; i < d; i = i + 1u) { s = s + sq[i] * K[base + i]; }
    return capped(s * pf(6u));
}

// The workgroup's combination `op` (0: max, 1: sum) of every thread's `v` (all 64 threads call it).
fn combine(lid: u32, v: f32, op: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var w = 32u; w > 0u; w = w >> 1u) {
        if (lid < w) {
            if (op == 0u) { red[lid] = max(red[lid], red[lid + w]); } else { red[lid] = red[lid] + red[lid + w]; }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn attention_plain(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let h_n = pu(0u);
    let t_n = pu(2u);
    let d = pu(3u);
    let s_n = pu(4u);
    let dv = pu(5u);
    let item = wid.x + wid.y * nwg.x;
    // Workgroups past the last (head, token) run the barriers and write nothing.
    let live = item < h_n * t_n;
    let h = min(item / t_n, h_n - 1u);
    let t = item % t_n;
    let g = h / (h_n / pu(1u));
    let kb = g * s_n * d;
    let vb = g * s_n * dv;
    var keys = s_n;
    if (pu(8u) == 1u) { keys = min(t + 1u, s_n); }
    for (var i = lid; i < d; i = i + 64u) { sq[i] = Q[(h * t_n + t) * d + i]; }
    workgroupBarrier();

    // (A) running max and sum of exp per thread, then the workgroup's.
    var m = NEG_INF;
    var l = 0.0;
    for (var j = lid; j < keys; j = j + 64u) {
        let s = score(kb, j);
        if (s > m) { l = l * exp(m - s) + 1.0; m = s; } else { l = l + exp(s - m); }
    }
    let mx = combine(lid, m, 0u);
    var mine = 0.0;
    if (m > NEG_INF) { mine = l * exp(m - mx); }
    let inv = 1.0 / combine(lid, mine, 1u);

    // (B) weighted sum of the values, 64 keys a tile.
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var j0 = 0u; j0 < keys; j0 = j0 + 64u) {
        let j = j0 + lid;
        var p = 0.0;
        if (j < keys) { p = exp(score(kb, j) - mx) * inv; }
        sp[lid] = p;
        workgroupBarrier();
        let n = min(64u, keys - j0);
        for (var c = 0u; c < 4u; c = c + 1u) {
            let i = lid + c * 64u;
            if (i < dv) {
                var a = acc[c];
                for (var r = 0u; r < n; r = r + 1u) { a = a + sp[r] * V[vb + (j0 + r) * dv + i]; }
                acc[c] = a;
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < 4u; c = c + 1u) {
            let i = lid + c * 64u;
            if (i < dv) { O[(h * t_n + t) * dv + i] = acc[c]; }
        }
    }
}
