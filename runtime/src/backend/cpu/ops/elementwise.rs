//! Element-wise ops: the binary arithmetic, comparison, logical and bit ops (numpy broadcasting), `Where`,
//! the one-input float ops, `Pow`, `Abs` and `Cast`.

use bytemuck::Pod;
use half::{bf16, f16};

use super::{broadcast_offsets, broadcast_shape, floats, Ctx};
use crate::error::Result;
use crate::graph::{Attr, DType};
use crate::tensor::Tensor;

fn binary<A: Pod, B: Pod, O: Pod>(
    ctx: &Ctx,
    a: &Tensor,
    b: &Tensor,
    odt: DType,
    f: impl Fn(A, B) -> O,
) -> Result<Tensor> {
    let shape = broadcast_shape(&a.shape, &b.shape).ok_or_else(|| {
        ctx.err(format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape, b.shape
        ))
    })?;
    let (av, bv) = (a.typed::<A>(), b.typed::<B>());
    Ok(Tensor::build(odt, &shape, |o: &mut [O]| {
        if a.shape == shape && b.shape == shape {
            for i in 0..o.len() {
                o[i] = f(av[i], bv[i]);
            }
        } else if a.shape == shape && bv.len() == 1 {
            for i in 0..o.len() {
                o[i] = f(av[i], bv[0]);
            }
        } else if b.shape == shape && av.len() == 1 {
            for i in 0..o.len() {
                o[i] = f(av[0], bv[i]);
            }
        } else {
            let oa = broadcast_offsets(&a.shape, &shape);
            let ob = broadcast_offsets(&b.shape, &shape);
            for i in 0..o.len() {
                o[i] = f(av[oa[i]], bv[ob[i]]);
            }
        }
    }))
}

fn same_dtype(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<DType> {
    if a.dtype != b.dtype {
        return Err(ctx.err(format!("mixed dtypes {} and {}", a.dtype, b.dtype)));
    }
    Ok(a.dtype)
}

pub(super) fn arith(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = same_dtype(ctx, a, b)?;
    let op = ctx.node.op.as_str();
    macro_rules! int_arith {
        ($t:ty) => {{
            let f: fn($t, $t) -> $t = match op {
                "Add" => <$t>::wrapping_add,
                "Sub" => <$t>::wrapping_sub,
                "Mul" => <$t>::wrapping_mul,
                "Div" => |x, y| if y == 0 { 0 } else { x.wrapping_div(y) },
                "Max" => <$t>::max,
                "Min" => <$t>::min,
                _ => unreachable!(),
            };
            binary(ctx, a, b, dt, f)
        }};
    }
    match dt {
        // One `binary` per op (not a function pointer): the element loops inline the op.
        DType::F32 => match op {
            "Add" => binary(ctx, a, b, dt, |x: f32, y: f32| x + y),
            "Sub" => binary(ctx, a, b, dt, |x: f32, y: f32| x - y),
            "Mul" => binary(ctx, a, b, dt, |x: f32, y: f32| x * y),
            "Div" => binary(ctx, a, b, dt, |x: f32, y: f32| x / y),
            "Max" => binary(ctx, a, b, dt, f32::max),
            "Min" => binary(ctx, a, b, dt, f32::min),
            _ => unreachable!(),
        },
        // Integers wrap on overflow; division truncates toward zero (by zero: 0, where ONNX leaves it
        // undefined).
        DType::I64 => int_arith!(i64),
        DType::I32 => int_arith!(i32),
        DType::I8 => int_arith!(i8),
        DType::U8 => int_arith!(u8),
        d => Err(ctx.err(format!("{op} on {d} is not supported"))),
    }
}

pub(super) fn compare(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = same_dtype(ctx, a, b)?;
    let op = ctx.node.op.as_str();
    macro_rules! cmp {
        ($t:ty) => {{
            match op {
                "Less" => binary(ctx, a, b, DType::Bool, |x: $t, y: $t| u8::from(x < y)),
                "LessOrEqual" => binary(ctx, a, b, DType::Bool, |x: $t, y: $t| u8::from(x <= y)),
                "Greater" => binary(ctx, a, b, DType::Bool, |x: $t, y: $t| u8::from(x > y)),
                "Equal" => binary(ctx, a, b, DType::Bool, |x: $t, y: $t| u8::from(x == y)),
                _ => unreachable!(),
            }
        }};
    }
    match dt {
        DType::F32 => cmp!(f32),
        DType::I64 => cmp!(i64),
        DType::I32 => cmp!(i32),
        DType::I8 => cmp!(i8),
        DType::U8 => cmp!(u8),
        DType::Bool if op == "Equal" => cmp!(u8),
        d => Err(ctx.err(format!("{op} on {d} is not supported"))),
    }
}

pub(super) fn logical(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.expect(DType::Bool, &ctx.node.name)?;
    b.expect(DType::Bool, &ctx.node.name)?;
    match ctx.node.op.as_str() {
        "And" => binary(ctx, a, b, DType::Bool, |x: u8, y: u8| x & y),
        _ => binary(ctx, a, b, DType::Bool, |x: u8, y: u8| x | y),
    }
}

pub(super) fn unary_f32(ctx: &Ctx, a: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    let v = a.as_f32(&ctx.node.name)?;
    Ok(Tensor::build(DType::F32, &a.shape, |o: &mut [f32]| {
        for (o, &x) in o.iter_mut().zip(v) {
            *o = f(x);
        }
    }))
}

pub(super) fn cast(ctx: &Ctx, a: &Tensor, to: DType) -> Result<Tensor> {
    if a.dtype == to {
        return Ok(a.clone());
    }
    macro_rules! from_f32 {
        ($src:expr) => {{
            let src: Vec<f32> = $src;
            Ok(match to {
                DType::F32 => Tensor::f32(&a.shape, &src),
                DType::F16 => Tensor::build(to, &a.shape, |o: &mut [f16]| {
                    o.iter_mut()
                        .zip(&src)
                        .for_each(|(o, &s)| *o = f16::from_f32(s))
                }),
                DType::BF16 => Tensor::build(to, &a.shape, |o: &mut [bf16]| {
                    o.iter_mut()
                        .zip(&src)
                        .for_each(|(o, &s)| *o = bf16::from_f32(s))
                }),
                DType::I64 => Tensor::build(to, &a.shape, |o: &mut [i64]| {
                    o.iter_mut().zip(&src).for_each(|(o, &s)| *o = s as i64)
                }),
                DType::I32 => Tensor::build(to, &a.shape, |o: &mut [i32]| {
                    o.iter_mut().zip(&src).for_each(|(o, &s)| *o = s as i32)
                }),
                DType::U8 => Tensor::build(to, &a.shape, |o: &mut [u8]| {
                    o.iter_mut().zip(&src).for_each(|(o, &s)| *o = s as u8)
                }),
                DType::I8 => Tensor::build(to, &a.shape, |o: &mut [i8]| {
                    o.iter_mut().zip(&src).for_each(|(o, &s)| *o = s as i8)
                }),
                DType::Bool => Tensor::build(to, &a.shape, |o: &mut [u8]| {
                    o.iter_mut()
                        .zip(&src)
                        .for_each(|(o, &s)| *o = (s != 0.0) as u8)
                }),
            })
        }};
    }
    // Integer → integer casts stay exact through i64.
    let int_src: Option<Vec<i64>> = match a.dtype {
        DType::I64 => Some(a.typed::<i64>().to_vec()),
        DType::I32 => Some(a.typed::<i32>().iter().map(|&v| v as i64).collect()),
        DType::U8 | DType::Bool => Some(a.typed::<u8>().iter().map(|&v| v as i64).collect()),
        DType::I8 => Some(a.typed::<i8>().iter().map(|&v| v as i64).collect()),
        _ => None,
    };
    if let (Some(src), true) = (
        &int_src,
        matches!(
            to,
            DType::I64 | DType::I32 | DType::U8 | DType::I8 | DType::Bool
        ),
    ) {
        return Ok(match to {
            DType::I64 => Tensor::i64(&a.shape, src),
            DType::I32 => Tensor::build(to, &a.shape, |o: &mut [i32]| {
                o.iter_mut().zip(src).for_each(|(o, &s)| *o = s as i32)
            }),
            DType::U8 => Tensor::build(to, &a.shape, |o: &mut [u8]| {
                o.iter_mut().zip(src).for_each(|(o, &s)| *o = s as u8)
            }),
            DType::I8 => Tensor::build(to, &a.shape, |o: &mut [i8]| {
                o.iter_mut().zip(src).for_each(|(o, &s)| *o = s as i8)
            }),
            _ => Tensor::build(to, &a.shape, |o: &mut [u8]| {
                o.iter_mut()
                    .zip(src)
                    .for_each(|(o, &s)| *o = (s != 0) as u8)
            }),
        });
    }
    let src: Vec<f32> = match a.dtype {
        DType::U8 | DType::Bool => a.typed::<u8>().iter().map(|&v| v as f32).collect(),
        DType::I8 => a.typed::<i8>().iter().map(|&v| v as f32).collect(),
        _ => a.to_f32_vec(&ctx.node.name)?,
    };
    from_f32!(src)
}

pub(super) fn where_op(ctx: &Ctx, c: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    c.expect(DType::Bool, &ctx.node.name)?;
    let dt = same_dtype(ctx, x, y)?;
    let s1 =
        broadcast_shape(&c.shape, &x.shape).ok_or_else(|| ctx.err("shapes do not broadcast"))?;
    let shape = broadcast_shape(&s1, &y.shape).ok_or_else(|| ctx.err("shapes do not broadcast"))?;
    let es = dt.size();
    // One condition (a decode step's flag) choosing a whole input: that input.
    if c.numel() == 1 {
        let pick = if c.bytes()[0] != 0 { x } else { y };
        if pick.shape == shape {
            return Ok(pick.clone());
        }
    }
    // No broadcasting: element by element.
    if c.shape == shape && x.shape == shape && y.shape == shape {
        let mut out = Tensor::zeros(dt, &shape);
        let o = out.bytes_mut().chunks_exact_mut(es);
        let pairs = x.bytes().chunks_exact(es).zip(y.bytes().chunks_exact(es));
        for ((o, &c), (a, b)) in o.zip(c.bytes()).zip(pairs) {
            o.copy_from_slice(if c != 0 { a } else { b });
        }
        return Ok(out);
    }
    let (oc, ox, oy) = (
        broadcast_offsets(&c.shape, &shape),
        broadcast_offsets(&x.shape, &shape),
        broadcast_offsets(&y.shape, &shape),
    );
    let (cb, xb, yb) = (c.bytes(), x.bytes(), y.bytes());
    let mut out = Tensor::zeros(dt, &shape);
    let o = out.bytes_mut();
    for k in 0..oc.len() {
        let (src, off) = if cb[oc[k]] != 0 {
            (xb, ox[k])
        } else {
            (yb, oy[k])
        };
        o[k * es..(k + 1) * es].copy_from_slice(&src[off * es..(off + 1) * es]);
    }
    Ok(out)
}

pub(super) fn bit_op(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.expect(DType::U8, &ctx.node.name)?;
    b.expect(DType::U8, &ctx.node.name)?;
    if ctx.node.op == "BitwiseAnd" {
        return binary(ctx, a, b, DType::U8, |x: u8, y: u8| x & y);
    }
    let right = matches!(ctx.node.attrs.get("direction"), Some(Attr::Str(s)) if s == "RIGHT");
    if right {
        binary(ctx, a, b, DType::U8, |x: u8, y: u8| {
            x.checked_shr(y as u32).unwrap_or(0)
        })
    } else {
        binary(ctx, a, b, DType::U8, |x: u8, y: u8| {
            x.checked_shl(y as u32).unwrap_or(0)
        })
    }
}

/// An element-wise float op: f32 in place of the input's f32 elements, f16/bf16 through f32.
pub(super) fn unary_float(ctx: &Ctx, a: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    if a.dtype == DType::F32 {
        return unary_f32(ctx, a, f);
    }
    let v: Vec<f32> = floats(ctx, a)?.iter().map(|&x| f(x)).collect();
    cast(ctx, &Tensor::f32(&a.shape, &v), a.dtype)
}

/// `b^e` for integers: wrapping on overflow; a negative exponent truncates `1/b^|e|` toward zero (0
/// for `b = 0`, where it is undefined).
fn int_pow(b: i64, e: i64) -> i64 {
    if e >= 0 {
        b.wrapping_pow(u32::try_from(e).unwrap_or(u32::MAX))
    } else {
        match b {
            1 => 1,
            -1 if e % 2 == 0 => 1,
            -1 => -1,
            _ => 0,
        }
    }
}

/// ONNX `Pow`: the base's type out; float bases (f32, f16, bf16) computed in f64 and rounded once,
/// integer bases with an integer exponent exactly (wrapping), with a float exponent in f64 and
/// truncated toward zero (numpy's `power(...).astype(int)`, what the reference does).
pub(super) fn pow(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let name = &ctx.node.name;
    let float_exp = match b.dtype {
        DType::F32 => Some(b.clone()),
        DType::F16 | DType::BF16 => Some(Tensor::f32(&b.shape, &b.to_f32_vec(name)?)),
        DType::I64 | DType::I32 | DType::I8 | DType::U8 => None,
        d => return Err(ctx.err(format!("Pow with a {d} exponent is not supported"))),
    };
    let int_exp = || cast(ctx, b, DType::I64);
    match a.dtype {
        DType::F32 | DType::F16 | DType::BF16 => {
            let base = match a.dtype {
                DType::F32 => a.clone(),
                _ => Tensor::f32(&a.shape, &a.to_f32_vec(name)?),
            };
            let out = match float_exp {
                Some(e) => binary(ctx, &base, &e, DType::F32, |x: f32, y: f32| {
                    (x as f64).powf(y as f64) as f32
                })?,
                None => binary(ctx, &base, &int_exp()?, DType::F32, |x: f32, y: i64| {
                    (x as f64).powf(y as f64) as f32
                })?,
            };
            cast(ctx, &out, a.dtype)
        }
        DType::I64 | DType::I32 | DType::I8 | DType::U8 => {
            let base = cast(ctx, a, DType::I64)?;
            let out = match float_exp {
                Some(e) => binary(ctx, &base, &e, DType::I64, |x: i64, y: f32| {
                    (x as f64).powf(y as f64) as i64
                })?,
                None => binary(ctx, &base, &int_exp()?, DType::I64, int_pow)?,
            };
            cast(ctx, &out, a.dtype)
        }
        d => Err(ctx.err(format!("Pow on {d} is not supported"))),
    }
}

pub(super) fn abs(ctx: &Ctx, a: &Tensor) -> Result<Tensor> {
    macro_rules! int_abs {
        ($t:ty) => {{
            let v: Vec<$t> = a.typed::<$t>().iter().map(|x| x.wrapping_abs()).collect();
            Ok(Tensor::from_slice(a.dtype, &a.shape, &v))
        }};
    }
    match a.dtype {
        DType::I64 => int_abs!(i64),
        DType::I32 => int_abs!(i32),
        DType::I8 => int_abs!(i8),
        DType::U8 => Ok(a.clone()),
        _ => unary_float(ctx, a, f32::abs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::tests::run;

    #[test]
    fn broadcasting_add_matches_numpy_rules() {
        let a = Tensor::f32(&[2, 1, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = Tensor::f32(&[4, 1], &[10., 20., 30., 40.]);
        let o = run("Add", &[], &[&a, &b]).unwrap().remove(0);
        assert_eq!(o.shape, vec![2, 4, 3]);
        let v = o.typed::<f32>();
        assert_eq!(&v[..6], &[11., 12., 13., 21., 22., 23.]);
        assert_eq!(v[23], 46.);
        let c = Tensor::f32(&[2], &[1., 2.]);
        assert!(
            run("Add", &[], &[&a, &c]).is_err(),
            "3 vs 2 must not broadcast"
        );
    }

    /// Every path of `Where` (one condition choosing a whole input, no broadcasting, broadcasting)
    /// against the element-by-element rule over the broadcast index.
    #[test]
    fn where_paths_match_the_broadcast_rule() {
        let x = Tensor::f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let y = Tensor::f32(&[2, 3], &[-1., -2., -3., -4., -5., -6.]);
        let row = Tensor::f32(&[3], &[7., 8., 9.]);
        let flag = |v: &[u8], shape: &[usize]| {
            Tensor::bool(shape, &v.iter().map(|&b| b != 0).collect::<Vec<_>>())
        };
        let cases: Vec<(Tensor, &Tensor, &Tensor, Vec<f32>)> = vec![
            (flag(&[1], &[1]), &x, &y, vec![1., 2., 3., 4., 5., 6.]),
            (flag(&[0], &[]), &x, &y, vec![-1., -2., -3., -4., -5., -6.]),
            (flag(&[1], &[1, 1]), &row, &y, vec![7., 8., 9., 7., 8., 9.]),
            (flag(&[0], &[1]), &x, &row, vec![7., 8., 9., 7., 8., 9.]),
            (
                flag(&[1, 0, 1, 0, 0, 1], &[2, 3]),
                &x,
                &y,
                vec![1., -2., 3., -4., -5., 6.],
            ),
            (
                flag(&[0, 1, 1], &[3]),
                &x,
                &row,
                vec![7., 2., 3., 7., 5., 6.],
            ),
        ];
        for (i, (c, a, b, want)) in cases.into_iter().enumerate() {
            let o = run("Where", &[], &[&c, a, b]).unwrap().remove(0);
            assert_eq!(o.shape, vec![2, 3], "case {i}");
            assert_eq!(o.typed::<f32>(), &want[..], "case {i}");
        }
    }

    #[test]
    fn cast_roundtrips() {
        let a = Tensor::f32(&[3], &[1.5, -2.25, 65504.0]);
        let h = run("Cast", &[("to", Attr::Int(10))], &[&a])
            .unwrap()
            .remove(0);
        let b = run("Cast", &[("to", Attr::Int(1))], &[&h])
            .unwrap()
            .remove(0);
        assert_eq!(b.typed::<f32>(), a.typed::<f32>());
        let i = run("Cast", &[("to", Attr::Int(7))], &[&a])
            .unwrap()
            .remove(0);
        assert_eq!(i.typed::<i64>(), &[1, -2, 65504]);
    }

    #[test]
    fn pow_keeps_the_base_type() {
        let f = Tensor::f32(&[3], &[2., -3., 4.]);
        let i = Tensor::i64(&[3], &[3, 2, -1]);
        let o = run("Pow", &[], &[&f, &i]).unwrap().remove(0);
        assert_eq!(o.typed::<f32>(), &[8., 9., 0.25]);
        let o = run("Pow", &[], &[&i, &f]).unwrap().remove(0);
        assert_eq!(o.typed::<i64>(), &[9, 0, 1]);
        let half = Tensor::f32(&[], &[0.5]);
        let o = run("Pow", &[], &[&Tensor::f32(&[2], &[9., -1.]), &half])
            .unwrap()
            .remove(0);
        assert_eq!(o.typed::<f32>()[0], 3.0);
        assert!(o.typed::<f32>()[1].is_nan());
    }
}
