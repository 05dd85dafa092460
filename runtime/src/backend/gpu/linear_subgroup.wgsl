// `linear` for adapters with subgroups (appended to linear.wgsl; naga takes the subgroup builtins when
// the device has the feature, without an `enable`): a row's lanes are one subgroup, whose
// sums meet in `subgroupAdd` — no shared memory, no barrier (the lanes variant reduces through a tree of
// workgroup barriers). ROWS rows (gate pairs: items) a workgroup, the subgroups taking them in turn, so
// any subgroup size works; the host picks ROWS = 256 / the adapter's smallest subgroup size. Same
// parameters, modes and epilogue as the other variants.
// BLOCKS (4- and 8-bit block forms): a lane takes whole blocks of a row (block_sums) instead of one
// element of every block (lane_sums).
override BLOCKS: bool = false;

fn row_sums(n: u32, lane: u32, lanes: u32, t0: u32, tc: u32) -> Sums {
    if (BLOCKS) { return block_sums(n, lane, lanes, t0, tc); }
    return lane_sums(n, lane, lanes, t0, tc);
}

// Lane `lane` of `lanes`' share of row n's sums (as lane_sums, in another order) when a lane takes whole
// blocks: blocks lane, lane + lanes, ... of the row, each one's words (BLOCK / 8 of 4-bit codes, BLOCK / 4
// of 8-bit), scale and zero point loaded once. The subgroup's lanes read adjacent blocks, so a row of
// K = 576 (18 blocks of 32) is one step of the loop where lane_sums takes 18 steps of one word a block:
// a decode GEMV waits on one round of weight loads, not on a chain of them.
fn block_sums(n: u32, lane: u32, lanes: u32, t0: u32, tc: u32) -> Sums {
    let nb = pu(1u) / BLOCK;
    let per = select(4u, 8u, FORM == 4u);
    let words = BLOCK / per;
    let bits = 32u / per;
    let mask = (1u << bits) - 1u;
    let o = x_rows(t0, tc);
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    for (var blk = lane; blk < nb; blk = blk + lanes) {
        let g = n * nb + blk;
        let s = S[g];
        let z = Z[g];
        for (var wi = 0u; wi < words; wi = wi + 1u) {
            let word = W[g * words + wi];
            let k0 = blk * BLOCK + wi * per;
            for (var e = 0u; e < per; e = e + 1u) {
                let k = k0 + e;
                let w = (f32((word >> (bits * e)) & mask) - z) * s;
                if (NORM) {
                    let xv = x_at4(o.a, k);
                    b = b + xv * xv;
                    a = a + w * AUX[k] * xv;
                } else if (tc == 1u) {
                    a.x = a.x + w * X[o.a.x + k];
                } else {
                    a = a + w * x_at4(o.a, k);
                    if (tc > 4u) { b = b + w * x_at4(o.b, k); }
                }
            }
        }
    }
    return Sums(a, b);
}

@compute @workgroup_size(256)
fn linear_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) nsg: u32,
             @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg: u32) {
    let n_rows = pu(0u);
    let t_n = pu(2u);
    let pair = MODE >= 2u;
    let fused = pair || NORM || MODE == 1u;
    let tpw = select(8u, 4u, fused);
    let t0 = wid.z * tpw;
    let tc = min(tpw, t_n - t0);
    let first = (wid.x + wid.y * nwg.x) * ROWS;
    // `item` is the same across a subgroup: the subgroup operations below run in its uniform control flow.
    for (var r = sid; r < ROWS; r = r + nsg) {
        let item = first + r;
        if (item >= n_rows) { break; }
        let s = row_sums(item, lane, sg, t0, tc);
        let a = subgroupAdd(s.a);
        let b = subgroupAdd(s.b);
        var du = vec4<f32>(0.0);
        if (pair) { du = subgroupAdd(row_sums(item + n_rows, lane, sg, t0, tc).a); }
        for (var t = lane; t < tc; t = t + sg) {
            var dot = b[t & 3u];
            if (t < 4u) { dot = a[t]; }
            emit(item, t0 + t, dot, b[t & 3u], du[t & 3u], pair, NORM);
        }
    }
}
