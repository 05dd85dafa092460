//! Elementwise kernels (`elementwise.wgsl`): broadcast binary ops, unary ops, the fused SiLU gate,
//! f32↔f16 casts (round to nearest even, bit-identical to the CPU's `half`), transposes and row gathers.
//!
//! Every kernel binds `A` (read), `B` (read; a dummy where unused) and `O` (write) and runs 256
//! threads a workgroup over a 2-D grid ([`super::grid`]).

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::{DeviceFault, Error, Result};

/// The WGSL of this family (with the shared f16 helpers).
pub const SOURCE: &str = concat!(include_str!("f16.wgsl"), include_str!("elementwise.wgsl"));
const BINDS: &[Bind] = &[Bind::Read, Bind::Read, Bind::Write];
/// Largest rank the broadcast/transpose kernels index.
pub const MAX_RANK: usize = 6;

/// Binary op codes of the `binary` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `a + b`.
    Add = 0,
    /// `a - b`.
    Sub = 1,
    /// `a * b`.
    Mul = 2,
    /// `a / b`.
    Div = 3,
}

impl BinOp {
    /// The op for an ONNX op type.
    pub fn from_onnx(op: &str) -> Option<BinOp> {
        Some(match op {
            "Add" => BinOp::Add,
            "Sub" => BinOp::Sub,
            "Mul" => BinOp::Mul,
            "Div" => BinOp::Div,
            _ => return None,
        })
    }
}

/// Unary op codes of the `unary` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    /// `1 / (1 + e^-x)`.
    Sigmoid = 0,
    /// `-x`.
    Neg = 2,
    /// `f32(f16(x))`, round to nearest even: `Cast(Cast(x, f16), f32)` in one pass.
    RoundF16 = 4,
    /// `tanh(x)`.
    Tanh = 5,
    /// `GELU(x)` with the tanh approximation.
    GeluTanh = 6,
    /// Exact `GELU(x) = x·Φ(x)`, `erf` within 1.5e-7 (Abramowitz and Stegun 7.1.26).
    GeluErf = 7,
}

/// The kernel for `entry` of this family.
pub fn kernel(ctx: &GpuContext, entry: &str) -> Result<Arc<Kernel>> {
    ctx.pipeline("elementwise", SOURCE, entry, BINDS, &[])
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Parameters of `binary` for inputs of shapes `a`, `b` broadcast to `out`.
pub fn binary_params(op: BinOp, a: &[usize], b: &[usize], out: &[usize]) -> Result<Params> {
    if out.len() > MAX_RANK {
        return Err(Error::device(
            DeviceFault::Unsupported,
            format!("binary op on rank {} (max {MAX_RANK})", out.len()),
        ));
    }
    let bstr = |s: &[usize]| -> Vec<usize> {
        let pad = out.len() - s.len();
        let st = strides(s);
        (0..out.len())
            .map(|d| {
                if d < pad || s[d - pad] == 1 {
                    0
                } else {
                    st[d - pad]
                }
            })
            .collect()
    };
    let n: usize = out.iter().product();
    let mut p = Params::new().u(n).u(op as usize).u(out.len());
    let (sa, sb) = (bstr(a), bstr(b));
    for d in 0..MAX_RANK {
        p = p.set(3 + d, *out.get(d).unwrap_or(&1) as u32);
        p = p.set(9 + d, *sa.get(d).unwrap_or(&0) as u32);
        p = p.set(15 + d, *sb.get(d).unwrap_or(&0) as u32);
    }
    Ok(p)
}

/// Parameters of `transpose32`/`transpose16` for `shape` permuted by `perm`.
pub fn transpose_params(shape: &[usize], perm: &[usize]) -> Result<Params> {
    if shape.len() > MAX_RANK || perm.len() != shape.len() {
        return Err(Error::device(
            DeviceFault::Unsupported,
            format!("transpose of rank {} (max {MAX_RANK})", shape.len()),
        ));
    }
    let st = strides(shape);
    let n: usize = shape.iter().product();
    let mut p = Params::new().u(n).u(shape.len());
    for d in 0..MAX_RANK {
        let (dim, s) = match perm.get(d) {
            Some(&a) => (shape[a], st[a]),
            None => (1, 0),
        };
        p = p.set(2 + d, dim as u32).set(8 + d, s as u32);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{ctx, max_rel, noise};
    use super::super::{exec::run_kernel_once, grid};
    use super::*;
    use half::f16;

    fn words(v: &[f32]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[test]
    fn binary_broadcast_matches_cpu() {
        let Some(ctx) = ctx() else { return };
        let cases: &[(&[usize], &[usize])] = &[
            (&[7, 5], &[7, 5]),
            (&[3, 1, 4], &[5, 1]),
            (&[1], &[2, 3, 65]),
            (&[2, 3, 4, 5, 2, 3], &[3, 1, 1, 2, 1]),
            (&[1000], &[1]),
        ];
        for (ci, (sa, sb)) in cases.iter().enumerate() {
            let out = crate::backend::cpu::ops::broadcast_shape(sa, sb).unwrap();
            let a = noise(sa.iter().product(), ci as u64);
            let b: Vec<f32> = noise(sb.iter().product(), 99 + ci as u64)
                .iter()
                .map(|x| x + 2.5)
                .collect();
            for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
                let k = kernel(&ctx, "binary").unwrap();
                let p = binary_params(op, sa, sb, &out).unwrap();
                let n: usize = out.iter().product();
                let got = run_kernel_once(
                    &ctx,
                    &k,
                    &p,
                    &[&words(&a), &words(&b)],
                    n * 4,
                    grid(n, 256, ctx.max_groups),
                )
                .unwrap();
                let got: &[f32] = bytemuck::cast_slice(&got);
                // CPU reference: index by broadcasting.
                let (so, sa2, sb2) = (strides(&out), strides(sa), strides(sb));
                let want: Vec<f32> = (0..n)
                    .map(|i| {
                        let idx = |s: &[usize], st: &[usize]| {
                            let pad = out.len() - s.len();
                            (0..s.len())
                                .map(|d| {
                                    if s[d] == 1 {
                                        0
                                    } else {
                                        (i / so[d + pad]) % out[d + pad] * st[d]
                                    }
                                })
                                .sum::<usize>()
                        };
                        let (x, y) = (a[idx(sa, &sa2)], b[idx(sb, &sb2)]);
                        match op {
                            BinOp::Add => x + y,
                            BinOp::Sub => x - y,
                            BinOp::Mul => x * y,
                            BinOp::Div => x / y,
                        }
                    })
                    .collect();
                assert!(max_rel(got, &want) < 1e-6, "{op:?} {sa:?} {sb:?}");
            }
        }
    }

    #[test]
    fn casts_are_bit_exact_with_half() {
        let Some(ctx) = ctx() else { return };
        // Values around every rounding boundary: normals, subnormals, overflow, ties.
        let mut v: Vec<f32> = noise(4097, 5).iter().map(|x| x * 70000.0).collect();
        v.extend(noise(1000, 6).iter().map(|x| x * 1e-5));
        v.extend([
            65504.0,
            65520.0,
            65519.99,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            -0.0,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
        ]);
        v.extend([f32::INFINITY, f32::NEG_INFINITY]);
        let n = v.len();
        let k = kernel(&ctx, "cast_to_f16").unwrap();
        let got = run_kernel_once(
            &ctx,
            &k,
            &Params::new().u(n),
            &[&words(&v), &[0; 4]],
            n.div_ceil(2) * 4,
            grid(n.div_ceil(2), 256, ctx.max_groups),
        )
        .unwrap();
        let got: &[u16] = bytemuck::cast_slice(&got);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(got[i], f16::from_f32(*x).to_bits(), "value {x:e}");
        }
        let k = kernel(&ctx, "cast_from_f16").unwrap();
        let back = run_kernel_once(
            &ctx,
            &k,
            &Params::new().u(n),
            &[bytemuck::cast_slice(&got[..n + n % 2]), &[0; 4]],
            n * 4,
            grid(n, 256, ctx.max_groups),
        )
        .unwrap();
        let back: &[f32] = bytemuck::cast_slice(&back);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(back[i].to_bits(), f16::from_f32(*x).to_f32().to_bits());
        }
    }

    #[test]
    fn transpose_and_gather_match_cpu() {
        let Some(ctx) = ctx() else { return };
        for (shape, perm) in [
            (vec![1, 5, 3, 8], vec![0, 2, 1, 3]),
            (vec![4, 7], vec![1, 0]),
            (vec![2, 3, 4, 5], vec![3, 1, 0, 2]),
        ] {
            let x = noise(shape.iter().product(), 3);
            let t = crate::tensor::Tensor::f32(&shape, &x);
            let node = crate::graph::Node {
                name: "t".into(),
                op: "Transpose".into(),
                domain: String::new(),
                inputs: vec!["x".into()],
                outputs: vec!["y".into()],
                attrs: [(
                    "perm".to_string(),
                    crate::graph::Attr::Ints(perm.iter().map(|&p| p as i64).collect()),
                )]
                .into_iter()
                .collect(),
            };
            let want = crate::backend::cpu::ops::run_node(&node, &[Some(&t)])
                .unwrap()
                .remove(0);
            let p = transpose_params(&shape, &perm).unwrap();
            let n = x.len();
            let got = run_kernel_once(
                &ctx,
                &kernel(&ctx, "transpose32").unwrap(),
                &p,
                &[&words(&x), &[0; 4]],
                n * 4,
                grid(n, 256, ctx.max_groups),
            )
            .unwrap();
            assert_eq!(bytemuck::cast_slice::<u8, f32>(&got), want.typed::<f32>());
            // The same on f16 elements.
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let mut hb = bytemuck::cast_slice::<f16, u8>(&h).to_vec();
            hb.resize(hb.len().next_multiple_of(4), 0);
            let got = run_kernel_once(
                &ctx,
                &kernel(&ctx, "transpose16").unwrap(),
                &p,
                &[&hb, &[0; 4]],
                n.div_ceil(2) * 4,
                grid(n.div_ceil(2), 256, ctx.max_groups),
            )
            .unwrap();
            let got: &[f16] = bytemuck::cast_slice(&got);
            let want16: Vec<f16> = want
                .typed::<f32>()
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect();
            assert_eq!(&got[..n], &want16[..]);
        }
        let data = noise(10 * 6, 4);
        // In range (also from the end), and outside it both ways (rows of zeros).
        let idx: Vec<i64> = vec![3, -1, 0, 9, -10, 10, -11, 1 << 32, i64::MIN];
        let n = idx.len();
        let p = Params::new().u(n).u(6).u(10);
        let got = run_kernel_once(
            &ctx,
            &kernel(&ctx, "gather_rows").unwrap(),
            &p,
            &[&words(&data), bytemuck::cast_slice(&idx)],
            n * 6 * 4,
            grid(n * 6, 256, ctx.max_groups),
        )
        .unwrap();
        let got: &[f32] = bytemuck::cast_slice(&got);
        for (r, &i) in idx.iter().enumerate() {
            match gather_ref(i, 10) {
                Some(row) => assert_eq!(&got[r * 6..r * 6 + 6], &data[row * 6..row * 6 + 6]),
                None => assert_eq!(&got[r * 6..r * 6 + 6], &[0.0; 6], "index {i}"),
            }
        }
    }

    /// The row an index names in `rows` rows, `None` outside.
    fn gather_ref(i: i64, rows: i64) -> Option<usize> {
        let r = if i < 0 { i + rows } else { i };
        (0..rows).contains(&r).then_some(r as usize)
    }

    #[test]
    fn byte_gather_and_byte_casts_match_cpu() {
        let Some(ctx) = ctx() else { return };
        // Rows of 1..9 bytes (most not a whole word) from tables of 1..40 rows.
        for (rb, rows, seed) in [(1, 7, 1u64), (3, 40, 2), (18, 33, 3), (5, 1, 4), (9, 12, 5)] {
            let data: Vec<u8> = noise(rb * rows, seed)
                .iter()
                .map(|x| (x * 1000.0) as i32 as u8)
                .collect();
            let mut padded = data.clone();
            padded.resize(data.len().next_multiple_of(4), 0);
            let r = rows as i64;
            let idx: Vec<i64> = vec![r - 1, 0, -1, r, r / 2, -r, -r - 1, 1];
            let n = idx.len();
            let got = run_kernel_once(
                &ctx,
                &kernel(&ctx, "gather_bytes").unwrap(),
                &Params::new().u(n).u(rb).u(rows),
                &[&padded, bytemuck::cast_slice(&idx)],
                (n * rb).next_multiple_of(4),
                grid((n * rb).div_ceil(4), 256, ctx.max_groups),
            )
            .unwrap();
            for (k, &i) in idx.iter().enumerate() {
                let want = match gather_ref(i, r) {
                    Some(row) => data[row * rb..row * rb + rb].to_vec(),
                    None => vec![0; rb],
                };
                assert_eq!(&got[k * rb..k * rb + rb], &want[..], "rb {rb} index {i}");
            }
            // The gathered bytes as u8 and as i8, against the CPU's Cast.
            let bytes = &got[..n * rb];
            for (entry, to_i8) in [("cast_from_u8", false), ("cast_from_i8", true)] {
                let out = run_kernel_once(
                    &ctx,
                    &kernel(&ctx, entry).unwrap(),
                    &Params::new().u(bytes.len()),
                    &[&got, &[0; 4]],
                    bytes.len() * 4,
                    grid(bytes.len(), 256, ctx.max_groups),
                )
                .unwrap();
                use crate::{graph::DType, tensor::Tensor};
                let dt = if to_i8 { DType::I8 } else { DType::U8 };
                let src = Tensor::from_slice(dt, &[bytes.len()], bytes);
                let node = crate::graph::Node {
                    name: "c".into(),
                    op: "Cast".into(),
                    domain: String::new(),
                    inputs: vec!["x".into()],
                    outputs: vec!["y".into()],
                    attrs: [("to".to_string(), crate::graph::Attr::Int(1))]
                        .into_iter()
                        .collect(),
                };
                let want = crate::backend::cpu::ops::run_node(&node, &[Some(&src)])
                    .unwrap()
                    .remove(0);
                assert_eq!(
                    bytemuck::cast_slice::<u8, f32>(&out),
                    want.typed::<f32>(),
                    "{entry}"
                );
            }
        }
    }

    #[test]
    fn unary_and_gates_match_cpu() {
        let Some(ctx) = ctx() else { return };
        let n = 3001;
        let g: Vec<f32> = noise(n, 8).iter().map(|x| x * 8.0).collect();
        let u = noise(n, 9);
        let got = run_kernel_once(
            &ctx,
            &kernel(&ctx, "gate").unwrap(),
            &Params::new().u(n).u(0),
            &[&words(&g), &words(&u)],
            n * 4,
            grid(n, 256, ctx.max_groups),
        )
        .unwrap();
        let mut want = vec![0.0; n];
        crate::backend::cpu::misc::silu_gate_reference(&g, &u, &mut want).unwrap();
        assert!(max_rel(bytemuck::cast_slice(&got), &want) < 1e-6);
        let got = run_kernel_once(
            &ctx,
            &kernel(&ctx, "gate").unwrap(),
            &Params::new().u(n).u(1),
            &[&words(&g), &words(&u)],
            n * 4,
            grid(n, 256, ctx.max_groups),
        )
        .unwrap();
        crate::backend::cpu::misc::gelu_gate_reference(&g, &u, &mut want).unwrap();
        assert!(max_rel(bytemuck::cast_slice(&got), &want) < 2e-6);
        let got = run_kernel_once(
            &ctx,
            &kernel(&ctx, "unary").unwrap(),
            &Params::new().u(n).u(UnOp::Sigmoid as usize),
            &[&words(&g), &[0; 4]],
            n * 4,
            grid(n, 256, ctx.max_groups),
        )
        .unwrap();
        let want: Vec<f32> = g.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
        assert!(max_rel(bytemuck::cast_slice(&got), &want) < 1e-6);
        // tanh and GELU-tanh against the CPU's (inputs up to ±8 and a few far beyond, where a naive
        // tanh overflows)
        let mut x = g.clone();
        x.extend([-100.0, -30.0, 30.0, 100.0, 0.0]);
        for op in [UnOp::Tanh, UnOp::GeluTanh, UnOp::GeluErf] {
            let f = match op {
                UnOp::Tanh => f32::tanh,
                UnOp::GeluErf => crate::backend::cpu::ops::gelu_exact,
                _ => crate::backend::cpu::misc::gelu_tanh,
            };
            let got = run_kernel_once(
                &ctx,
                &kernel(&ctx, "unary").unwrap(),
                &Params::new().u(x.len()).u(op as usize),
                &[&words(&x), &[0; 4]],
                x.len() * 4,
                grid(x.len(), 256, ctx.max_groups),
            )
            .unwrap();
            let got: &[f32] = bytemuck::cast_slice(&got);
            for (i, (&a, &xi)) in got.iter().zip(&x).enumerate() {
                let b = f(xi);
                assert!(
                    (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                    "{op:?} x[{i}]={xi}: {a} vs {b}"
                );
            }
        }
    }
}
