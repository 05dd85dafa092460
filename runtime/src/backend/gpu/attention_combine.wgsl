// Combines the partial softmaxes of `attention_part` (one per cache segment): for every (head, token),
// M = max m_s, L = sum l_s e^(m_s - M), out = sum acc_s e^(m_s - M) / L. One (head, token) an invocation.
// P[0]=H P[2]=T P[3]=D P[8]=output tokens-first P[16]=segments; PART: [seg][H*T][D + 2].

@group(0) @binding(1) var<storage, read> PART: array<f32>;
@group(0) @binding(2) var<storage, read_write> O: array<f32>;

const NEG_INF_C: f32 = -3.4028235e38;

@compute @workgroup_size(64)
fn attention_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let h_n = pu(0u);
    let t_n = pu(2u);
    let d = pu(3u);
    let n = h_n * t_n;
    let item = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (item >= n) { return; }
    let h = item / t_n;
    let t = item % t_n;
    let segs = pu(16u);
    var mx = NEG_INF_C;
    for (var s = 0u; s < segs; s = s + 1u) { mx = max(mx, PART[(s * n + item) * (d + 2u)]); }
    var total = 0.0;
    for (var s = 0u; s < segs; s = s + 1u) {
        let b = (s * n + item) * (d + 2u);
        if (PART[b] > NEG_INF_C) { total = total + PART[b + 1u] * exp(PART[b] - mx); }
    }
    var inv = 0.0;
    if (total > 0.0) { inv = 1.0 / total; }
    for (var i = 0u; i < d; i = i + 1u) {
        var v = 0.0;
        for (var s = 0u; s < segs; s = s + 1u) {
            let b = (s * n + item) * (d + 2u);
            if (PART[b] > NEG_INF_C) { v = v + PART[b + 2u + i] * exp(PART[b] - mx); }
        }
        v = v * inv;
        if (pu(8u) == 1u) { O[(t * h_n + h) * d + i] = v; } else { O[(h * t_n + t) * d + i] = v; }
    }
}
