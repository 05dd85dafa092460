//! ONNX `Attention` (opset 23), the reference the fused attention kernels are tested against, and
//! `RotaryEmbedding` (on the kernel of `cpu/rope.rs`).

use super::elementwise::cast;
use super::reduce::softmax_rows;
use super::shape::transpose;
use super::{broadcast_shape, input, Ctx};
use crate::backend::cpu::{rope, KernelError};
use crate::error::Result;
use crate::graph::{Attr, DType};
use crate::tensor::Tensor;

/// ONNX `RotaryEmbedding`: `x` as `[B, H, S, D]`, or `[B, S, H·D]` with `num_heads`; with
/// `position_ids` (`[B, S]`) the caches are tables `[positions, R/2]` indexed by them, without they are
/// `[B, S, R/2]`, one row a token.
pub(super) fn rotary(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let x = input(ctx, inputs, 0)?;
    let name = &ctx.node.name;
    let cos = input(ctx, inputs, 1)?.as_f32(name)?;
    let sin = input(ctx, inputs, 2)?.as_f32(name)?;
    let pos = match inputs.get(3).copied().flatten() {
        Some(p) => Some(p.to_i64_vec(name)?),
        None => None,
    };
    let (b, h, t, d, tokens_first) = match x.shape[..] {
        [b, h, t, d] => (b, h, t, d, false),
        [b, t, hd] => {
            let h = usize::try_from(ctx.node.attr_int("num_heads", 0)).unwrap_or(0);
            if h == 0 || hd % h != 0 {
                return Err(ctx.err(format!(
                    "3-D input {:?} needs num_heads dividing its last dim",
                    x.shape
                )));
            }
            (b, h, t, hd / h, true)
        }
        _ => {
            return Err(ctx.err(format!(
                "RotaryEmbedding takes [B, H, S, D] or [B, S, H·D]; got {:?}",
                x.shape
            )))
        }
    };
    let rot = match ctx.node.attr_int("rotary_embedding_dim", 0) {
        0 => d,
        r if r > 0 => r as usize,
        r => return Err(ctx.err(format!("rotary_embedding_dim {r} is negative"))),
    };
    let shape = rope::RopeShape {
        heads: h,
        tokens: t,
        head_dim: d,
        rotary_dim: rot,
        tokens_first,
        interleaved: ctx.node.attr_int("interleaved", 0) != 0,
    };
    let mut out = Tensor::f32(&x.shape, x.as_f32(name)?);
    let per = h * t * d;
    let rows = t * (rot / 2);
    let own: Vec<i64> = (0..t as i64).collect();
    for (bi, xb) in out
        .typed_mut::<f32>()
        .chunks_mut(per.max(1))
        .enumerate()
        .take(b)
    {
        let r = match &pos {
            Some(p) if p.len() == b * t => {
                rope::rope_in_place(xb, &shape, cos, sin, &p[bi * t..(bi + 1) * t])
            }
            Some(p) => Err(KernelError::Length {
                kernel: "rotary",
                what: "position_ids",
                got: p.len(),
                expected: b * t,
            }),
            None if cos.len() == b * rows && sin.len() == b * rows => {
                let (c, s) = (&cos[bi * rows..][..rows], &sin[bi * rows..][..rows]);
                rope::rope_in_place(xb, &shape, c, s, &own)
            }
            None => Err(KernelError::Length {
                kernel: "rotary",
                what: "cos_cache without position_ids",
                got: cos.len(),
                expected: b * rows,
            }),
        };
        r.map_err(|e| ctx.err(e.to_string()))?;
    }
    Ok(out)
}

/// Q, K or V of `Attention` as `[B, H, S, D]` values: a 4-D input as it is, a 3-D `[B, S, H·D]` one
/// split into `heads` (the `q_num_heads` / `kv_num_heads` attribute) and transposed.
fn attention_heads(ctx: &Ctx, x: &Tensor, heads: i64) -> Result<(Vec<f32>, [usize; 4])> {
    let v = x.to_f32_vec(&ctx.node.name)?;
    match x.shape[..] {
        [b, h, s, d] => Ok((v, [b, h, s, d])),
        [b, s, hd] => {
            let h = usize::try_from(heads).unwrap_or(0);
            if h == 0 || hd % h != 0 {
                return Err(ctx.err(format!(
                    "3-D input {:?} needs q_num_heads/kv_num_heads dividing its last dim",
                    x.shape
                )));
            }
            let t = transpose(&Tensor::f32(&[b, s, h, hd / h], &v), &[0, 2, 1, 3]);
            Ok((t.typed::<f32>().to_vec(), [b, h, s, hd / h]))
        }
        _ => Err(ctx.err(format!(
            "Attention takes 3-D or 4-D Q, K, V; got {:?}",
            x.shape
        ))),
    }
}

/// ONNX `Attention` (opset 23): softmax(cap(Q·Kᵀ·scale) + mask) · V per batch and head (`cap` the
/// `softcap` attribute's `c·tanh(s/c)` where it is set), K/V heads shared by
/// groups of Q heads, the mask (bool or additive) broadcast to `[B, Hq, T, S]`, `is_causal` keeping keys
/// `s ≤ t` (the upper-left alignment ONNX specifies; the exporter writes explicit masks, and the planner
/// fuses only attentions without `is_causal`). The output has Q's dtype and layout (3-D in, 3-D out).
pub(super) fn attention(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let q = input(ctx, inputs, 0)?;
    let k = input(ctx, inputs, 1)?;
    let v = input(ctx, inputs, 2)?;
    let mask = inputs.get(3).copied().flatten();
    if inputs.len() > 4 && inputs[4..].iter().any(|i| i.is_some()) {
        return Err(ctx.err("Attention past_key/past_value inputs are not supported"));
    }
    // Gemma 2's cap on the scaled scores, before the mask (as the ONNX reference applies it).
    let softcap = ctx.node.attr_float("softcap", 0.0);
    if !(softcap >= 0.0 && softcap.is_finite()) {
        return Err(ctx.err(format!("softcap {softcap} must be a finite value ≥ 0")));
    }
    let name = &ctx.node.name;
    let (qv, [b, hq, t, d]) = attention_heads(ctx, q, ctx.node.attr_int("q_num_heads", 0))?;
    let kv_heads = ctx.node.attr_int("kv_num_heads", 0);
    let (kv, [bk, hk, s, dk]) = attention_heads(ctx, k, kv_heads)?;
    let (vv, [bv, hv, sv, dv]) = attention_heads(ctx, v, kv_heads)?;
    if bk != b || bv != b || hk == 0 || hq % hk != 0 || dk != d || hv != hk || sv != s {
        return Err(ctx.err(format!(
            "incompatible shapes Q {:?} K {:?} V {:?}",
            q.shape, k.shape, v.shape
        )));
    }
    let scale = match ctx.node.attrs.get("scale") {
        Some(Attr::Float(f)) => *f,
        _ => 1.0 / (d as f32).sqrt(),
    };
    let causal = ctx.node.attr_int("is_causal", 0) != 0;
    // The mask as an additive bias, read through its broadcast strides over [B, Hq, T, S] (0 where it
    // has one element on that axis).
    let full = [b, hq, t, s];
    let bias: Option<(Vec<f32>, [usize; 4])> = match mask {
        None => None,
        Some(m) => {
            if m.rank() > 4 || broadcast_shape(&m.shape, &full).as_deref() != Some(&full[..]) {
                return Err(ctx.err(format!(
                    "attn_mask {:?} does not broadcast to {full:?}",
                    m.shape
                )));
            }
            let vals = if m.dtype == DType::Bool {
                let keep = m.typed::<u8>();
                keep.iter()
                    .map(|&k| if k != 0 { 0.0 } else { f32::NEG_INFINITY })
                    .collect()
            } else {
                m.to_f32_vec(name)?
            };
            let mut strides = [0usize; 4];
            let mut stride = 1;
            for (i, &dim) in m.shape.iter().enumerate().rev() {
                strides[4 - m.rank() + i] = if dim == 1 { 0 } else { stride };
                stride *= dim;
            }
            Some((vals, strides))
        }
    };
    let group = hq / hk;
    let mut o = vec![0.0f32; b * hq * t * dv];
    let mut scores = vec![0.0f32; s];
    for bi in 0..b {
        for h in 0..hq {
            let kh = bi * hk + h / group;
            for ti in 0..t {
                let row = (bi * hq + h) * t + ti;
                let qrow = &qv[row * d..][..d];
                let mrow = bias
                    .as_ref()
                    .map(|(_, st)| bi * st[0] + h * st[1] + ti * st[2]);
                for (si, sc) in scores.iter_mut().enumerate() {
                    let krow = &kv[(kh * s + si) * d..][..d];
                    let dot: f32 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    *sc = dot * scale;
                    if softcap > 0.0 {
                        *sc = softcap * (*sc / softcap).tanh();
                    }
                    if let (Some((vals, st)), Some(m0)) = (&bias, mrow) {
                        *sc += vals[m0 + si * st[3]];
                    }
                    if causal && si > ti {
                        *sc = f32::NEG_INFINITY;
                    }
                }
                softmax_rows(&mut scores, s);
                let orow = &mut o[row * dv..][..dv];
                for (si, &p) in scores.iter().enumerate() {
                    if p != 0.0 {
                        let vrow = &vv[(kh * s + si) * dv..][..dv];
                        for (o, &x) in orow.iter_mut().zip(vrow) {
                            *o += p * x;
                        }
                    }
                }
            }
        }
    }
    let mut out = Tensor::f32(&[b, hq, t, dv], &o);
    if q.rank() == 3 {
        out = transpose(&out, &[0, 2, 1, 3]);
        out.shape = vec![b, t, hq * dv];
    }
    cast(ctx, &out, q.dtype)
}
