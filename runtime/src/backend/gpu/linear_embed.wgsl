// The token embedding (compiled after linear_weights.wgsl): O[t, k] = W[ids[t], k] decoded, one element
// an invocation, straight from the weights in their linear-kernel layout (a tied output layer's own
// buffers). IDS: int64 ids as lo/hi u32 words; a negative id counts from the end (as Gather has it).
// P[0]=rows in this part P[1]=K P[2]=tokens P[3]=n0 (the part's first row) P[4]=rows in all parts.
// Every part's dispatch covers all elements and writes the rows it holds; the first part also writes
// zeros for an id outside the table (the host checks ids it knows; a token fed back from the token
// choice is in range by construction).
@group(0) @binding(1) var<storage, read> IDS: array<u32>;
@group(0) @binding(7) var<storage, read_write> O: array<f32>;

@compute @workgroup_size(256)
fn embed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    let kk = pu(1u);
    if (i >= pu(2u) * kk) { return; }
    let t = i / kk;
    let lo = IDS[2u * t];
    let hi = IDS[2u * t + 1u];
    let all = pu(4u);
    var row = 0xffffffffu;
    if (hi == 0u && lo < all) {
        row = lo;
    } else if (hi == 0xffffffffu && lo >= 0x80000000u && 0u - lo <= all) {
        row = all - (0u - lo);
    }
    let n0 = pu(3u);
    if (row != 0xffffffffu && row >= n0 && row - n0 < pu(0u)) {
        O[i] = w_at(row - n0, i % kk, kk);
    } else if (row == 0xffffffffu && n0 == 0u) {
        O[i] = 0.0;
    }
}
