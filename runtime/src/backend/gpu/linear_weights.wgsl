// The weight encodings every linear kernel reads (compiled before linear.wgsl and linear_embed.wgsl):
// FORM 0 f32, 1 f16, 2 bf16, 3 int8 per row (S[n]), 4 4-bit blocks, 5 8-bit blocks of BLOCK elements
// (value = (q - Z[blk]) * S[blk]; GGUF's Q6_K halves are 8-bit blocks of 16); W holds the file's bytes
// as u32 words, one part's rows (codes in element order: 8 nibbles or 4 bytes a word, low first).
override FORM: u32 = 0u;
// Elements a block of the block forms: a power of two from 16 that divides K.
override BLOCK: u32 = 32u;

@group(0) @binding(2) var<storage, read> W: array<u32>;
@group(0) @binding(3) var<storage, read> S: array<f32>;
@group(0) @binding(4) var<storage, read> Z: array<f32>;

// Element k of row n of a part with rows of kk elements.
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
            let blk = e / BLOCK;
            let q = (W[e / 8u] >> (4u * (e % 8u))) & 15u;
            return (f32(q) - Z[blk]) * S[blk];
        }
        default: {
            let blk = e / BLOCK;
            let q = (W[e / 4u] >> (8u * (e % 4u))) & 255u;
            return (f32(q) - Z[blk]) * S[blk];
        }
    }
}

