// Elementwise kernels over f32 (f16 stored two per u32 word). 256 threads a workgroup; the linear
// index is wid.x + wid.y * nwg.x (see `grid`).
//
// binary:  out[i] = op(a[ia], b[ib]) with broadcasting: P[0]=n P[1]=op P[2]=rank, P[3..9]=out dims,
//          P[9..15]=a strides, P[15..21]=b strides (0 on broadcast axes). op: 0 add 1 sub 2 mul 3 div.
// unary:   P[0]=n P[1]=op (0 sigmoid, 1 copy, 2 neg, 3 silu, 4 round through f16, 5 tanh,
//          6 gelu with the tanh approximation, 7 exact gelu: erf by Abramowitz-Stegun 7.1.26,
//          |error| <= 1.5e-7).
// gate:    out = act(g) * u, P[0]=n P[1]=act (0 silu, 1 gelu with the tanh approximation).
// cast_to_f16: out words = pack(a[2w], a[2w+1]), P[0]=n elements.  cast_from_f16: P[0]=n.
// transpose32: P[0]=n P[1]=rank P[2..8]=out dims P[8..14]=input strides in out-axis order.
// transpose16: same on f16 elements, one output word (two elements) a thread.
// gather_rows: out row r = data row idx[r] (i64 as lo/hi words): P[0]=rows P[1]=words a row P[2]=data rows.
//   An index outside the data gives a row of zeros (the host checks indices it knows; an index a
//   kernel wrote, e.g. a token fed back from the token choice, is in range by construction).
// gather_bytes: the same for rows of any byte length (one output word a thread): P[1]=bytes a row.
// cast_from_u8 / cast_from_i8: byte elements (four a word, little-endian) to f32: P[0]=n.

@group(0) @binding(1) var<storage, read> A: array<u32>;
@group(0) @binding(2) var<storage, read> B: array<u32>;
@group(0) @binding(3) var<storage, read_write> O: array<u32>;

fn lin(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 { return (wid.x + wid.y * nwg.x) * 256u + lid; }
fn fa(i: u32) -> f32 { return bitcast<f32>(A[i]); }
fn fb(i: u32) -> f32 { return bitcast<f32>(B[i]); }
fn sigmoid(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }
// tanh as the prelude's soft cap at 1 (through exp of a non-positive argument).
fn tanh_(x: f32) -> f32 { return soft_cap(x, 1.0); }
fn gelu_tanh(x: f32) -> f32 { return 0.5 * x * (1.0 + tanh_(0.7978846 * (x + 0.044715 * x * x * x))); }
fn erf_(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let p = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t;
    return sign(x) * (1.0 - p * exp(-z * z));
}
fn gelu_erf(x: f32) -> f32 { return 0.5 * x * (1.0 + erf_(x * 0.70710678)); }

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = lin(wid, nwg, lid);
    if (i >= pu(0u)) { return; }
    let rank = pu(2u);
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(rank) - 1; d >= 0; d = d - 1) {
        let dim = pu(3u + u32(d));
        let c = rem % dim;
        rem = rem / dim;
        ia = ia + c * pu(9u + u32(d));
        ib = ib + c * pu(15u + u32(d));
    }
    let x = fa(ia);
    let y = fb(ib);
    var r: f32;
    switch pu(1u) {
        case 0u: { r = x + y; }
        case 1u: { r = x - y; }
        case 2u: { r = x * y; }
        default: { r = x / y; }
    }
    O[i] = bitcast<u32>(r);
}

@compute @workgroup_size(256)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = lin(wid, nwg, lid);
    if (i >= pu(0u)) { return; }
    let x = fa(i);
    var r: f32;
    switch pu(1u) {
        case 0u: { r = sigmoid(x); }
        case 2u: { r = -x; }
        case 5u: { r = tanh_(x); }
        case 6u: { r = gelu_tanh(x); }
        case 7u: { r = gelu_erf(x); }
        default: { r = f16_at(pack_f16(x, 0.0), false); }
    }
    O[i] = bitcast<u32>(r);
}

@compute @workgroup_size(256)
fn gate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = lin(wid, nwg, lid);
    if (i >= pu(0u)) { return; }
    let g = fa(i);
    var a: f32;
    if (pu(1u) == 0u) { a = g / (1.0 + exp(-g)); } else { a = gelu_tanh(g); }
    O[i] = bitcast<u32>(a * fb(i));
}

@compute @workgroup_size(256)
fn cast_to_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let w = lin(wid, nwg, lid);
    let n = pu(0u);
    if (2u * w >= n) { return; }
    var hi = 0.0;
    if (2u * w + 1u < n) { hi = fa(2u * w + 1u); }
    O[w] = pack_f16(fa(2u * w), hi);
}

@compute @workgroup_size(256)
fn cast_from_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = lin(wid, nwg, lid);
    if (i >= pu(0u)) { return; }
    O[i] = bitcast<u32>(f16_at(A[i / 2u], (i & 1u) == 1u));
}

fn src_index(i: u32) -> u32 {
    let rank = pu(1u);
    var rem = i;
    var src = 0u;
    for (var d = i32(rank) - 1; d >= 0; d = d - 1) {
        let dim = pu(2u + u32(d));
        src = src + (rem % dim) * pu(8u + u32(d));
        rem = rem / dim;
    }
    return src;
}

@compute @workgroup_size(256)
fn transpose32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = lin(wid, nwg, lid);
    if (i >= pu(0u)) { return; }
    O[i] = A[src_index(i)];
}

fn half_bits(e: u32) -> u32 { return (A[e / 2u] >> (16u * (e & 1u))) & 0xffffu; }

@compute @workgroup_size(256)
fn transpose16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let w = lin(wid, nwg, lid);
    let n = pu(0u);
    if (2u * w >= n) { return; }
    var v = half_bits(src_index(2u * w));
    if (2u * w + 1u < n) { v = v | (half_bits(src_index(2u * w + 1u)) << 16u); }
    O[w] = v;
}

@compute @workgroup_size(256)
fn gather_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = lin(wid, nwg, lid);
    let words = pu(1u);
    if (i >= pu(0u) * words) { return; }
    let r = i / words;
    let c = i % words;
    O[i] = 0u;
    let row = gather_row(r);
    if (row < 0) { return; }
    O[i] = A[u32(row) * words + c];
}

// Index r's row (negative counts from the end), or -1 when outside the data.
fn gather_row(r: u32) -> i32 {
    let lo = B[2u * r];
    let hi = B[2u * r + 1u];
    let rows = pu(2u);
    if (hi == 0u && lo < rows) { return i32(lo); }
    if (hi == 0xffffffffu && lo >= 0x80000000u && 0u - lo <= rows) { return i32(rows - (0u - lo)); }
    return -1;
}

@compute @workgroup_size(256)
fn gather_bytes(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let w = lin(wid, nwg, lid);
    let rb = pu(1u);
    let total = pu(0u) * rb;
    if (4u * w >= total) { return; }
    var word = 0u;
    for (var k = 0u; k < 4u; k = k + 1u) {
        let ob = 4u * w + k;
        if (ob >= total) { break; }
        let row = gather_row(ob / rb);
        if (row < 0) { continue; }
        let at = u32(row) * rb + ob % rb;
        word = word | (((A[at / 4u] >> (8u * (at % 4u))) & 0xffu) << (8u * k));
    }
    O[w] = word;
}

@compute @workgroup_size(256)
fn cast_from_u8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = lin(wid, nwg, lid);
    if (i >= pu(0u)) { return; }
    O[i] = bitcast<u32>(f32((A[i / 4u] >> (8u * (i % 4u))) & 0xffu));
}

@compute @workgroup_size(256)
fn cast_from_i8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = lin(wid, nwg, lid);
    if (i >= pu(0u)) { return; }
    // Shift the byte to the top, then arithmetic-shift back: sign extension.
    O[i] = bitcast<u32>(f32(bitcast<i32>(A[i / 4u] << (24u - 8u * (i % 4u))) >> 24u));
}
