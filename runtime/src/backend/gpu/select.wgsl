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

// TopK with k > 64 (top-p over the whole vocabulary): a bitonic sort of the row's (rank, index)
// pairs in IDX (which holds n pairs), then the first k written out. The network is the one where
// every comparator puts the better element first (a "flip" step mirrors each block of `size`, then
// half-cleaners of falling strides), so the row needs no padding: comparators reaching past n are
// skipped, as if the row went on with elements worse than all. Better: the higher rank (NaN lowest,
// −0 below +0, as the CPU's top_k), then the lower index. One row (the token choice's).
const SORT_B: u32 = 1024u;
var<workgroup> sk: array<u32, 1024>;
var<workgroup> si: array<u32, 1024>;

fn rank(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) { return 0u; }
    if ((b & 0x80000000u) != 0u) { return ~b; }
    return b | 0x80000000u;
}

// Whether (ka, ia) goes before (kb, ib).
fn better(ka: u32, ia: u32, kb: u32, ib: u32) -> bool {
    return ka > kb || (ka == kb && ia < ib);
}

// Pair t of a step over blocks of `size` (stride 0: the flip step) or of a half-cleaner of `stride`.
fn pair(t: u32, size: u32, stride: u32) -> vec2<u32> {
    if (stride == 0u) {
        let half = size / 2u;
        let base = (t / half) * size;
        let off = t % half;
        return vec2<u32>(base + off, base + size - 1u - off);
    }
    let i = (t / stride) * 2u * stride + t % stride;
    return vec2<u32>(i, i + stride);
}

fn local_step(lid: u32, size: u32, stride: u32) {
    for (var h = 0u; h < 2u; h = h + 1u) {
        let p = pair(lid + 256u * h, size, stride);
        if (better(sk[p.y], si[p.y], sk[p.x], si[p.x])) {
            let k = sk[p.x];
            let i = si[p.x];
            sk[p.x] = sk[p.y];
            si[p.x] = si[p.y];
            sk[p.y] = k;
            si[p.y] = i;
        }
    }
    workgroupBarrier();
}

// One block of SORT_B pairs a workgroup. P[0]=n P[1]=mode: 0 loads the ranks of X and sorts the block
// whole; 1 loads the block's pairs from IDX and runs the half-cleaners below SORT_B (the end of a
// merge whose larger strides ran in sort_global).
@compute @workgroup_size(256)
fn sort_local(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = pu(0u);
    let mode = pu(1u);
    let base = wid.x * SORT_B;
    for (var h = 0u; h < 4u; h = h + 1u) {
        let l = lid + 256u * h;
        let g = base + l;
        if (g >= n) {
            sk[l] = 0u;
            si[l] = 0xffffffffu;
        } else if (mode == 0u) {
            sk[l] = rank(X[g]);
            si[l] = g;
        } else {
            sk[l] = IDX[2u * g];
            si[l] = IDX[2u * g + 1u];
        }
    }
    workgroupBarrier();
    if (mode == 0u) {
        for (var size = 2u; size <= SORT_B; size = size * 2u) {
            local_step(lid, size, 0u);
            for (var s = size / 4u; s > 0u; s = s / 2u) {
                local_step(lid, size, s);
            }
        }
    } else {
        for (var s = SORT_B / 2u; s > 0u; s = s / 2u) {
            local_step(lid, SORT_B, s);
        }
    }
    for (var h = 0u; h < 4u; h = h + 1u) {
        let l = lid + 256u * h;
        let g = base + l;
        if (g < n) {
            IDX[2u * g] = sk[l];
            IDX[2u * g + 1u] = si[l];
        }
    }
}

// One comparator a thread over the whole row. P[0]=n P[1]=size P[2]=stride (0: the flip step)
// P[3]=comparators.
@compute @workgroup_size(256)
fn sort_global(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let t = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (t >= pu(3u)) { return; }
    let n = pu(0u);
    let p = pair(t, pu(1u), pu(2u));
    if (p.y >= n) { return; }
    let ka = IDX[2u * p.x];
    let ia = IDX[2u * p.x + 1u];
    let kb = IDX[2u * p.y];
    let ib = IDX[2u * p.y + 1u];
    if (better(kb, ib, ka, ia)) {
        IDX[2u * p.x] = kb;
        IDX[2u * p.x + 1u] = ib;
        IDX[2u * p.y] = ka;
        IDX[2u * p.y + 1u] = ia;
    }
}

// The first k sorted pairs as TopK's outputs: the value from X, the index as i64 (each thread
// rewrites its own pair in place). P[0]=k.
@compute @workgroup_size(256)
fn sort_out(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let j = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (j >= pu(0u)) { return; }
    let i = IDX[2u * j + 1u];
    VALS[j] = X[i];
    IDX[2u * j] = i;
    IDX[2u * j + 1u] = 0u;
}
