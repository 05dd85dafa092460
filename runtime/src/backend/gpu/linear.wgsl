// y[t, n0 + n] = sum_k x[t, k] * W[n, k] (+ bias[n]) (+ res[t, n0 + n]) for every weight encoding the
// exporter writes, decoded on the fly from the file's bytes (u32 words).
// A workgroup: 8 output rows x 32 lanes, 8 tokens (z = token chunk). Each lane walks the row's K in
// strides of 32 elements (dense forms) or of 32 blocks (block forms), then lanes are summed.
// FORM: 0 f32, 1 f16, 2 bf16, 3 int8 per row (S[n]), 4 4-bit blocks of 32, 5 8-bit blocks of 32
// (value = (q - Z[blk]) * S[blk]). P[0]=N (rows in this part) P[1]=K P[2]=T P[3]=n0 P[4]=row stride
// of y P[5]=has bias P[6]=has residual.
override FORM: u32 = 0u;

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<u32>;
@group(0) @binding(3) var<storage, read> S: array<f32>;
@group(0) @binding(4) var<storage, read> Z: array<f32>;
@group(0) @binding(5) var<storage, read> BIAS: array<f32>;
@group(0) @binding(6) var<storage, read> RES: array<f32>;
@group(0) @binding(7) var<storage, read_write> O: array<f32>;

var<workgroup> red: array<f32, 2048>;

fn dense_at(n: u32, k: u32, kk: u32) -> f32 {
    let e = n * kk + k;
    switch FORM {
        case 0u: { return bitcast<f32>(W[e]); }
        case 1u: { return unpack2x16float(W[e / 2u])[e & 1u]; }
        case 2u: { return bitcast<f32>(((W[e / 2u] >> (16u * (e & 1u))) & 0xffffu) << 16u); }
        default: {
            let byte = (W[e / 4u] >> (8u * (e & 3u))) & 0xffu;
            return f32(i32(byte << 24u) >> 24u) * S[n];
        }
    }
}

@compute @workgroup_size(256)
fn linear(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let n_rows = pu(0u);
    let kk = pu(1u);
    let t_n = pu(2u);
    let r = lid / 32u;
    let lane = lid % 32u;
    let n = (wid.x + wid.y * nwg.x) * 8u + r;
    let t0 = wid.z * 8u;
    let live = n < n_rows;
    var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let tc = min(8u, t_n - t0);
    if (live) {
        if (FORM < 4u) {
            for (var k = lane; k < kk; k = k + 32u) {
                let w = dense_at(n, k, kk);
                for (var tt = 0u; tt < tc; tt = tt + 1u) {
                    acc[tt] = acc[tt] + w * X[(t0 + tt) * kk + k];
                }
            }
        } else {
            let nb = kk / 32u;
            var wv: array<f32, 32>;
            for (var b = lane; b < nb; b = b + 32u) {
                let blk = n * nb + b;
                let s = S[blk];
                let z = Z[blk];
                if (FORM == 4u) {
                    for (var i = 0u; i < 4u; i = i + 1u) {
                        let word = W[blk * 4u + i];
                        for (var j = 0u; j < 8u; j = j + 1u) {
                            wv[i * 8u + j] = (f32((word >> (4u * j)) & 15u) - z) * s;
                        }
                    }
                } else {
                    for (var i = 0u; i < 8u; i = i + 1u) {
                        let word = W[blk * 8u + i];
                        for (var j = 0u; j < 4u; j = j + 1u) {
                            wv[i * 4u + j] = (f32((word >> (8u * j)) & 255u) - z) * s;
                        }
                    }
                }
                for (var tt = 0u; tt < tc; tt = tt + 1u) {
                    let xb = (t0 + tt) * kk + b * 32u;
                    var sacc = 0.0;
                    for (var j = 0u; j < 32u; j = j + 1u) { sacc = sacc + wv[j] * X[xb + j]; }
                    acc[tt] = acc[tt] + sacc;
                }
            }
        }
    }
    for (var tt = 0u; tt < 8u; tt = tt + 1u) { red[(r * 8u + tt) * 32u + lane] = acc[tt]; }
    workgroupBarrier();
    if (lid < 64u) {
        let rr = lid / 8u;
        let tt = lid % 8u;
        let nn = (wid.x + wid.y * nwg.x) * 8u + rr;
        if (nn < n_rows && tt < tc) {
            var s = 0.0;
            for (var l = 0u; l < 32u; l = l + 1u) { s = s + red[(rr * 8u + tt) * 32u + l]; }
            if (pu(5u) == 1u) { s = s + BIAS[pu(3u) + nn]; }
            let o = (t0 + tt) * pu(4u) + pu(3u) + nn;
            if (pu(6u) == 1u) { s = s + RES[o]; }
            O[o] = s;
        }
    }
}
