// Norms over the last axis, one workgroup (256 threads) a row, f32 sums.
// rms_norm: RMSNormalization; with RESIDUAL the residual Add after it in the epilogue (O = AUX +
// norm(X), AUX of X's shape).
// layer_norm: LayerNormalization, the mean and then the variance of x − mean (two reductions);
// O = (X − mean)·inv·W (+ AUX[i], the bias, where P[3] = 1).
// P[0]=rows P[1]=H P[2]=eps (f32 bits) P[3]=has bias (layer_norm).
override RESIDUAL: bool = false;

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<f32>;
// The residual (rms_norm with RESIDUAL) or the bias (layer_norm); a dummy otherwise.
@group(0) @binding(3) var<storage, read> AUX: array<f32>;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;
var<workgroup> red: array<f32, 256>;

// The workgroup's sum of every thread's `v` (all 256 threads call it).
fn reduce(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (lid < w) { red[lid] = red[lid] + red[lid + w]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    let h = pu(1u);
    let live = row < pu(0u);
    var s = 0.0;
    if (live) {
        for (var i = lid; i < h; i = i + 256u) {
            let v = X[row * h + i];
            s = s + v * v;
        }
    }
    let inv = inverseSqrt(reduce(lid, s) / f32(h) + pf(2u));
    if (!live) { return; }
    for (var i = lid; i < h; i = i + 256u) {
        let v = X[row * h + i] * inv * W[i];
        if (RESIDUAL) { O[row * h + i] = AUX[row * h + i] + v; } else { O[row * h + i] = v; }
    }
}

@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    let h = pu(1u);
    let live = row < pu(0u);
    var s = 0.0;
    if (live) {
        for (var i = lid; i < h; i = i + 256u) { s = s + X[row * h + i]; }
    }
    let mean = reduce(lid, s) / f32(h);
    var q = 0.0;
    if (live) {
        for (var i = lid; i < h; i = i + 256u) {
            let d = X[row * h + i] - mean;
            q = q + d * d;
        }
    }
    let inv = inverseSqrt(reduce(lid, q) / f32(h) + pf(2u));
    if (!live) { return; }
    for (var i = lid; i < h; i = i + 256u) {
        var v = (X[row * h + i] - mean) * inv * W[i];
        if (pu(3u) == 1u) { v = v + AUX[i]; }
        O[row * h + i] = v;
    }
}
