// y[t, n0 + n] = sum_k x[t, k] * W[n, k] (+ bias[n]) (+ res[t, n0 + n]) for every weight encoding the
// exporter writes, decoded on the fly from the file's bytes (u32 words).
// A workgroup: ROWS output rows x 256/ROWS lanes, up to 8 tokens (z = token chunk). Lane l of a row takes
// the elements k = l, l + lanes, ...: each step covers whole blocks of 32 (block forms share scale/zero
// loads) and reads x coalesced; the 8 token accumulators are two vec4s (no private arrays). Few rows a
// workgroup keep each lane's dependent chain short (a decode GEMV is latency-bound).
// FORM: 0 f32, 1 f16, 2 bf16, 3 int8 per row (S[n]), 4 4-bit blocks of 32, 5 8-bit blocks of 32
// (value = (q - Z[blk]) * S[blk]). P[0]=N (rows in this part) P[1]=K P[2]=T P[3]=n0 P[4]=row stride
// of y P[5]=has bias P[6]=has residual.
override FORM: u32 = 0u;
// Output rows a workgroup computes (1, 2, 4 or 8); the 256 threads split into ROWS x (256 / ROWS) lanes.
override ROWS: u32 = 8u;

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<u32>;
@group(0) @binding(3) var<storage, read> S: array<f32>;
@group(0) @binding(4) var<storage, read> Z: array<f32>;
@group(0) @binding(5) var<storage, read> BIAS: array<f32>;
@group(0) @binding(6) var<storage, read> RES: array<f32>;
@group(0) @binding(7) var<storage, read_write> O: array<f32>;

var<workgroup> red: array<vec4<f32>, 512>;

fn w_at(n: u32, k: u32, kk: u32) -> f32 {
    let e = n * kk + k;
    switch FORM {
        case 0u: { return bitcast<f32>(W[e]); }
        case 1u: { return unpack2x16float(W[e / 2u])[e & 1u]; }
        case 2u: { return bitcast<f32>(((W[e / 2u] >> (16u * (e & 1u))) & 0xffffu) << 16u); }
        case 3u: {
            let byte = (W[e / 4u] >> (8u * (e & 3u))) & 0xffu;
            return f32(i32(byte << 24u) >> 24u) * S[n];
        }
        case 4u: {
            let blk = e / 32u;
            let j = k % 32u;
            let q = (W[blk * 4u + j / 8u] >> (4u * (j % 8u))) & 15u;
            return (f32(q) - Z[blk]) * S[blk];
        }
        default: {
            let blk = e / 32u;
            let j = k % 32u;
            let q = (W[blk * 8u + j / 4u] >> (8u * (j % 4u))) & 255u;
            return (f32(q) - Z[blk]) * S[blk];
        }
    }
}

@compute @workgroup_size(256)
fn linear(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let n_rows = pu(0u);
    let kk = pu(1u);
    let t_n = pu(2u);
    let lanes = 256u / ROWS;
    let r = lid / lanes;
    let lane = lid % lanes;
    let n = (wid.x + wid.y * nwg.x) * ROWS + r;
    let t0 = wid.z * 8u;
    let tc = min(8u, t_n - t0);
    // Rows of x for the 8 token slots (slots past the chunk re-read its last row; their sums are dropped).
    let x0 = (t0 + min(0u, tc - 1u)) * kk;
    let x1 = (t0 + min(1u, tc - 1u)) * kk;
    let x2 = (t0 + min(2u, tc - 1u)) * kk;
    let x3 = (t0 + min(3u, tc - 1u)) * kk;
    let x4 = (t0 + min(4u, tc - 1u)) * kk;
    let x5 = (t0 + min(5u, tc - 1u)) * kk;
    let x6 = (t0 + min(6u, tc - 1u)) * kk;
    let x7 = (t0 + min(7u, tc - 1u)) * kk;
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    if (n < n_rows) {
        if (tc == 1u) {
            var s = 0.0;
            for (var k = lane; k < kk; k = k + lanes) { s = s + w_at(n, k, kk) * X[x0 + k]; }
            a.x = s;
        } else if (tc <= 4u) {
            for (var k = lane; k < kk; k = k + lanes) {
                let w = w_at(n, k, kk);
                a = a + w * vec4<f32>(X[x0 + k], X[x1 + k], X[x2 + k], X[x3 + k]);
            }
        } else {
            for (var k = lane; k < kk; k = k + lanes) {
                let w = w_at(n, k, kk);
                a = a + w * vec4<f32>(X[x0 + k], X[x1 + k], X[x2 + k], X[x3 + k]);
                b = b + w * vec4<f32>(X[x4 + k], X[x5 + k], X[x6 + k], X[x7 + k]);
            }
        }
    }
    red[lid * 2u] = a;
    red[lid * 2u + 1u] = b;
    workgroupBarrier();
    // Tree over the lanes of each row.
    for (var w = lanes / 2u; w > 0u; w = w >> 1u) {
        if (lane < w) {
            red[lid * 2u] = red[lid * 2u] + red[(lid + w) * 2u];
            red[lid * 2u + 1u] = red[lid * 2u + 1u] + red[(lid + w) * 2u + 1u];
        }
        workgroupBarrier();
    }
    if (lane < tc && n < n_rows) {
        let base = r * lanes * 2u;
        var v: f32;
        if (lane < 4u) { v = red[base][lane]; } else { v = red[base + 1u][lane - 4u]; }
        if (pu(5u) == 1u) { v = v + BIAS[pu(3u) + n]; }
        let o = (t0 + lane) * pu(4u) + pu(3u) + n;
        if (pu(6u) == 1u) { v = v + RES[o]; }
        O[o] = v;
    }
}

// One output row an invocation, 64 rows a workgroup, the whole K walked serially: no shared memory, no
// barrier. For adapters that run invocations as CPU SIMD lanes (lavapipe, SwiftShader), where a barrier
// costs a coroutine switch and the lanes variant above is ~20x slower.
@compute @workgroup_size(64)
fn linear_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let n_rows = pu(0u);
    let kk = pu(1u);
    let t_n = pu(2u);
    let n = (wid.x + wid.y * nwg.x) * 64u + lid;
    let t0 = wid.z * 8u;
    let tc = min(8u, t_n - t0);
    if (n >= n_rows) { return; }
    if (tc == 1u) {
        // Decode: one token, the block forms decoded a word at a time.
        let x = t0 * kk;
        var s = 0.0;
        if (FORM == 4u && kk % 32u == 0u) {
            let nb = kk / 32u;
            for (var b = 0u; b < nb; b = b + 1u) {
                let blk = n * nb + b;
                let sc = S[blk];
                let z = Z[blk];
                var bs = 0.0;
                var xs = 0.0;
                for (var q = 0u; q < 4u; q = q + 1u) {
                    let word = W[blk * 4u + q];
                    let xb = x + b * 32u + q * 8u;
                    for (var j = 0u; j < 8u; j = j + 1u) {
                        let xv = X[xb + j];
                        bs = bs + f32((word >> (4u * j)) & 15u) * xv;
                        xs = xs + xv;
                    }
                }
                s = s + (bs - z * xs) * sc;
            }
        } else if (FORM == 5u && kk % 32u == 0u) {
            let nb = kk / 32u;
            for (var b = 0u; b < nb; b = b + 1u) {
                let blk = n * nb + b;
                var bs = 0.0;
                var xs = 0.0;
                for (var q = 0u; q < 8u; q = q + 1u) {
                    let word = W[blk * 8u + q];
                    let xb = x + b * 32u + q * 4u;
                    for (var j = 0u; j < 4u; j = j + 1u) {
                        let xv = X[xb + j];
                        bs = bs + f32((word >> (8u * j)) & 255u) * xv;
                        xs = xs + xv;
                    }
                }
                s = s + (bs - Z[blk] * xs) * S[blk];
            }
        } else {
            for (var k = 0u; k < kk; k = k + 1u) { s = s + w_at(n, k, kk) * X[x + k]; }
        }
        if (pu(5u) == 1u) { s = s + BIAS[pu(3u) + n]; }
        let o = t0 * pu(4u) + pu(3u) + n;
        if (pu(6u) == 1u) { s = s + RES[o]; }
        O[o] = s;
        return;
    }
    // Prefill: up to 8 tokens, two vec4 accumulators (no dynamically indexed private array).
    let x0 = t0 * kk;
    let x1 = (t0 + min(1u, tc - 1u)) * kk;
    let x2 = (t0 + min(2u, tc - 1u)) * kk;
    let x3 = (t0 + min(3u, tc - 1u)) * kk;
    let x4 = (t0 + min(4u, tc - 1u)) * kk;
    let x5 = (t0 + min(5u, tc - 1u)) * kk;
    let x6 = (t0 + min(6u, tc - 1u)) * kk;
    let x7 = (t0 + min(7u, tc - 1u)) * kk;
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    if (FORM == 4u && kk % 32u == 0u) {
        let nb = kk / 32u;
        for (var bl = 0u; bl < nb; bl = bl + 1u) {
            let blk = n * nb + bl;
            let sc = S[blk];
            let z = Z[blk];
            for (var q = 0u; q < 4u; q = q + 1u) {
                let word = W[blk * 4u + q];
                for (var j = 0u; j < 8u; j = j + 1u) {
                    let k = bl * 32u + q * 8u + j;
                    let w = (f32((word >> (4u * j)) & 15u) - z) * sc;
                    a = a + w * vec4<f32>(X[x0 + k], X[x1 + k], X[x2 + k], X[x3 + k]);
                    b = b + w * vec4<f32>(X[x4 + k], X[x5 + k], X[x6 + k], X[x7 + k]);
                }
            }
        }
    } else {
        for (var k = 0u; k < kk; k = k + 1u) {
            let w = w_at(n, k, kk);
            a = a + w * vec4<f32>(X[x0 + k], X[x1 + k], X[x2 + k], X[x3 + k]);
            b = b + w * vec4<f32>(X[x4 + k], X[x5 + k], X[x6 + k], X[x7 + k]);
        }
    }
    for (var t = 0u; t < tc; t = t + 1u) {
        var v: f32;
        if (t < 4u) { v = a[t]; } else { v = b[t - 4u]; }
        if (pu(5u) == 1u) { v = v + BIAS[pu(3u) + n]; }
        let o = (t0 + t) * pu(4u) + pu(3u) + n;
        if (pu(6u) == 1u) { v = v + RES[o]; }
        O[o] = v;
    }
}
