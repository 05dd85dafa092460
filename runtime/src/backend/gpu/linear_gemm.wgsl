// Tiled GEMM for prefill chunks (appended to linear.wgsl; the host takes it from P[2] = T ≥ its
// threshold on GPUs): a workgroup computes 64 tokens × 64 rows (gate pairs: 32 items, their a- and
// b-rows), 16 × 16 threads holding 4 tokens × 4 rows each in registers. Each step of GK k stages the
// tile's x and its decoded weights in workgroup memory, so a weight is decoded and read once per 64
// tokens (the GEMV kernels: once per 8 or 4). Same parameters, modes (MODE, NORM) and epilogue (`emit`)
// as the GEMV kernels; NORM: the tile's tokens' sums of squares first, x·scale when staged.
const GT: u32 = 64u;
const GN: u32 = 64u;
const GK: u32 = 16u;
const GS: u32 = 17u; // row stride of the staged tiles (GK + 1: no bank conflicts on the k walk)

var<workgroup> gx: array<f32, 1088>; // [GT][GS]
var<workgroup> gw: array<f32, 1088>; // [GN][GS]
var<workgroup> gsq: array<f32, 64>;

// Row `j` (0..4) of thread column `tx` within the tile's 64 staged rows.
fn gemm_row(tx: u32, j: u32, pair: bool) -> u32 {
    if (!pair) { return 4u * tx + j; }
    // Items 2tx, 2tx+1: a-rows first, their b-rows in the tile's second half.
    return select(2u * tx + j, GN / 2u + 2u * tx + j - 2u, j >= 2u);
}

@compute @workgroup_size(256)
fn linear_gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let n_rows = pu(0u);
    let kk = pu(1u);
    let t_n = pu(2u);
    let pair = MODE >= 2u;
    let items = select(GN, GN / 2u, pair);
    let i0 = (wid.x + wid.y * nwg.x) * items;
    let t0 = wid.z * GT;
    let tx = lid % 16u;
    let ty = lid / 16u;
    if (NORM) {
        // Four threads a token: partial sums of squares, then one thread a token adds them.
        let t = t0 + lid / 4u;
        var s = 0.0;
        if (t < t_n) {
            for (var k = lid % 4u; k < kk; k = k + 4u) {
                let v = X[t * kk + k];
                s = s + v * v;
            }
        }
        gx[lid] = s;
        workgroupBarrier();
        if (lid < GT) { gsq[lid] = gx[4u * lid] + gx[4u * lid + 1u] + gx[4u * lid + 2u] + gx[4u * lid + 3u]; }
        workgroupBarrier();
    }
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    let r0 = gemm_row(tx, 0u, pair) * GS;
    let r1 = gemm_row(tx, 1u, pair) * GS;
    let r2 = gemm_row(tx, 2u, pair) * GS;
    let r3 = gemm_row(tx, 3u, pair) * GS;
    let c0 = 4u * ty * GS;
    for (var kb = 0u; kb < kk; kb = kb + GK) {
        for (var e = lid; e < GT * GK; e = e + 256u) {
            let t = t0 + e / GK;
            let k = kb + e % GK;
            var v = 0.0;
            if (t < t_n && k < kk) {
                v = X[t * kk + k];
                if (NORM) { v = v * AUX[k]; }
            }
            gx[(e / GK) * GS + e % GK] = v;
        }
        for (var e = lid; e < GN * GK; e = e + 256u) {
            let r = e / GK;
            let k = kb + e % GK;
            var item = i0 + r;
            var n = item;
            if (pair) {
                item = i0 + r % items;
                n = item + (r / items) * n_rows;
            }
            var v = 0.0;
            if (item < n_rows && k < kk) { v = w_at(n, k, kk); }
            gw[r * GS + e % GK] = v;
        }
        workgroupBarrier();
        for (var k = 0u; k < GK; k = k + 1u) {
            let xv = vec4<f32>(gx[c0 + k], gx[c0 + GS + k], gx[c0 + 2u * GS + k], gx[c0 + 3u * GS + k]);
            a0 = a0 + gw[r0 + k] * xv;
            a1 = a1 + gw[r1 + k] * xv;
            a2 = a2 + gw[r2 + k] * xv;
            a3 = a3 + gw[r3 + k] * xv;
        }
        workgroupBarrier();
    }
    for (var q = 0u; q < 4u; q = q + 1u) {
        let tl = 4u * ty + q;
        let t = t0 + tl;
        if (t >= t_n) { break; }
        var sq = 0.0;
        if (NORM) { sq = gsq[tl]; }
        if (pair) {
            let it = i0 + 2u * tx;
            if (it < n_rows) { emit(it, t, a0[q], sq, a2[q], true, NORM); }
            if (it + 1u < n_rows) { emit(it + 1u, t, a1[q], sq, a3[q], true, NORM); }
        } else {
            let it = i0 + 4u * tx;
            if (it < n_rows) { emit(it, t, a0[q], sq, 0.0, false, NORM); }
            if (it + 1u < n_rows) { emit(it + 1u, t, a1[q], sq, 0.0, false, NORM); }
            if (it + 2u < n_rows) { emit(it + 2u, t, a2[q], sq, 0.0, false, NORM); }
            if (it + 3u < n_rows) { emit(it + 3u, t, a3[q], sq, 0.0, false, NORM); }
        }
    }
}
