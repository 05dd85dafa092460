//! Ops along axes: `Softmax`, `CumSum`, `ReduceSum`, `ReduceMax`, `ReduceMean` and `TopK`.

use bytemuck::Pod;

use super::elementwise::cast;
use super::{broadcast_offsets_with, floats, norm_axis, Ctx};
use crate::backend::cpu::misc;
use crate::error::Result;
use crate::graph::DType;
use crate::tensor::{numel, Tensor};

pub(super) fn softmax_rows(v: &mut [f32], n: usize) {
    for row in v.chunks_mut(n.max(1)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0;
        for x in row.iter_mut() {
            *x = if m == f32::NEG_INFINITY {
                0.0
            } else {
                (*x - m).exp()
            };
            s += *x;
        }
        if s > 0.0 {
            row.iter_mut().for_each(|x| *x /= s);
        }
    }
}

/// Runs `f` over every 1-D line along `axis` (outer × inner lines of length `dim`).
fn along_axis(shape: &[usize], axis: usize, mut f: impl FnMut(&dyn Fn(usize) -> usize, usize)) {
    let outer: usize = shape[..axis].iter().product();
    let dim = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    for o in 0..outer {
        for i in 0..inner {
            let base = o * dim * inner + i;
            f(&move |k| base + k * inner, dim);
        }
    }
}

pub(super) fn softmax(ctx: &Ctx, a: &Tensor) -> Result<Tensor> {
    let ax = norm_axis(ctx, ctx.node.attr_int("axis", -1), a.rank())?;
    let mut out = Tensor::f32(&a.shape, a.as_f32(&ctx.node.name)?);
    if ax + 1 == a.rank() {
        let n = a.shape[ax];
        softmax_rows(out.typed_mut::<f32>(), n);
    } else {
        let shape = a.shape.clone();
        let o = out.typed_mut::<f32>();
        along_axis(&shape, ax, |at, dim| {
            let mut line: Vec<f32> = (0..dim).map(|k| o[at(k)]).collect();
            softmax_rows(&mut line, dim);
            (0..dim).for_each(|k| o[at(k)] = line[k]);
        });
    }
    Ok(out)
}

pub(super) fn cumsum(ctx: &Ctx, a: &Tensor, axis: &Tensor) -> Result<Tensor> {
    let ax = norm_axis(ctx, axis.scalar_i64(&ctx.node.name)?, a.rank())?;
    let exclusive = ctx.node.attr_int("exclusive", 0) != 0;
    let reverse = ctx.node.attr_int("reverse", 0) != 0;
    let mut out = Tensor::f32(&a.shape, a.as_f32(&ctx.node.name)?);
    let shape = a.shape.clone();
    let o = out.typed_mut::<f32>();
    along_axis(&shape, ax, |at, dim| {
        let mut acc = 0.0f32;
        for j in 0..dim {
            let k = if reverse { dim - 1 - j } else { j };
            let v = o[at(k)];
            if exclusive {
                o[at(k)] = acc;
                acc += v;
            } else {
                acc += v;
                o[at(k)] = acc;
            }
        }
    });
    Ok(out)
}

pub(super) fn reduce_sum(ctx: &Ctx, a: &Tensor, axes: Option<Vec<i64>>) -> Result<Tensor> {
    let keep = ctx.node.attr_int("keepdims", 1) != 0;
    let noop = ctx.node.attr_int("noop_with_empty_axes", 0) != 0;
    let axes: Vec<usize> = match axes {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|&x| norm_axis(ctx, x, a.rank()))
            .collect::<Result<_>>()?,
        _ if noop => return Ok(a.clone()),
        _ => (0..a.rank()).collect(),
    };
    let (kept, out_shape) = reduced_shapes(&a.shape, &axes, keep);
    let n_out = numel(&kept);
    // Trailing axes (the sampling tail's sums over the vocabulary): each output sums one contiguous
    // run, in the same order as the general path below.
    let r = a.rank();
    if axes.len() <= r && (r - axes.len()..r).all(|i| axes.contains(&i)) {
        let inner = numel(&a.shape[r - axes.len()..]);
        // One output per run of `inner` elements (none when `inner` is 0: all outputs stay zero).
        fn runs<T: Pod + Default>(
            v: &[T],
            inner: usize,
            n: usize,
            add: impl Fn(T, T) -> T,
        ) -> Vec<T> {
            let mut acc = vec![T::default(); n];
            if inner > 0 {
                for (a, c) in acc.iter_mut().zip(v.chunks(inner)) {
                    *a = c.iter().fold(T::default(), |s, &x| add(s, x));
                }
            }
            acc
        }
        match a.dtype {
            DType::F32 => {
                let acc = runs(a.typed::<f32>(), inner, n_out, |s: f32, x: f32| s + x);
                return Ok(Tensor::f32(&out_shape, &acc));
            }
            DType::I64 => {
                let acc = runs(a.typed::<i64>(), inner, n_out, i64::wrapping_add);
                return Ok(Tensor::i64(&out_shape, &acc));
            }
            _ => {}
        }
    }
    // Map every input element to its output slot via the kept shape.
    let mut strides = vec![0usize; a.rank()];
    let mut s = 1;
    for i in (0..a.rank()).rev() {
        strides[i] = if axes.contains(&i) { 0 } else { s };
        s *= kept[i];
    }
    let offs = broadcast_offsets_with(&a.shape, &strides);
    match a.dtype {
        DType::F32 => {
            let v = a.typed::<f32>();
            let mut acc = vec![0.0f32; n_out];
            for (i, &o) in offs.iter().enumerate() {
                acc[o] += v[i];
            }
            Ok(Tensor::f32(&out_shape, &acc))
        }
        DType::I64 => {
            let v = a.typed::<i64>();
            let mut acc = vec![0i64; n_out];
            for (i, &o) in offs.iter().enumerate() {
                acc[o] = acc[o].wrapping_add(v[i]);
            }
            Ok(Tensor::i64(&out_shape, &acc))
        }
        d => Err(ctx.err(format!("ReduceSum on {d} is not supported"))),
    }
}

pub(super) fn topk(ctx: &Ctx, a: &Tensor, k: &Tensor) -> Result<Vec<Tensor>> {
    let ax = norm_axis(ctx, ctx.node.attr_int("axis", -1), a.rank())?;
    if ax + 1 != a.rank() {
        return Err(ctx.err("TopK is supported on the last axis only"));
    }
    let largest = ctx.node.attr_int("largest", 1) != 0;
    let v = a.as_f32(&ctx.node.name)?;
    let n = a.shape[ax];
    let k = k.scalar_i64(&ctx.node.name)?;
    if k < 0 || k as usize > n {
        return Err(ctx.err(format!("k = {k} is outside 0..={n}")));
    }
    let k = k as usize;
    let rows = v.len().checked_div(n).unwrap_or(0);
    let mut vals = Vec::with_capacity(rows * k);
    let mut idxs = Vec::with_capacity(rows * k);
    let mut rv = vec![0.0f32; k];
    let mut ri = vec![0usize; k];
    let mut neg = Vec::new();
    for row in v.chunks(n.max(1)).take(rows) {
        // The smallest are the largest of the negated row (ties still to the lower index).
        let x = if largest {
            row
        } else {
            neg.clear();
            neg.extend(row.iter().map(|v| -v));
            &neg[..]
        };
        misc::top_k(x, &mut rv, &mut ri).map_err(|e| ctx.err(e.to_string()))?;
        for &i in &ri {
            vals.push(row[i]);
            idxs.push(i as i64);
        }
    }
    let mut shape = a.shape.clone();
    shape[ax] = k;
    Ok(vec![Tensor::f32(&shape, &vals), Tensor::i64(&shape, &idxs)])
}

/// The axes a `Reduce*` node reduces (sorted, distinct), or `None` when it is the identity (no axes and
/// `noop_with_empty_axes`). No axes otherwise means all of them.
fn reduce_axes(ctx: &Ctx, a: &Tensor, axes: Option<Vec<i64>>) -> Result<Option<Vec<usize>>> {
    let noop = ctx.node.attr_int("noop_with_empty_axes", 0) != 0;
    let mut axes: Vec<usize> = match axes {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|&x| norm_axis(ctx, x, a.rank()))
            .collect::<Result<_>>()?,
        _ if noop => return Ok(None),
        _ => (0..a.rank()).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    Ok(Some(axes))
}

/// A reduction's shapes over `axes`: with the reduced axes kept as 1, and the output's (`keep`: the
/// same; else without them).
fn reduced_shapes(shape: &[usize], axes: &[usize], keep: bool) -> (Vec<usize>, Vec<usize>) {
    let kept: Vec<usize> = (shape.iter().enumerate())
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let out = match keep {
        true => kept.clone(),
        false => (0..shape.len())
            .filter(|i| !axes.contains(i))
            .map(|i| shape[i])
            .collect(),
    };
    (kept, out)
}

/// `ReduceMax` and `ReduceMean` (opset 18: axes as an optional input, `keepdims`,
/// `noop_with_empty_axes`). Floats (f16/bf16 through f32): the max propagates NaN, is −∞ over an empty
/// set; the mean sums in f64 (NaN over an empty set). Integers and bool: the max is exact (the type's
/// minimum, `false`, over an empty set); the integer mean is truncated toward zero.
pub(super) fn reduce_max_mean(ctx: &Ctx, a: &Tensor, axes: Option<Vec<i64>>) -> Result<Tensor> {
    let mean = ctx.node.op == "ReduceMean";
    let Some(axes) = reduce_axes(ctx, a, axes)? else {
        return Ok(a.clone());
    };
    let keep = ctx.node.attr_int("keepdims", 1) != 0;
    let (kept, out_shape) = reduced_shapes(&a.shape, &axes, keep);
    let n_out = numel(&kept);
    let count: usize = axes.iter().map(|&i| a.shape[i]).product();
    let mut strides = vec![0usize; a.rank()];
    let mut s = 1;
    for i in (0..a.rank()).rev() {
        strides[i] = if axes.contains(&i) { 0 } else { s };
        s *= kept[i];
    }
    let offs = broadcast_offsets_with(&a.shape, &strides);
    let ints: Option<(Vec<i64>, i64)> = match a.dtype {
        DType::I64 => Some((a.typed::<i64>().to_vec(), i64::MIN)),
        DType::I32 => Some((
            a.typed::<i32>().iter().map(|&v| v as i64).collect(),
            i32::MIN as i64,
        )),
        DType::I8 => Some((
            a.typed::<i8>().iter().map(|&v| v as i64).collect(),
            i8::MIN as i64,
        )),
        DType::U8 | DType::Bool => Some((a.typed::<u8>().iter().map(|&v| v as i64).collect(), 0)),
        _ => None,
    };
    if let Some((v, min)) = ints {
        let acc: Vec<i64> = if mean {
            if a.dtype == DType::Bool {
                return Err(ctx.err("ReduceMean on bool is not supported"));
            }
            if count == 0 && n_out > 0 {
                return Err(ctx.err("integer ReduceMean over an empty set"));
            }
            let mut acc = vec![0i128; n_out];
            for (&x, &o) in v.iter().zip(&offs) {
                acc[o] += x as i128;
            }
            acc.iter().map(|&s| (s / count as i128) as i64).collect()
        } else {
            let mut acc = vec![min; n_out];
            for (&x, &o) in v.iter().zip(&offs) {
                acc[o] = acc[o].max(x);
            }
            acc
        };
        return cast(ctx, &Tensor::i64(&out_shape, &acc), a.dtype);
    }
    let v = floats(ctx, a)?;
    let acc: Vec<f32> = if mean {
        let mut acc = vec![0f64; n_out];
        for (&x, &o) in v.iter().zip(&offs) {
            acc[o] += x as f64;
        }
        acc.iter().map(|&s| (s / count as f64) as f32).collect()
    } else {
        let mut acc = vec![f32::NEG_INFINITY; n_out];
        for (&x, &o) in v.iter().zip(&offs) {
            if x > acc[o] || x.is_nan() {
                acc[o] = x;
            }
        }
        acc
    };
    cast(ctx, &Tensor::f32(&out_shape, &acc), a.dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::tests::run;
    use crate::graph::Attr;

    /// ReduceSum over trailing axes (contiguous runs) and over others (the general path), f32 and i64,
    /// kept and dropped dims, against sums written out.
    #[test]
    fn reduce_sum_over_trailing_and_other_axes() {
        let v: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = Tensor::f32(&[2, 3, 4], &v);
        let at = |i: usize, j: usize, k: usize| v[i * 12 + j * 4 + k];
        let sum = |axes: &[i64], keep: i64| {
            let ax = Tensor::i64(&[axes.len()], axes);
            run("ReduceSum", &[("keepdims", Attr::Int(keep))], &[&a, &ax])
                .unwrap()
                .remove(0)
        };
        let last = sum(&[-1], 1);
        assert_eq!(last.shape, vec![2, 3, 1]);
        for (o, got) in last.typed::<f32>().iter().enumerate() {
            let (i, j) = (o / 3, o % 3);
            assert_eq!(*got, (0..4).fold(0.0, |s, k| s + at(i, j, k)));
        }
        let two = sum(&[1, 2], 0);
        assert_eq!(two.shape, vec![2]);
        for (i, got) in two.typed::<f32>().iter().enumerate() {
            let want = (0..3).flat_map(|j| (0..4).map(move |k| (j, k)));
            assert_eq!(*got, want.fold(0.0, |s, (j, k)| s + at(i, j, k)));
        }
        let middle = sum(&[1], 0);
        assert_eq!(middle.shape, vec![2, 4]);
        for (o, got) in middle.typed::<f32>().iter().enumerate() {
            let (i, k) = (o / 4, o % 4);
            assert_eq!(*got, (0..3).fold(0.0, |s, j| s + at(i, j, k)));
        }
        let ints = Tensor::i64(&[2, 3], &[1, 2, 3, i64::MAX, 1, -5]);
        let ax = Tensor::i64(&[1], &[1]);
        let o = run("ReduceSum", &[], &[&ints, &ax]).unwrap().remove(0);
        assert_eq!(
            o.typed::<i64>(),
            &[6, i64::MAX.wrapping_add(1).wrapping_sub(5)]
        );
        // Repeated axes (more entries than dims) take the general path.
        let rep = Tensor::i64(&[3], &[1, 1, 1]);
        let o = run("ReduceSum", &[], &[&ints, &rep]).unwrap().remove(0);
        assert_eq!(
            o.typed::<i64>(),
            &[6, i64::MAX.wrapping_add(1).wrapping_sub(5)]
        );
        let empty = Tensor::f32(&[2, 0], &[]);
        let o = run("ReduceSum", &[], &[&empty, &ax]).unwrap().remove(0);
        assert_eq!(
            (o.shape.clone(), o.typed::<f32>().to_vec()),
            (vec![2, 1], vec![0.0, 0.0])
        );
    }

    #[test]
    fn topk_ties_prefer_lower_index() {
        let a = Tensor::f32(&[1, 5], &[3., 7., 7., 1., 7.]);
        let k = Tensor::i64(&[1], &[2]);
        let o = run("TopK", &[], &[&a, &k]).unwrap();
        assert_eq!(o[1].typed::<i64>(), &[1, 2]);
        let k1 = Tensor::i64(&[1], &[1]);
        let o = run("TopK", &[], &[&a, &k1]).unwrap();
        assert_eq!(o[1].typed::<i64>(), &[1]);
        let k9 = Tensor::i64(&[1], &[9]);
        assert!(run("TopK", &[], &[&a, &k9]).is_err());
    }

    #[test]
    fn cumsum_exclusive_reverse() {
        let a = Tensor::f32(&[4], &[1., 2., 3., 4.]);
        let ax = Tensor::i64(&[], &[0]);
        let o = run("CumSum", &[], &[&a, &ax]).unwrap().remove(0);
        assert_eq!(o.typed::<f32>(), &[1., 3., 6., 10.]);
        let o = run(
            "CumSum",
            &[("exclusive", Attr::Int(1)), ("reverse", Attr::Int(1))],
            &[&a, &ax],
        )
        .unwrap()
        .remove(0);
        assert_eq!(o.typed::<f32>(), &[9., 7., 4., 0.]);
    }

    #[test]
    fn reduce_max_mean_and_layer_norm() {
        let a = Tensor::f32(&[2, 3], &[1., -2., 3., f32::NAN, 5., 0.5]);
        let ax = Tensor::i64(&[1], &[1]);
        let o = run("ReduceMax", &[("keepdims", Attr::Int(0))], &[&a, &ax])
            .unwrap()
            .remove(0);
        assert_eq!(o.shape, vec![2]);
        assert_eq!(o.typed::<f32>()[0], 3.0);
        assert!(o.typed::<f32>()[1].is_nan());
        let b = Tensor::f32(&[2, 2], &[1., 2., 3., 4.]);
        let o = run("ReduceMean", &[], &[&b]).unwrap().remove(0);
        assert_eq!(
            (o.shape.clone(), o.typed::<f32>()),
            (vec![1, 1], &[2.5f32][..])
        );
        let i = Tensor::i64(&[3], &[-7, 2, 1]);
        let o = run("ReduceMean", &[], &[&i]).unwrap().remove(0);
        assert_eq!(o.typed::<i64>(), &[-1]);
        let none = Tensor::i64(&[0], &[]);
        let o = run(
            "ReduceMax",
            &[("noop_with_empty_axes", Attr::Int(1))],
            &[&i, &none],
        )
        .unwrap()
        .remove(0);
        assert_eq!(o.typed::<i64>(), i.typed::<i64>());

        let x = Tensor::f32(&[2, 4], &[1., 2., 3., 4., -1., -1., -1., -1.]);
        let s = Tensor::f32(&[4], &[1., 2., 1., 1.]);
        let bias = Tensor::f32(&[1], &[0.5]);
        let o = run(
            "LayerNormalization",
            &[("epsilon", Attr::Float(1e-6))],
            &[&x, &s, &bias],
        )
        .unwrap();
        let inv = 1.0 / (1.25f64 + 1e-6).sqrt();
        let want = [-1.5 * inv, -0.5 * inv * 2.0, 0.5 * inv, 1.5 * inv];
        for (g, w) in o[0].typed::<f32>()[..4].iter().zip(want) {
            assert!((*g as f64 - (w + 0.5)).abs() < 1e-6, "{g} vs {w}");
        }
        assert_eq!(o[0].typed::<f32>()[4..], [0.5; 4]);
        assert_eq!(o[1].shape, vec![2, 1]);
        assert_eq!(o[1].typed::<f32>(), &[2.5, -1.0]);
        assert_eq!(o[2].typed::<f32>()[1], 1e3);
    }
}
