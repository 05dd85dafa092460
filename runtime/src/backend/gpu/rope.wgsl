// RotaryEmbedding (ONNX opset 23) on x [1, H, T, D] (or read from [1, T, H, D] when P[5]=1), out
// [1, H, T, D]. One thread an element. P[0]=H P[1]=T P[2]=D P[3]=rotary dim P[4]=interleaved
// P[5]=input tokens-first P[6]=n P[7]=epsilon (f32 bits, NORM only).
// NORM: each head's D values RMS-normalized first (x / sqrt(mean(x²) + eps) · NW, QK-norm), each thread
// summing its head's squares (D loads, the same addresses across the head's threads).
override NORM: bool = false;

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> COS: array<f32>;
@group(0) @binding(3) var<storage, read> SIN: array<f32>;
@group(0) @binding(4) var<storage, read> POS: array<u32>;
@group(0) @binding(5) var<storage, read> NW: array<f32>;
@group(0) @binding(6) var<storage, read_write> O: array<f32>;

// Element i of the head at `base`, normalized when NORM (`inv`: the head's 1 / rms).
fn head_at(base: u32, i: u32, inv: f32) -> f32 {
    if (NORM) { return X[base + i] * inv * NW[i]; }
    return X[base + i];
}

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let e = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (e >= pu(6u)) { return; }
    let nh = pu(0u);
    let t_n = pu(1u);
    let d = pu(2u);
    let rot = pu(3u);
    let i = e % d;
    let row = e / d;
    let t = row % t_n;
    let h = row / t_n;
    var base = row * d;
    if (pu(5u) == 1u) { base = (t * nh + h) * d; }
    var inv = 1.0;
    if (NORM) {
        var sq = 0.0;
        for (var k = 0u; k < d; k = k + 1u) { sq = sq + X[base + k] * X[base + k]; }
        inv = inverseSqrt(sq / f32(d) + pf(7u));
    }
    if (i >= rot) { O[e] = head_at(base, i, inv); return; }
    let half = rot / 2u;
    var first: bool;
    var ia: u32;
    var ib: u32;
    var j: u32;
    if (pu(4u) == 1u) {
        first = (i & 1u) == 0u;
        ia = i & ~1u;
        ib = ia + 1u;
        j = i / 2u;
    } else {
        first = i < half;
        j = i % half;
        ia = j;
        ib = j + half;
    }
    let p = POS[2u * t];
    let c = COS[p * half + j];
    let s = SIN[p * half + j];
    let a = head_at(base, ia, inv);
    let b = head_at(base, ib, inv);
    if (first) { O[e] = a * c - b * s; } else { O[e] = b * c + a * s; }
}
