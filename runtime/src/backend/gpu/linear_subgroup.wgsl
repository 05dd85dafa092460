// `linear` for adapters with subgroups (appended to linear.wgsl; naga takes the subgroup builtins when
// the device has the feature, without an `enable`): a row's lanes are one subgroup, whose
// sums meet in `subgroupAdd` — no shared memory, no barrier (the lanes variant reduces through a tree of
// workgroup barriers). ROWS rows (SiLU pairs: items) a workgroup, the subgroups taking them in turn, so
// any subgroup size works; the host picks ROWS = 256 / the adapter's smallest subgroup size. Same
// parameters, modes and epilogue as the other variants.
@compute @workgroup_size(256)
fn linear_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) nsg: u32,
             @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sg: u32) {
    let n_rows = pu(0u);
    let t_n = pu(2u);
    let pair = MODE == 2u;
    let fused = pair || NORM || MODE == 1u;
    let tpw = select(8u, 4u, fused);
    let t0 = wid.z * tpw;
    let tc = min(tpw, t_n - t0);
    let first = (wid.x + wid.y * nwg.x) * ROWS;
    // `item` is the same across a subgroup: the subgroup operations below run in its uniform control flow.
    for (var r = sid; r < ROWS; r = r + nsg) {
        let item = first + r;
        if (item >= n_rows) { break; }
        let s = lane_sums(item, lane, sg, t0, tc);
        let a = subgroupAdd(s.a);
        let b = subgroupAdd(s.b);
        var du = vec4<f32>(0.0);
        if (pair) { du = subgroupAdd(lane_sums(item + n_rows, lane, sg, t0, tc).a); }
        for (var t = lane; t < tc; t = t + sg) {
            var dot = b[t & 3u];
            if (t < 4u) { dot = a[t]; }
            emit(item, t0 + t, dot, b[t & 3u], du[t & 3u], pair, NORM);
        }
    }
}
