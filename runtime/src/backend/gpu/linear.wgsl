// y[t, n0 + n] = sum_k x[t, k] * W[n, k] (+ bias[n]) (+ res[t, n0 + n]) for every weight encoding the
// exporter writes, decoded on the fly from the file's bytes (u32 words).
// A workgroup: ROWS output rows x 256/ROWS lanes, up to 8 tokens (z = token chunk). Lane l of a row takes
// the elements k = l, l + lanes, ...: each step covers whole blocks (block forms share scale/zero
// loads) and reads x coalesced; the 8 token accumulators are two vec4s (no private arrays). Few rows a
// workgroup keep each lane's dependent chain short (a decode GEMV is latency-bound).
// FORM: the encoding (linear_weights.wgsl, compiled before this file). P[0]=N (rows in this part)
// P[1]=K P[2]=T P[3]=n0 P[4]=row stride of y P[5]=has bias P[6]=has residual.
// Fused forms (several linear layers of one input as one dispatch over their concatenated rows; 4 tokens
// a workgroup): MODE 0 one output; 1 parts: row n of part p (rows P[11+2p-2]..P[11+2p], the first
// from 0) goes to O[P[12+2p] + t * rows_p + n - first_p]; 2 and 3 gate pairs: rows n and N + n give
// O[t * N + n] = act(a) * b, act SiLU (2) or GELU-tanh (3). NORM: x is RMS-normalized on the way (AUX = the norm's scale, one per k;
// the 1/rms factor is applied to the sums, the scale to x). P[7], P[8]: MODE and NORM (as the pipeline
// has them) P[9]=epsilon (f32) P[10]=parts.
// Output rows a workgroup computes (1, 2, 4 or 8); the 256 threads split into ROWS x (256 / ROWS) lanes.
override ROWS: u32 = 8u;
// The fused forms (below): MODE 0 one output, 1 parts, 2 SiLU pair, 3 GELU-tanh pair; NORM: x is
// RMS-normalized on the way.
// Pipeline constants, not parameters: llvmpipe runs a kernel 5x slower for a heavy loop behind a runtime
// branch it never takes.
override MODE: u32 = 0u;
override NORM: bool = false;

@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(5) var<storage, read> BIAS: array<f32>;
// The residual (mode 0), or the RMS norm's scale when P[8] = 1.
@group(0) @binding(6) var<storage, read> AUX: array<f32>;
@group(0) @binding(7) var<storage, read_write> O: array<f32>;

var<workgroup> red: array<vec4<f32>, 512>;

// Where output row n (of the concatenated rows) for token t goes (modes 0 and 1).
fn out_at(n: u32, t: u32) -> u32 {
    if (MODE != 1u) { return t * pu(4u) + pu(3u) + n; }
    var first = 0u;
    var p = 0u;
    for (; p + 1u < pu(10u); p = p + 1u) {
        let end = pu(11u + 2u * p);
        if (n < end) { break; }
        first = end;
    }
    return pu(12u + 2u * p) + t * (pu(11u + 2u * p) - first) + n - first;
}

// 1 / rms of a row of x from its sum of squares.
fn inv_rms(sq: f32) -> f32 {
    return inverseSqrt(sq / f32(pu(1u)) + pf(9u));
}

// A gate pair's output: SiLU(a)·b (MODE 2) or GELU-tanh(a)·b (MODE 3), the latter as the CPU has it:
// 0.5·a·(1 + tanh y) = a·sigmoid(2y), y = √(2/π)·(a + 0.044715·a³) (an infinite exp gives −0, not NaN).
fn gate_mul(a: f32, b: f32) -> f32 {
    if (MODE == 3u) {
        let y = 0.7978846 * (a + 0.044715 * a * a * a);
        return a / (1.0 + exp(-2.0 * y)) * b;
    }
    return a / (1.0 + exp(-a)) * b;
}

// Lane `lane` of `lanes`' share of row n's sums over k = lane, lane + lanes, ... for the chunk's tokens
// t0..t0+tc: a = tokens 0..3 and b = 4..7, or with NORM a = tokens 0..3 and b = their sums of squares of x
// (every row's lanes see all of x). Token slots past the chunk re-read its last row; their sums are
// dropped. Each step covers whole blocks of 32 for block forms and reads x coalesced.
struct Sums { a: vec4<f32>, b: vec4<f32> }

// Where the rows of x of tokens t0..t0+8 start (a: the first four, b: the next four); slots past the
// chunk's tc tokens repeat its last row.
struct XRows { a: vec4<u32>, b: vec4<u32> }

fn x_rows(t0: u32, tc: u32) -> XRows {
    let kk = pu(1u);
    let t = vec4<u32>(t0) + min(vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(tc - 1u));
    let u = vec4<u32>(t0) + min(vec4<u32>(4u, 5u, 6u, 7u), vec4<u32>(tc - 1u));
    return XRows(t * kk, u * kk);
}

// Element k of the four rows of x starting at o.
fn x_at4(o: vec4<u32>, k: u32) -> vec4<f32> {
    return vec4<f32>(X[o.x + k], X[o.y + k], X[o.z + k], X[o.w + k]);
}

fn lane_sums(n: u32, lane: u32, lanes: u32, t0: u32, tc: u32) -> Sums {
    let kk = pu(1u);
    let o = x_rows(t0, tc);
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    if (NORM) {
        for (var k = lane; k < kk; k = k + lanes) {
            let xv = x_at4(o.a, k);
            b = b + xv * xv;
            a = a + w_at(n, k, kk) * AUX[k] * xv;
        }
    } else if (tc == 1u) {
        var s = 0.0;
        for (var k = lane; k < kk; k = k + lanes) { s = s + w_at(n, k, kk) * X[o.a.x + k]; }
        a.x = s;
    } else if (tc <= 4u) {
        for (var k = lane; k < kk; k = k + lanes) { a = a + w_at(n, k, kk) * x_at4(o.a, k); }
    } else {
        for (var k = lane; k < kk; k = k + lanes) {
            let w = w_at(n, k, kk);
            a = a + w * x_at4(o.a, k);
            b = b + w * x_at4(o.b, k);
        }
    }
    return Sums(a, b);
}

@compute @workgroup_size(256)
fn linear(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let n_rows = pu(0u);
    let t_n = pu(2u);
    let pair = MODE >= 2u;
    let nrm = NORM;
    let fused = pair || nrm || MODE == 1u;
    let lanes = 256u / ROWS;
    let r = lid / lanes;
    let lane = lid % lanes;
    let wg = wid.x + wid.y * nwg.x;
    // Pair mode: the first ROWS/2 rows are a-rows, the others the matching b-rows (N further on).
    let half = max(ROWS / 2u, 1u);
    var item = wg * ROWS + r;
    var n = item;
    if (pair) {
        item = wg * half + r % half;
        n = item + (r / half) * n_rows;
    }
    let tpw = select(8u, 4u, fused);
    let t0 = wid.z * tpw;
    let tc = min(tpw, t_n - t0);
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    if (item < n_rows) {
        let s = lane_sums(n, lane, lanes, t0, tc);
        a = s.a;
        b = s.b;
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
    if (lane >= tc || item >= n_rows || (pair && r >= half)) { return; }
    let base = r * lanes * 2u;
    var v: f32;
    if (lane < 4u) { v = red[base][lane]; } else { v = red[base + 1u][lane - 4u]; }
    if (nrm) { v = v * inv_rms(red[base + 1u][lane]); }
    if (pu(5u) == 1u) { v = v + BIAS[pu(3u) + n]; }
    if (pair) {
        let bb = (r + half) * lanes * 2u;
        var u = red[bb][lane];
        if (nrm) { u = u * inv_rms(red[bb + 1u][lane]); }
        if (pu(5u) == 1u) { u = u + BIAS[pu(3u) + n + n_rows]; }
        O[(t0 + lane) * n_rows + item] = gate_mul(v, u);
        return;
    }
    let o = out_at(n, t0 + lane);
    if (pu(6u) == 1u) { v = v + AUX[o]; }
    O[o] = v;
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
        if (FORM == 4u) {
            let nb = kk / BLOCK;
            let words = BLOCK / 8u;
            for (var b = 0u; b < nb; b = b + 1u) {
                let blk = n * nb + b;
                let sc = S[blk];
                let z = Z[blk];
                var bs = 0.0;
                var xs = 0.0;
                for (var q = 0u; q < words; q = q + 1u) {
                    let word = W[blk * words + q];
                    let xb = x + b * BLOCK + q * 8u;
                    for (var j = 0u; j < 8u; j = j + 1u) {
                        let xv = X[xb + j];
                        bs = bs + f32((word >> (4u * j)) & 15u) * xv;
                        xs = xs + xv;
                    }
                }
                s = s + (bs - z * xs) * sc;
            }
        } else if (FORM == 5u) {
            let nb = kk / BLOCK;
            let words = BLOCK / 4u;
            for (var b = 0u; b < nb; b = b + 1u) {
                let blk = n * nb + b;
                var bs = 0.0;
                var xs = 0.0;
                for (var q = 0u; q < words; q = q + 1u) {
                    let word = W[blk * words + q];
                    let xb = x + b * BLOCK + q * 4u;
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
        if (pu(6u) == 1u) { s = s + AUX[o]; }
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
    if (FORM == 4u) {
        let nb = kk / BLOCK;
        let words = BLOCK / 8u;
        for (var bl = 0u; bl < nb; bl = bl + 1u) {
            let blk = n * nb + bl;
            let sc = S[blk];
            let z = Z[blk];
            for (var q = 0u; q < words; q = q + 1u) {
                let word = W[blk * words + q];
                for (var j = 0u; j < 8u; j = j + 1u) {
                    let k = bl * BLOCK + q * 8u + j;
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
        if (pu(6u) == 1u) { v = v + AUX[o]; }
        O[o] = v;
    }
}

// Sums of row n of W with up to 4 tokens of x (rows x0..x3), x scaled by AUX when `nrm`: (dot products,
// sums of squares of the tokens' x). One token: only the x components count.
struct Acc4 {
    d: vec4<f32>,
    q: vec4<f32>,
}

fn acc4(n: u32, kk: u32, x0: u32, x1: u32, x2: u32, x3: u32, nrm: bool) -> Acc4 {
    var d = vec4<f32>(0.0);
    var q = vec4<f32>(0.0);
    if (FORM == 4u) {
        let nb = kk / BLOCK;
        let words = BLOCK / 8u;
        for (var bl = 0u; bl < nb; bl = bl + 1u) {
            let blk = n * nb + bl;
            var bs = vec4<f32>(0.0);
            var xs = vec4<f32>(0.0);
            for (var w = 0u; w < words; w = w + 1u) {
                let word = W[blk * words + w];
                for (var j = 0u; j < 8u; j = j + 1u) {
                    let k = bl * BLOCK + w * 8u + j;
                    var xv = vec4<f32>(X[x0 + k], X[x1 + k], X[x2 + k], X[x3 + k]);
                    if (nrm) {
                        q = q + xv * xv;
                        xv = xv * AUX[k];
                    }
                    bs = bs + f32((word >> (4u * j)) & 15u) * xv;
                    xs = xs + xv;
                }
            }
            d = d + (bs - Z[blk] * xs) * S[blk];
        }
    } else {
        for (var k = 0u; k < kk; k = k + 1u) {
            var xv = vec4<f32>(X[x0 + k], X[x1 + k], X[x2 + k], X[x3 + k]);
            if (nrm) {
                q = q + xv * xv;
                xv = xv * AUX[k];
            }
            d = d + w_at(n, k, kk) * xv;
        }
    }
    return Acc4(d, q);
}

// The same for one token: (dot product of row n, of row n2 (gate pairs only), sum of squares). Both rows
// of a pair in one pass share the loads of x.
fn acc1(n: u32, n2: u32, kk: u32, x: u32, nrm: bool) -> vec3<f32> {
    let two = MODE >= 2u;
    var s = 0.0;
    var s2 = 0.0;
    var q = 0.0;
    if (FORM == 4u || FORM == 5u) {
        // Blocks: 4-bit (words of 8 values) or 8-bit (words of 4 values).
        let bits = select(8u, 4u, FORM == 4u);
        let per = 32u / bits;
        let words = BLOCK / per;
        let mask = (1u << bits) - 1u;
        let nb = kk / BLOCK;
        for (var b = 0u; b < nb; b = b + 1u) {
            let blk = n * nb + b;
            let blk2 = n2 * nb + b;
            var bs = 0.0;
            var bs2 = 0.0;
            var xs = 0.0;
            for (var w = 0u; w < words; w = w + 1u) {
                let word = W[blk * words + w];
                var word2 = 0u;
                if (two) { word2 = W[blk2 * words + w]; }
                let k0 = b * BLOCK + w * per;
                for (var j = 0u; j < per; j = j + 1u) {
                    var xv = X[x + k0 + j];
                    if (nrm) {
                        q = q + xv * xv;
                        xv = xv * AUX[k0 + j];
                    }
                    bs = bs + f32((word >> (bits * j)) & mask) * xv;
                    if (two) { bs2 = bs2 + f32((word2 >> (bits * j)) & mask) * xv; }
                    xs = xs + xv;
                }
            }
            s = s + (bs - Z[blk] * xs) * S[blk];
            if (two) { s2 = s2 + (bs2 - Z[blk2] * xs) * S[blk2]; }
        }
    } else {
        for (var k = 0u; k < kk; k = k + 1u) {
            var xv = X[x + k];
            if (nrm) {
                q = q + xv * xv;
                xv = xv * AUX[k];
            }
            s = s + w_at(n, k, kk) * xv;
            if (two) { s2 = s2 + w_at(n2, k, kk) * xv; }
        }
    }
    return vec3<f32>(s, s2, q);
}

// The fused forms (MODE, NORM) one item an invocation (an output row, or an a/b pair of
// rows), 64 a workgroup: the variants for CPU adapters. `linear_rows_fused` takes one token (decode),
// `linear_rows_fused4` up to 4 a workgroup (z = token chunk). Two entry points, because llvmpipe runs a
// kernel slower for code it skips (the decode path was 5x slower with the prefill path behind a return).
@compute @workgroup_size(64)
fn linear_rows_fused(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let n_rows = pu(0u);
    let kk = pu(1u);
    let pair = MODE >= 2u;
    let nrm = NORM;
    let item = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (item >= n_rows) { return; }
    let a = acc1(item, item + n_rows, kk, 0u, nrm);
    emit(item, 0u, a.x, a.z, a.y, pair, nrm);
}

@compute @workgroup_size(64)
fn linear_rows_fused4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let n_rows = pu(0u);
    let kk = pu(1u);
    let t_n = pu(2u);
    let pair = MODE >= 2u;
    let nrm = NORM;
    let item = (wid.x + wid.y * nwg.x) * 64u + lid;
    let t0 = wid.z * 4u;
    let tc = min(4u, t_n - t0);
    if (item >= n_rows) { return; }
    let x0 = t0 * kk;
    let x1 = (t0 + min(1u, tc - 1u)) * kk;
    let x2 = (t0 + min(2u, tc - 1u)) * kk;
    let x3 = (t0 + min(3u, tc - 1u)) * kk;
    let a = acc4(item, kk, x0, x1, x2, x3, nrm);
    var du = vec4<f32>(0.0);
    if (pair) { du = acc4(item + n_rows, kk, x0, x1, x2, x3, nrm).d; }
    // Tokens unrolled: a dynamically indexed vector costs llvmpipe a trip through memory.
    emit(item, t0, a.d.x, a.q.x, du.x, pair, nrm);
    if (tc > 1u) { emit(item, t0 + 1u, a.d.y, a.q.y, du.y, pair, nrm); }
    if (tc > 2u) { emit(item, t0 + 2u, a.d.z, a.q.z, du.z, pair, nrm); }
    if (tc > 3u) { emit(item, t0 + 3u, a.d.w, a.q.w, du.w, pair, nrm); }
}

// The epilogue of one token (`linear_rows_fused*`, `linear_sg`): norm factor, bias, gate pair, or part
// placement and the residual.
fn emit(item: u32, t: u32, dot: f32, sq: f32, dot_b: f32, pair: bool, nrm: bool) {
    let n_rows = pu(0u);
    var v = dot;
    if (nrm) { v = v * inv_rms(sq); }
    if (pu(5u) == 1u) { v = v + BIAS[pu(3u) + item]; }
    if (pair) {
        var u = dot_b;
        if (nrm) { u = u * inv_rms(sq); }
        if (pu(5u) == 1u) { u = u + BIAS[pu(3u) + item + n_rows]; }
        O[t * n_rows + item] = gate_mul(v, u);
    } else {
        let o = out_at(item, t);
        if (pu(6u) == 1u) { v = v + AUX[o]; }
        O[o] = v;
    }
}
