// RMSNormalization over the last axis: one workgroup (256 threads) a row; with RESIDUAL, the residual
// Add after it in the epilogue (O = RES + norm(X), RES of X's shape).
// P[0]=rows P[1]=H P[2]=eps (f32 bits).
override RESIDUAL: bool = false;

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<f32>;
@group(0) @binding(3) var<storage, read> RES: array<f32>;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;
var<workgroup> red: array<f32, 256>;

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
    red[lid] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (lid < w) { red[lid] = red[lid] + red[lid + w]; }
        workgroupBarrier();
    }
    if (!live) { return; }
    let inv = inverseSqrt(red[0] / f32(h) + pf(2u));
    for (var i = lid; i < h; i = i + 256u) {
        let v = X[row * h + i] * inv * W[i];
        if (RESIDUAL) { O[row * h + i] = RES[row * h + i] + v; } else { O[row * h + i] = v; }
    }
}
