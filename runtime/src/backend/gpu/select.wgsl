// Arg-max of each row (TopK with k = 1, largest, lowest index on ties): one workgroup a row.
// P[0]=rows P[1]=V. Outputs: VALS f32 [rows], IDX i64 [rows] (low word, high word 0).
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> VALS: array<f32>;
@group(0) @binding(3) var<storage, read_write> IDX: array<u32>;
var<workgroup> bv: array<f32, 256>;
var<workgroup> bi: array<u32, 256>;

// The best (value, then lower index) of the workgroup's 256 candidates into bv[0], bi[0]; an index of
// 0xffffffff is no candidate. Called by every invocation.
fn best_of_workgroup(lid: u32, best: f32, at: u32) {
    bv[lid] = best;
    bi[lid] = at;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (lid < w) {
            let ov = bv[lid + w];
            let oi = bi[lid + w];
            if (oi != 0xffffffffu && (bi[lid] == 0xffffffffu || ov > bv[lid] || (ov == bv[lid] && oi < bi[lid]))) {
                bv[lid] = ov;
                bi[lid] = oi;
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn argmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let v_n = pu(1u);
    var best = -3.4028235e38;
    var at = 0xffffffffu;
    for (var i = lid; i < v_n; i = i + 256u) {
        let x = X[row * v_n + i];
        if (x > best || at == 0xffffffffu) { best = x; at = i; }
    }
    best_of_workgroup(lid, best, at);
    if (lid == 0u) {
        VALS[row] = bv[0];
        IDX[2u * row] = bi[0];
        IDX[2u * row + 1u] = 0u;
    }
}

var<workgroup> wv: f32;
var<workgroup> wi: u32;

// TopK with 1 < k ≤ 64 (largest, sorted, lower index first on ties — the CPU's order): one workgroup a
// row, k rounds, each the arg-max of the values after the previous winner in that order.
// P[0]=rows P[1]=V P[2]=k. Outputs: VALS f32 [rows, k], IDX i64 [rows, k].
@compute @workgroup_size(256)
fn topk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let v_n = pu(1u);
    let k = pu(2u);
    var pv = 0.0;
    var pi = 0u;
    for (var r = 0u; r < k; r = r + 1u) {
        var best = -3.4028235e38;
        var at = 0xffffffffu;
        for (var i = lid; i < v_n; i = i + 256u) {
            let x = X[row * v_n + i];
            let after = r == 0u || x < pv || (x == pv && i > pi);
            if (after && (x > best || at == 0xffffffffu)) { best = x; at = i; }
        }
        best_of_workgroup(lid, best, at);
        if (lid == 0u) {
            wv = bv[0];
            wi = bi[0];
            VALS[row * k + r] = bv[0];
            IDX[2u * (row * k + r)] = bi[0];
            IDX[2u * (row * k + r) + 1u] = 0u;
        }
        workgroupBarrier();
        pv = wv;
        pi = wi;
        workgroupBarrier();
    }
}
