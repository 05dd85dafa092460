//! Ops that move, select or make elements without arithmetic on them: `Reshape`, `Squeeze`,
//! `Unsqueeze`, `Gather`, `GatherElements`, `Transpose`, `Concat`, `Expand`, `Slice`, `Pad` and `Range`.

use super::{
    attr_str, broadcast_offsets, broadcast_shape, input, norm_axis, Ctx, MAX_OUTPUT_ELEMENTS,
};
use crate::error::{Error, Result};
use crate::graph::DType;
use crate::tensor::{numel, Tensor};

pub(super) fn reshape(ctx: &Ctx, a: &Tensor, spec: &[i64], allowzero: bool) -> Result<Tensor> {
    let mut shape = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                shape.push(1);
            }
            0 if !allowzero => shape.push(
                *a.shape
                    .get(i)
                    .ok_or_else(|| ctx.err(format!("shape entry 0 at {i} has no source dim")))?,
            ),
            d if d >= 0 => shape.push(d as usize),
            d => return Err(ctx.err(format!("bad shape entry {d}"))),
        }
    }
    let n = a.numel();
    if let Some(i) = infer {
        let rest: usize = shape.iter().product();
        if rest == 0 || !n.is_multiple_of(rest) {
            return Err(ctx.err(format!("cannot reshape {:?} to {:?}", a.shape, spec)));
        }
        shape[i] = n / rest;
    }
    if numel(&shape) != n {
        return Err(ctx.err(format!("cannot reshape {:?} to {:?}", a.shape, spec)));
    }
    Ok(a.reshaped(shape))
}

pub(super) fn squeeze(ctx: &Ctx, a: &Tensor, axes: Option<Vec<i64>>) -> Result<Tensor> {
    let rank = a.rank();
    let drop: Vec<usize> = match axes {
        Some(ax) => ax
            .iter()
            .map(|&x| norm_axis(ctx, x, rank))
            .collect::<Result<_>>()?,
        None => (0..rank).filter(|&i| a.shape[i] == 1).collect(),
    };
    for &d in &drop {
        if a.shape[d] != 1 {
            return Err(ctx.err(format!("cannot squeeze axis {d} of {:?}", a.shape)));
        }
    }
    let shape = (0..rank)
        .filter(|i| !drop.contains(i))
        .map(|i| a.shape[i])
        .collect();
    Ok(a.reshaped(shape))
}

pub(super) fn unsqueeze(ctx: &Ctx, a: &Tensor, axes: &[i64]) -> Result<Tensor> {
    let out_rank = a.rank() + axes.len();
    let mut ax: Vec<usize> = axes
        .iter()
        .map(|&x| norm_axis(ctx, x, out_rank))
        .collect::<Result<_>>()?;
    ax.sort_unstable();
    let mut shape = Vec::with_capacity(out_rank);
    let mut src = a.shape.iter();
    for i in 0..out_rank {
        if ax.contains(&i) {
            shape.push(1);
        } else {
            shape.push(*src.next().ok_or_else(|| ctx.err("bad unsqueeze axes"))?);
        }
    }
    Ok(a.reshaped(shape))
}

/// Byte-level gather along `axis` (any dtype).
pub fn gather_bytes(
    data: &Tensor,
    indices: &[i64],
    idx_shape: &[usize],
    axis: usize,
    what: &str,
) -> Result<Tensor> {
    let es = data.dtype.size();
    let outer: usize = data.shape[..axis].iter().product();
    let dim = data.shape[axis];
    let inner: usize = data.shape[axis + 1..].iter().product::<usize>() * es;
    let mut shape = data.shape[..axis].to_vec();
    shape.extend_from_slice(idx_shape);
    shape.extend_from_slice(&data.shape[axis + 1..]);
    let src = data.bytes();
    let mut out = Tensor::zeros(data.dtype, &shape);
    let o = out.bytes_mut();
    let mut w = 0;
    for ob in 0..outer {
        for &ix in indices {
            let i = if ix < 0 { ix + dim as i64 } else { ix };
            if i < 0 || i >= dim as i64 {
                return Err(Error::tensor(
                    what,
                    format!("index {ix} out of range for dimension of size {dim}"),
                ));
            }
            let s = (ob * dim + i as usize) * inner;
            o[w..w + inner].copy_from_slice(&src[s..s + inner]);
            w += inner;
        }
    }
    Ok(out)
}

pub(super) fn transpose(a: &Tensor, perm: &[usize]) -> Tensor {
    let es = a.dtype.size();
    let r = a.rank();
    let shape: Vec<usize> = perm.iter().map(|&p| a.shape[p]).collect();
    // Moving only dimensions of size 1 keeps the memory order: a view, no copy (decode's T = 1).
    let moved: Vec<usize> = perm.iter().copied().filter(|&p| a.shape[p] != 1).collect();
    if moved.windows(2).all(|w| w[0] < w[1]) {
        return a.reshaped(shape);
    }
    let mut in_strides = vec![0usize; r];
    let mut s = 1;
    for i in (0..r).rev() {
        in_strides[i] = s;
        s *= a.shape[i];
    }
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let src = a.bytes();
    let mut out = Tensor::zeros(a.dtype, &shape);
    let o = out.bytes_mut();
    // An innermost dimension that stays innermost is contiguous on both sides: copied as one run
    // (attention's [T, H, D] ↔ [H, T, D] moves rows of D).
    let (run, dims) = if perm[r - 1] == r - 1 {
        (shape[r - 1], r - 1)
    } else {
        (1, r)
    };
    let bytes = run * es;
    let n = numel(&shape[..dims]);
    let mut idx = vec![0usize; dims];
    let mut off = 0usize;
    for k in 0..n {
        o[k * bytes..(k + 1) * bytes].copy_from_slice(&src[off * es..off * es + bytes]);
        for d in (0..dims).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            off -= strides[d] * idx[d];
            idx[d] = 0;
        }
    }
    out
}

pub(super) fn concat(ctx: &Ctx, parts: &[&Tensor], axis: i64) -> Result<Tensor> {
    let first = parts.first().ok_or_else(|| ctx.err("no inputs"))?;
    let r = first.rank();
    let ax = norm_axis(ctx, axis, r)?;
    let mut shape = first.shape.clone();
    shape[ax] = 0;
    for p in parts {
        if p.rank() != r || p.dtype != first.dtype {
            return Err(ctx.err("inputs differ in rank or dtype"));
        }
        for d in 0..r {
            if d != ax && p.shape[d] != first.shape[d] {
                return Err(ctx.err(format!(
                    "shapes {:?} and {:?} differ off the concat axis",
                    first.shape, p.shape
                )));
            }
        }
        shape[ax] += p.shape[ax];
    }
    let es = first.dtype.size();
    let outer: usize = shape[..ax].iter().product();
    let inner: usize = shape[ax + 1..].iter().product::<usize>() * es;
    let mut out = Tensor::zeros(first.dtype, &shape);
    let o = out.bytes_mut();
    let mut w = 0;
    for ob in 0..outer {
        for p in parts {
            let chunk = p.shape[ax] * inner;
            o[w..w + chunk].copy_from_slice(&p.bytes()[ob * chunk..(ob + 1) * chunk]);
            w += chunk;
        }
    }
    Ok(out)
}

pub(super) fn expand(ctx: &Ctx, a: &Tensor, target: &[i64]) -> Result<Tensor> {
    let t: Vec<usize> = target.iter().map(|&d| d.max(0) as usize).collect();
    let shape = broadcast_shape(&a.shape, &t)
        .ok_or_else(|| ctx.err(format!("cannot expand {:?} to {:?}", a.shape, target)))?;
    let es = a.dtype.size();
    let offs = broadcast_offsets(&a.shape, &shape);
    let src = a.bytes();
    let mut out = Tensor::zeros(a.dtype, &shape);
    let o = out.bytes_mut();
    for (k, &off) in offs.iter().enumerate() {
        o[k * es..(k + 1) * es].copy_from_slice(&src[off * es..(off + 1) * es]);
    }
    Ok(out)
}

pub(super) fn range(ctx: &Ctx, s: &Tensor, l: &Tensor, d: &Tensor) -> Result<Tensor> {
    match s.dtype {
        DType::I64 | DType::I32 => {
            let (s, l, d) = (
                s.scalar_i64(&ctx.node.name)?,
                l.scalar_i64(&ctx.node.name)?,
                d.scalar_i64(&ctx.node.name)?,
            );
            if d == 0 {
                return Err(ctx.err("delta is zero"));
            }
            // i128: `l - s` of two hostile i64 values must not overflow.
            let n = ((l as i128 - s as i128) as f64 / d as f64).ceil().max(0.0) as usize;
            if n > (1 << 28) {
                return Err(ctx.err(format!("range of {n} elements is too large")));
            }
            let v: Vec<i64> = (0..n as i64).map(|i| s + i * d).collect();
            Ok(Tensor::i64(&[n], &v))
        }
        DType::F32 => {
            let (s, l, d) = (
                s.as_f32(&ctx.node.name)?[0],
                l.as_f32(&ctx.node.name)?[0],
                d.as_f32(&ctx.node.name)?[0],
            );
            let n = ((l - s) / d).ceil().max(0.0) as usize;
            if d == 0.0 || n > (1 << 28) {
                return Err(ctx.err("bad range"));
            }
            let v: Vec<f32> = (0..n).map(|i| s + i as f32 * d).collect();
            Ok(Tensor::f32(&[n], &v))
        }
        dt => Err(ctx.err(format!("Range on {dt} is not supported"))),
    }
}

pub(super) fn gather_elements(ctx: &Ctx, a: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let ax = norm_axis(ctx, ctx.node.attr_int("axis", 0), a.rank())?;
    if idx.rank() != a.rank() {
        return Err(ctx.err("indices rank differs from data rank"));
    }
    let ind = idx.to_i64_vec(&ctx.node.name)?;
    let es = a.dtype.size();
    let mut a_strides = vec![0usize; a.rank()];
    let mut s = 1;
    for i in (0..a.rank()).rev() {
        a_strides[i] = s;
        s *= a.shape[i];
    }
    let src = a.bytes();
    let mut out = Tensor::zeros(a.dtype, &idx.shape);
    let o = out.bytes_mut();
    let mut pos = vec![0usize; idx.rank()];
    for (k, &ix) in ind.iter().enumerate() {
        let dim = a.shape[ax] as i64;
        let i = if ix < 0 { ix + dim } else { ix };
        if i < 0 || i >= dim {
            return Err(ctx.err(format!("index {ix} out of range for axis of size {dim}")));
        }
        let mut off = 0;
        for d in 0..idx.rank() {
            let p = if d == ax { i as usize } else { pos[d] };
            if p >= a.shape[d] {
                return Err(ctx.err("indices shape exceeds data shape"));
            }
            off += p * a_strides[d];
        }
        o[k * es..(k + 1) * es].copy_from_slice(&src[off * es..(off + 1) * es]);
        for d in (0..idx.rank()).rev() {
            pos[d] += 1;
            if pos[d] < idx.shape[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    Ok(out)
}

/// ONNX `Pad` (opset 11–23): `pads` (int64, all begins then all ends) over all axes or the `axes` input;
/// modes `constant` (the optional `constant_value`, else 0), `reflect`, `edge` and `wrap`. A negative pad
/// crops that many elements first; the other pads then extend what is left.
pub(super) fn pad(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let name = &ctx.node.name;
    let x = input(ctx, inputs, 0)?;
    let pads = input(ctx, inputs, 1)?.to_i64_vec(name)?;
    let r = x.rank();
    let axes: Vec<usize> = match inputs.get(3).copied().flatten() {
        Some(t) => t
            .to_i64_vec(name)?
            .iter()
            .map(|&a| norm_axis(ctx, a, r))
            .collect::<Result<_>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(ctx.err(format!(
            "{} pads for {} axes (need two per axis)",
            pads.len(),
            axes.len()
        )));
    }
    let mode = attr_str(ctx, "mode", "constant")?;
    if !matches!(mode, "constant" | "reflect" | "edge" | "wrap") {
        return Err(ctx.err(format!(
            "mode `{mode}` is not one of constant, reflect, edge, wrap"
        )));
    }
    let es = x.dtype.size();
    let mut fill = vec![0u8; es];
    if let Some(c) = inputs.get(2).copied().flatten() {
        if c.dtype != x.dtype || c.numel() > 1 {
            return Err(ctx.err(format!(
                "constant_value must be one {} value, got {} {:?}",
                x.dtype, c.dtype, c.shape
            )));
        }
        if c.numel() == 1 {
            fill.copy_from_slice(c.bytes());
        }
    }
    let (mut begin, mut end) = (vec![0i64; r], vec![0i64; r]);
    let mut seen = vec![false; r];
    for (k, &a) in axes.iter().enumerate() {
        if std::mem::replace(&mut seen[a], true) {
            return Err(ctx.err(format!("axis {a} is listed twice")));
        }
        begin[a] = pads[k];
        end[a] = pads[k + axes.len()];
    }
    // Per axis, the source index of every output index (None: the constant).
    let mut maps: Vec<Vec<Option<usize>>> = Vec::with_capacity(r);
    let mut shape = Vec::with_capacity(r);
    for d in 0..r {
        let dim = x.shape[d] as i64;
        let (b, e) = (begin[d], end[d]);
        let (crop_b, crop_e) = (b.min(0).unsigned_abs(), e.min(0).unsigned_abs());
        let kept = (dim as u64)
            .checked_sub(crop_b)
            .and_then(|k| k.checked_sub(crop_e))
            .ok_or_else(|| ctx.err(format!("pads {b}, {e} crop more than axis {d}'s {dim}")))?;
        let out = kept
            .checked_add(b.max(0) as u64)
            .and_then(|o| o.checked_add(e.max(0) as u64))
            .filter(|&o| o <= MAX_OUTPUT_ELEMENTS as u64)
            .ok_or_else(|| ctx.err(format!("pads {b}, {e} make axis {d} too long")))?;
        if kept == 0 && out > 0 && mode != "constant" {
            return Err(ctx.err(format!("cannot {mode}-pad axis {d}: nothing of it is left")));
        }
        let (kept, lead) = (kept as i64, b.max(0));
        let map = (0..out as i64)
            .map(|o| {
                let j = o - lead;
                let j = if (0..kept).contains(&j) {
                    j
                } else {
                    match mode {
                        "edge" => j.clamp(0, kept - 1),
                        "wrap" => j.rem_euclid(kept),
                        "reflect" if kept == 1 => 0,
                        "reflect" => {
                            let m = j.rem_euclid(2 * (kept - 1));
                            if m >= kept {
                                2 * (kept - 1) - m
                            } else {
                                m
                            }
                        }
                        _ => return None,
                    }
                };
                Some(j as usize + crop_b as usize)
            })
            .collect();
        maps.push(map);
        shape.push(out as usize);
    }
    if shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none_or(|n| n > MAX_OUTPUT_ELEMENTS)
    {
        return Err(ctx.err(format!("padded shape {shape:?} is too large")));
    }
    if r == 0 {
        return Ok(x.clone());
    }
    let src = x.bytes();
    let mut out = Tensor::zeros(x.dtype, &shape);
    let n_out = out.numel();
    let o = out.bytes_mut();
    let last = shape[r - 1];
    if last == 0 || n_out == 0 {
        return Ok(out);
    }
    let mut in_strides = vec![1usize; r];
    for d in (0..r - 1).rev() {
        in_strides[d] = in_strides[d + 1] * x.shape[d + 1];
    }
    let mut idx = vec![0usize; r - 1];
    for (row, dst) in o.chunks_mut(last * es).enumerate() {
        if row > 0 {
            next_row(&mut idx, &shape);
        }
        let base: Option<usize> =
            (0..r - 1).try_fold(0, |acc, d| maps[d][idx[d]].map(|s| acc + s * in_strides[d]));
        for (k, e) in dst.chunks_mut(es).enumerate() {
            match (base, maps[r - 1][k]) {
                (Some(b), Some(s)) => e.copy_from_slice(&src[(b + s) * es..(b + s + 1) * es]),
                _ => e.copy_from_slice(&fill),
            }
        }
    }
    Ok(out)
}

/// ONNX `Slice` (opset 13): `starts`, `ends`, optional `axes` and `steps` (int32 or int64); negative
/// indices count from the end, out-of-range ones are clamped, negative steps walk backwards.
pub(super) fn slice(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let name = &ctx.node.name;
    let x = input(ctx, inputs, 0)?;
    let starts = input(ctx, inputs, 1)?.to_i64_vec(name)?;
    let ends = input(ctx, inputs, 2)?.to_i64_vec(name)?;
    let r = x.rank();
    let axes: Vec<usize> = match inputs.get(3).copied().flatten() {
        Some(t) => t
            .to_i64_vec(name)?
            .iter()
            .map(|&a| norm_axis(ctx, a, r))
            .collect::<Result<_>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = match inputs.get(4).copied().flatten() {
        Some(t) => t.to_i64_vec(name)?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(ctx.err(format!(
            "starts, ends, axes, steps have {}, {}, {}, {} entries",
            starts.len(),
            ends.len(),
            axes.len(),
            steps.len()
        )));
    }
    if axes.iter().any(|&a| a >= r) {
        return Err(ctx.err(format!("an axis is out of range for rank {r}")));
    }
    // Per axis: first index, step, length.
    let mut first = vec![0i64; r];
    let mut step = vec![1i64; r];
    let mut shape = x.shape.clone();
    let mut seen = vec![false; r];
    for k in 0..axes.len() {
        let (a, s) = (axes[k], steps[k]);
        if std::mem::replace(&mut seen[a], true) {
            return Err(ctx.err(format!("axis {a} is listed twice")));
        }
        if s == 0 {
            return Err(ctx.err("a step is 0"));
        }
        let dim = x.shape[a] as i64;
        let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (b, e) = (wrap(starts[k]), wrap(ends[k]));
        let len = if dim == 0 {
            0
        } else if s > 0 {
            let (b, e) = (b.clamp(0, dim), e.clamp(0, dim));
            first[a] = b;
            if e > b {
                (e - b - 1) / s + 1
            } else {
                0
            }
        } else {
            let (b, e) = (b.clamp(0, dim - 1), e.clamp(-1, dim - 1));
            first[a] = b;
            if b > e {
                (b - e - 1) / s.saturating_neg() + 1
            } else {
                0
            }
        };
        step[a] = s;
        shape[a] = len as usize;
    }
    let es = x.dtype.size();
    let mut out = Tensor::zeros(x.dtype, &shape);
    if r == 0 || out.numel() == 0 {
        return Ok(out.reshaped(shape));
    }
    let mut in_strides = vec![1i64; r];
    for d in (0..r - 1).rev() {
        in_strides[d] = in_strides[d + 1] * x.shape[d + 1] as i64;
    }
    let src = x.bytes();
    let o = out.bytes_mut();
    let last = shape[r - 1];
    let mut idx = vec![0usize; r - 1];
    for (row, dst) in o.chunks_mut(last * es).enumerate() {
        if row > 0 {
            next_row(&mut idx, &shape);
        }
        let base: i64 = (0..r - 1)
            .map(|d| (first[d] + idx[d] as i64 * step[d]) * in_strides[d])
            .sum::<i64>()
            + first[r - 1];
        if step[r - 1] == 1 {
            let b = base as usize * es;
            dst.copy_from_slice(&src[b..b + last * es]);
        } else {
            for (k, e) in dst.chunks_mut(es).enumerate() {
                let s = (base + k as i64 * step[r - 1]) as usize * es;
                e.copy_from_slice(&src[s..s + es]);
            }
        }
    }
    Ok(out)
}

/// Steps `idx` (the leading `idx.len()` axes of `shape`, last fastest) to the next row of a walk over
/// every row of the last axis, wrapping to zeros after the last.
fn next_row(idx: &mut [usize], shape: &[usize]) {
    for d in (0..idx.len()).rev() {
        idx[d] += 1;
        if idx[d] < shape[d] {
            return;
        }
        idx[d] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::tests::run;
    use crate::graph::Attr;

    #[test]
    fn reshape_infers_and_copies_dims() {
        let a = Tensor::f32(&[2, 3, 4], &(0..24).map(|x| x as f32).collect::<Vec<_>>());
        let s = Tensor::i64(&[3], &[0, -1, 2]);
        let o = run("Reshape", &[], &[&a, &s]).unwrap().remove(0);
        assert_eq!(o.shape, vec![2, 6, 2]);
        let bad = Tensor::i64(&[2], &[5, -1]);
        assert!(run("Reshape", &[], &[&a, &bad]).is_err());
    }

    #[test]
    fn gather_negative_and_out_of_range_indices() {
        let a = Tensor::f32(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
        let i = Tensor::i64(&[2], &[-1, 0]);
        let o = run("Gather", &[("axis", Attr::Int(0))], &[&a, &i])
            .unwrap()
            .remove(0);
        assert_eq!(o.typed::<f32>(), &[5., 6., 1., 2.]);
        let bad = Tensor::i64(&[1], &[3]);
        let e = run("Gather", &[], &[&a, &bad]).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn transpose_every_permutation_of_four_axes() {
        let shape = [2usize, 3, 4, 5];
        let vals: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let a = Tensor::f32(&shape, &vals);
        let perms: Vec<[usize; 4]> = (0..256)
            .map(|n| [n % 4, n / 4 % 4, n / 16 % 4, n / 64])
            .filter(|p| (0..4).all(|i| p.contains(&i)))
            .collect();
        assert_eq!(perms.len(), 24);
        for p in perms {
            let got = transpose(&a, &p);
            let out_shape: Vec<usize> = p.iter().map(|&d| shape[d]).collect();
            assert_eq!(got.shape, out_shape);
            // Output element k: its index digits (last axis fastest), each the input axis p[i]'s.
            for (k, &v) in got.typed::<f32>().iter().enumerate() {
                let mut at = [0usize; 4];
                let mut rest = k;
                for i in (0..4).rev() {
                    at[p[i]] = rest % out_shape[i];
                    rest /= out_shape[i];
                }
                let want = ((at[0] * 3 + at[1]) * 4 + at[2]) * 5 + at[3];
                assert_eq!(v, want as f32, "perm {p:?} at {k}");
            }
        }
    }

    #[test]
    fn transpose_real_and_view() {
        let a = Tensor::f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let o = run("Transpose", &[("perm", Attr::Ints(vec![1, 0]))], &[&a])
            .unwrap()
            .remove(0);
        assert_eq!(o.typed::<f32>(), &[1., 4., 2., 5., 3., 6.]);
        let b = Tensor::f32(&[1, 1, 2, 3], &[1., 2., 3., 4., 5., 6.]);
        let o = run(
            "Transpose",
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
            &[&b],
        )
        .unwrap()
        .remove(0);
        assert_eq!(o.shape, vec![1, 2, 1, 3]);
        assert_eq!(o.typed::<f32>(), b.typed::<f32>());
    }

    /// Fuzz regression (onnx_load): a Concat of rank-0 tensors indexed an empty shape.
    #[test]
    fn axis_ops_refuse_scalars() {
        let a = Tensor::i64(&[], &[1]);
        let b = Tensor::i64(&[], &[2]);
        assert!(run("Concat", &[("axis", Attr::Int(0))], &[&a, &b]).is_err());
        assert!(run(
            "Softmax",
            &[("axis", Attr::Int(0))],
            &[&Tensor::f32(&[], &[1.0])]
        )
        .is_err());
        let ok = run(
            "Concat",
            &[("axis", Attr::Int(0))],
            &[&Tensor::i64(&[1], &[1]), &b],
        );
        assert!(ok.is_err(), "rank mismatch is an error too");
    }

    #[test]
    fn range_survives_i64_extremes() {
        let s = Tensor::i64(&[], &[i64::MIN]);
        let l = Tensor::i64(&[], &[i64::MAX]);
        let d = Tensor::i64(&[], &[1]);
        assert!(run("Range", &[], &[&s, &l, &d]).is_err());
    }

    #[test]
    fn range_is_bounded() {
        let (s, l, d) = (
            Tensor::i64(&[], &[0]),
            Tensor::i64(&[], &[i64::MAX]),
            Tensor::i64(&[], &[1]),
        );
        assert!(
            run("Range", &[], &[&s, &l, &d]).is_err(),
            "a huge range must be refused"
        );
    }

    #[test]
    fn pad_modes_and_negative_pads() {
        let a = Tensor::f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let pads = |v: &[i64]| Tensor::i64(&[v.len()], v);
        let pad = |mode: &str, p: &[i64]| {
            run("Pad", &[("mode", Attr::Str(mode.into()))], &[&a, &pads(p)])
                .unwrap()
                .remove(0)
        };
        let o = pad("constant", &[0, 1, 1, 0]);
        assert_eq!(o.shape, vec![3, 4]);
        assert_eq!(
            o.typed::<f32>(),
            &[0., 1., 2., 3., 0., 4., 5., 6., 0., 0., 0., 0.]
        );
        let o = pad("reflect", &[0, 2, 0, 3]);
        assert_eq!(
            o.typed::<f32>(),
            &[3., 2., 1., 2., 3., 2., 1., 2., 6., 5., 4., 5., 6., 5., 4., 5.]
        );
        let o = pad("edge", &[0, 1, 0, 1]);
        assert_eq!(o.typed::<f32>(), &[1., 1., 2., 3., 3., 4., 4., 5., 6., 6.]);
        let o = pad("wrap", &[1, 2, 0, 0]);
        assert_eq!(
            o.typed::<f32>(),
            &[5., 6., 4., 5., 6., 2., 3., 1., 2., 3., 5., 6., 4., 5., 6.]
        );
        // Crop one column on the left, pad one on the right with 9.
        let nine = Tensor::f32(&[], &[9.0]);
        let axes = Tensor::i64(&[1], &[-1]);
        let o = run("Pad", &[], &[&a, &pads(&[-1, 1]), &nine, &axes])
            .unwrap()
            .remove(0);
        assert_eq!(o.typed::<f32>(), &[2., 3., 9., 5., 6., 9.]);
        assert!(run("Pad", &[], &[&a, &pads(&[0, -4, 0, 0])]).is_err());
        let i = Tensor::i64(&[2], &[7, 8]);
        let o = run("Pad", &[], &[&i, &pads(&[1, 1])]).unwrap().remove(0);
        assert_eq!(o.typed::<i64>(), &[0, 7, 8, 0]);
    }

    #[test]
    fn slice_steps_and_clamping() {
        let a = Tensor::f32(&[3, 4], &(0..12).map(|v| v as f32).collect::<Vec<_>>());
        let t = |v: &[i64]| Tensor::i64(&[v.len()], v);
        let sl = |s: &[i64], e: &[i64], ax: &[i64], st: &[i64]| {
            run("Slice", &[], &[&a, &t(s), &t(e), &t(ax), &t(st)])
                .unwrap()
                .remove(0)
        };
        let o = sl(&[-1, 3], &[i64::MIN, 0], &[0, 1], &[-2, -1]);
        assert_eq!(o.shape, vec![2, 3]);
        assert_eq!(o.typed::<f32>(), &[11., 10., 9., 3., 2., 1.]);
        let o = sl(&[1], &[i64::MAX], &[-1], &[2]);
        assert_eq!(o.typed::<f32>(), &[1., 3., 5., 7., 9., 11.]);
        let o = sl(&[5], &[10], &[0], &[1]);
        assert_eq!(o.shape, vec![0, 4]);
        let bad = run("Slice", &[], &[&a, &t(&[0]), &t(&[1]), &t(&[0]), &t(&[0])]);
        assert!(bad.is_err(), "step 0");
        let empty = Tensor::f32(&[0, 2], &[]);
        let o = run(
            "Slice",
            &[],
            &[&empty, &t(&[-1]), &t(&[-5]), &t(&[0]), &t(&[-1])],
        )
        .unwrap()
        .remove(0);
        assert_eq!(o.shape, vec![0, 2]);
    }
}
