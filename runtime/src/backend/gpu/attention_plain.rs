//! A plain ONNX `Attention` on the GPU (`attention_plain.wgsl`): T queries over S keys and values
//! given as tensors — no past inputs, no mask — with the `scale`, `softcap` and `is_causal`
//! attributes; KV heads shared by groups of query heads. Whisper's decoder reads its cross-attention
//! this way (the encoder's K/V for the window), so with it a decoder step stays on the GPU. One
//! workgroup a (head, token), two passes over the keys as the cache attention's (`attention.wgsl`);
//! the CPU's generic op is the reference it is tested against.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this kernel.
pub const SOURCE: &str = include_str!("attention_plain.wgsl");

/// Largest head size (of queries and keys, and of values) the kernel takes: each of its 64 threads
/// accumulates 4 output dims, and the query row sits in 256 floats of shared memory.
pub const MAX_HEAD_DIM: usize = 256;

/// The kernel: bindings Q, K, V, O.
pub fn kernel(ctx: &GpuContext) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "attention_plain",
        SOURCE,
        "attention_plain",
        &[Bind::Read, Bind::Read, Bind::Read, Bind::Write],
        &[],
    )
}

/// The shape of one plain attention: heads, KV heads, queries, keys, head sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Query heads (a multiple of `kvh`).
    pub h: usize,
    /// KV heads.
    pub kvh: usize,
    /// Query rows.
    pub t: usize,
    /// Keys (and values).
    pub s: usize,
    /// Head size of queries and keys.
    pub d: usize,
    /// Head size of values.
    pub dv: usize,
}

impl Shape {
    /// Whether the kernel takes it: non-empty, whole groups of heads, head sizes within
    /// [`MAX_HEAD_DIM`].
    pub fn fits(&self) -> bool {
        [self.h, self.kvh, self.t, self.s, self.d, self.dv]
            .iter()
            .all(|&n| n > 0)
            && self.h.is_multiple_of(self.kvh)
            && self.d <= MAX_HEAD_DIM
            && self.dv <= MAX_HEAD_DIM
    }

    /// Workgroups: one a (head, token).
    pub fn items(&self) -> usize {
        self.h * self.t
    }
}

/// Parameters: the shape, the score scale, the soft cap (0: none), causal.
pub fn params(s: &Shape, scale: f32, softcap: f32, causal: bool) -> Params {
    Params::new()
        .u(s.h)
        .u(s.kvh)
        .u(s.t)
        .u(s.d)
        .u(s.s)
        .u(s.dv)
        .f(scale)
        .f(softcap)
        .u(causal as usize)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{ctx, max_rel, noise};
    use super::super::{exec::run_kernel_once, grid};
    use super::*;
    use crate::backend::cpu::ops;
    use crate::graph::{Attr, Node};
    use crate::tensor::Tensor;

    /// Every shape (Whisper's cross-attention, grouped heads, odd sizes, Dv ≠ D, one key, D = 256)
    /// with the attributes, against the CPU's generic op.
    #[test]
    fn matches_the_cpu_generic_op() {
        let Some(ctx) = ctx() else { return };
        let k = kernel(&ctx).unwrap();
        let shapes = [
            (6, 6, 1, 1500, 64, 64),
            (6, 6, 5, 1500, 64, 64),
            (4, 2, 3, 37, 24, 40),
            (2, 1, 7, 1, 8, 8),
            (1, 1, 2, 130, 256, 256),
            (3, 3, 70, 65, 17, 19),
        ];
        let attrs: [Vec<(&str, Attr)>; 3] = [
            vec![],
            vec![("scale", Attr::Float(0.3)), ("softcap", Attr::Float(5.0))],
            vec![("is_causal", Attr::Int(1))],
        ];
        for (i, &(h, kvh, t, s, d, dv)) in shapes.iter().enumerate() {
            for a in &attrs {
                let sh = Shape {
                    h,
                    kvh,
                    t,
                    s,
                    d,
                    dv,
                };
                assert!(sh.fits());
                let seed = (i * 10) as u64;
                // Q large enough that the softmax is far from uniform.
                let q: Vec<f32> = noise(h * t * d, seed).iter().map(|x| 2.0 * x).collect();
                let kk: Vec<f32> = noise(kvh * s * d, seed + 1)
                    .iter()
                    .map(|x| 2.0 * x)
                    .collect();
                let v = noise(kvh * s * dv, seed + 2);
                let node = Node {
                    name: "attn".into(),
                    op: "Attention".into(),
                    domain: String::new(),
                    inputs: vec!["q".into(), "k".into(), "v".into()],
                    outputs: vec!["y".into()],
                    attrs: a.iter().map(|(n, v)| (n.to_string(), v.clone())).collect(),
                };
                let (qt, kt, vt) = (
                    Tensor::f32(&[1, h, t, d], &q),
                    Tensor::f32(&[1, kvh, s, d], &kk),
                    Tensor::f32(&[1, kvh, s, dv], &v),
                );
                let want = ops::run_node(&node, &[Some(&qt), Some(&kt), Some(&vt)]).unwrap();
                let scale = node.attr_float("scale", 1.0 / (d as f32).sqrt());
                let cap = node.attr_float("softcap", 0.0);
                let causal = node.attr_int("is_causal", 0) == 1;
                let got = run_kernel_once(
                    &ctx,
                    &k,
                    &params(&sh, scale, cap, causal),
                    &[
                        bytemuck::cast_slice(&q),
                        bytemuck::cast_slice(&kk),
                        bytemuck::cast_slice(&v),
                    ],
                    h * t * dv * 4,
                    grid(sh.items(), 1, ctx.max_groups),
                )
                .unwrap();
                let e = max_rel(bytemuck::cast_slice(&got), want[0].typed::<f32>());
                assert!(e < 2e-5, "{sh:?} {a:?}: {e}");
            }
        }
    }
}
