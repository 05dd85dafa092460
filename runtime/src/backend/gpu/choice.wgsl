// The token choice after its TopK (plan::TokenChoice; on the CPU misc::nucleus_pick) over one row of
// k values sorted best first: the softmax p, the nucleus (cumsum(p) − p < top_p), the draw — how
// many prefix sums of the kept mass are ≤ u · Σ kept, at most k − 1 — and the index there, as i64.
// One workgroup of 256: lane l walks the l-th run of ceil(k / 256) values in order; the runs' sums
// are combined by a scan (so the sums round in another order than the CPU's one long sum).
// P[0]=k P[1]=top_p (f32) P[2]=u (f32).
@group(0) @binding(1) var<storage, read> VALS: array<f32>;
@group(0) @binding(2) var<storage, read> IDX: array<u32>;
@group(0) @binding(3) var<storage, read_write> OUT: array<u32>;
var<workgroup> red: array<f32, 256>;
var<workgroup> cnt: array<u32, 256>;

// The workgroup's sum of x (every lane gets it).
fn wg_sum(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (lid < w) { red[lid] = red[lid] + red[lid + w]; }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

// The workgroup's maximum of x, NaN ignored (every lane gets it).
fn wg_max(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (lid < w && red[lid + w] > red[lid]) { red[lid] = red[lid + w]; }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

// The sum of x over the lanes before this one.
fn wg_before(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var o = 1u; o < 256u; o = o << 1u) {
        var y = 0.0;
        if (lid >= o) { y = red[lid - o]; }
        workgroupBarrier();
        red[lid] = red[lid] + y;
        workgroupBarrier();
    }
    var b = 0.0;
    if (lid > 0u) { b = red[lid - 1u]; }
    workgroupBarrier();
    return b;
}

// p_i as the CPU has it: e^(v_i − m) / s (s = 0: the exponential alone); 0 when m is −inf (no mass).
fn prob(i: u32, m: f32, s: f32) -> f32 {
    if (m == bitcast<f32>(0xff800000u)) { return 0.0; }
    let e = exp(VALS[i] - m);
    if (s > 0.0) { return e / s; }
    return e;
}

@compute @workgroup_size(256)
fn choose(@builtin(local_invocation_index) lid: u32) {
    let k = pu(0u);
    let top_p = pf(1u);
    let u = pf(2u);
    let per = (k + 255u) / 256u;
    let lo = min(lid * per, k);
    let hi = min(lo + per, k);
    let neg_inf = bitcast<f32>(0xff800000u);
    var m = neg_inf;
    for (var i = lo; i < hi; i = i + 1u) {
        if (VALS[i] > m) { m = VALS[i]; }
    }
    m = wg_max(lid, m);
    var s = 0.0;
    for (var i = lo; i < hi; i = i + 1u) {
        s = s + prob(i, m, 0.0);
    }
    s = wg_sum(lid, s);
    // Pass 1: this run's share of cumsum(p), then its kept mass.
    var run_p = 0.0;
    for (var i = lo; i < hi; i = i + 1u) {
        let p = prob(i, m, s);
        run_p = run_p + p;
    }
    let base_p = wg_before(lid, run_p);
    var c = base_p;
    var run_kept = 0.0;
    for (var i = lo; i < hi; i = i + 1u) {
        let p = prob(i, m, s);
        c = c + p;
        if (c - p < top_p) { run_kept = run_kept + p; }
    }
    let total = wg_sum(lid, run_kept);
    let thr = u * total;
    // Pass 2: the prefix sums of the kept mass at or below the threshold.
    var ck = wg_before(lid, run_kept);
    c = base_p;
    var n = 0u;
    for (var i = lo; i < hi; i = i + 1u) {
        let p = prob(i, m, s);
        c = c + p;
        if (c - p < top_p) { ck = ck + p; }
        if (ck <= thr) { n = n + 1u; }
    }
    cnt[lid] = n;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w = w >> 1u) {
        if (lid < w) { cnt[lid] = cnt[lid] + cnt[lid + w]; }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let j = min(cnt[0], k - 1u);
        OUT[0] = IDX[2u * j];
        OUT[1] = IDX[2u * j + 1u];
    }
}
