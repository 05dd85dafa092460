//! Attention over the caller-owned static cache (`attention.wgsl`), fused with the write of the chunk's
//! new K/V rows into that cache. Visits only slots `< npast` plus the chunk's rows; the additive mask is
//! applied to every visited key.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this family (with the shared f16 helpers), reading the Attention node's own inputs.
pub const SOURCE: &str = concat!(
    include_str!("f16.wgsl"),
    include_str!("attention_in.wgsl"),
    include_str!("attention.wgsl")
);
/// The same kernels reading the q/k/v projections token-major, with the rotary embedding and the f16
/// rounding of the new rows done on the way (`attention_rope_in.wgsl`).
pub const ROPE_SOURCE: &str = concat!(
    include_str!("f16.wgsl"),
    "const QKNORM: bool = false;\n",
    "fn qn(j: u32) -> f32 { return 1.0; }\n",
    "fn kn(j: u32) -> f32 { return 1.0; }\n",
    include_str!("attention_rope_in.wgsl"),
    include_str!("attention.wgsl")
);
/// [`ROPE_SOURCE`] with each head of q and k RMS-normalized before the rotation (`attention_qk_norm.wgsl`:
/// the norms' scales bound at 11-12).
pub const ROPE_NORM_SOURCE: &str = concat!(
    include_str!("f16.wgsl"),
    include_str!("attention_qk_norm.wgsl"),
    include_str!("attention_rope_in.wgsl"),
    include_str!("attention.wgsl")
);

/// Where an attention kernel's inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inputs {
    /// The Attention node's inputs: queries `[1, H, T, D]`, new rows `[1, KVH, T, D]`.
    Graph,
    /// The projections `[T, H, D]` / `[T, KVH, D]`, rotated here (pairs when `interleaved`) and, with
    /// an f16 cache, the new rows rounded through f16: bindings COS, SIN, POS after O; with `qk_norm`,
    /// each head of q and k RMS-normalized first: bindings QN, KN (their scales) after those, the
    /// epsilons in [`AttnParams::qk_norm_eps`].
    Rope {
        /// Interleaved rotary pairs.
        interleaved: bool,
        /// q and k normalized per head before the rotation.
        qk_norm: bool,
    },
}

impl Inputs {
    /// Storage bindings a kernel with these inputs uses.
    pub fn bindings(self) -> u32 {
        match self {
            Inputs::Graph => 7,
            Inputs::Rope { qk_norm: false, .. } => 10,
            Inputs::Rope { qk_norm: true, .. } => 12,
        }
    }
}

fn pipeline(ctx: &GpuContext, entry: &str, f16_cache: bool, inputs: Inputs) -> Result<Arc<Kernel>> {
    let mut binds = vec![
        Bind::Read,
        Bind::Read,
        Bind::Read,
        Bind::Read,
        Bind::Write,
        Bind::Write,
        Bind::Write,
    ];
    let f16 = if f16_cache { 1.0 } else { 0.0 };
    match inputs {
        Inputs::Graph => ctx.pipeline("attention", SOURCE, entry, &binds, &[("F16C", f16)]),
        Inputs::Rope {
            interleaved,
            qk_norm,
        } => {
            binds.extend([Bind::Read; 3]);
            let (key, source) = match qk_norm {
                false => ("attention_rope", ROPE_SOURCE),
                true => {
                    binds.extend([Bind::Read; 2]);
                    ("attention_rope_norm", ROPE_NORM_SOURCE)
                }
            };
            ctx.pipeline(
                key,
                source,
                entry,
                &binds,
                &[
                    ("F16C", f16),
                    ("INTERLEAVED", f64::from(u8::from(interleaved))),
                ],
            )
        }
    }
}
/// Largest head size the kernel takes (its per-thread accumulators cover 4 × 64 dims).
pub const MAX_HEAD_DIM: usize = 256;

/// The kernel for an f16 (`f16_cache`) or f32 cache: bindings Q, NK, NV, MASK, CK, CV, O (then COS,
/// SIN, POS for [`Inputs::Rope`]). `rows`: the one-(head, token)-an-invocation variant
/// (`attention_rows`, see [`super::rows_variant`]).
pub fn kernel(
    ctx: &GpuContext,
    f16_cache: bool,
    rows: bool,
    inputs: Inputs,
) -> Result<Arc<Kernel>> {
    let entry = if rows { "attention_rows" } else { "attention" };
    pipeline(ctx, entry, f16_cache, inputs)
}

/// Whether the one-(head, token)-an-invocation variant may run `keys` keys of `head_dim`: it needs
/// `head_dim % 4 == 0` and stays within llvmpipe's 65535 loop iterations an invocation (the variant is
/// for CPU adapters; the barrier variant has no such bound).
pub fn rows_ok(head_dim: usize, keys: usize) -> bool {
    head_dim.is_multiple_of(4) && head_dim <= MAX_HEAD_DIM && (3 * head_dim / 4 + 2) * keys < 65_000
}

/// Keys a workgroup attends when a decode step's keys are split over workgroups.
pub const SPLIT_CHUNK: usize = 64;

/// Workgroups for `items` (head, token) pairs.
pub fn groups(ctx: &GpuContext, items: usize, rows: bool) -> (u32, u32, u32) {
    let (x, y) = super::grid(items, if rows { 64 } else { 1 }, ctx.max_groups);
    (x, y, 1)
}

/// The kernel of one cache segment (`attention_part`, same bindings as [`kernel`], O = the partials).
pub fn part_kernel(ctx: &GpuContext, f16_cache: bool, inputs: Inputs) -> Result<Arc<Kernel>> {
    pipeline(ctx, "attention_part", f16_cache, inputs)
}

/// The WGSL of the combine step.
pub const COMBINE_SOURCE: &str = include_str!("attention_combine.wgsl");

/// The kernel combining the segments' partials (`attention_combine`): bindings PART, O.
pub fn combine_kernel(ctx: &GpuContext) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "attention_combine",
        COMBINE_SOURCE,
        "attention_combine",
        &[Bind::Read, Bind::Write],
        &[],
    )
}

/// One segment of a cache split over several buffers.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// First slot in the segment's buffers.
    pub r0: usize,
    /// End slot (exclusive).
    pub r1: usize,
    /// This dispatch also attends to the chunk's own rows.
    pub with_new: bool,
    /// Segment index (its place in the partials).
    pub index: usize,
    /// Segments in all.
    pub count: usize,
}

/// What one attention dispatch computes.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Tokens in the chunk.
    pub tokens: usize,
    /// Head size.
    pub head_dim: usize,
    /// Cache slots.
    pub slots: usize,
    /// Cache slots visited (`≤ slots`).
    pub npast: usize,
    /// The first key visited (a sliding window's start for the chunk's first row; the mask masks the
    /// rest per row). The segment kernels (`attention_part`) visit from their segment's start.
    pub key_start: usize,
    /// Slot where the chunk's rows are written.
    pub position: usize,
    /// Score scale.
    pub scale: f32,
    /// Soft cap of the scaled scores, `c·tanh(s/c)` (0: none).
    pub softcap: f32,
    /// Output `[1, T, H, D]` instead of `[1, H, T, D]`.
    pub tokens_first: bool,
    /// Write the new rows into the cache.
    pub write_cache: bool,
    /// Mask row stride, when there is a mask.
    pub mask_stride: Option<usize>,
    /// The cache segment this dispatch covers (`attention_part` / `attention_combine`).
    pub segment: Option<Segment>,
    /// Split keys (`attention` only): `(keys a chunk, chunks)`, one workgroup z a chunk, partials out.
    pub split: Option<(usize, usize)>,
    /// The epsilons of q's and k's head norms ([`Inputs::Rope`] with `qk_norm`; zeros otherwise).
    pub qk_norm_eps: [f32; 2],
}

impl AttnParams {
    /// The parameter block.
    pub fn params(&self) -> Params {
        Params::new()
            .u(self.heads)
            .u(self.kv_heads)
            .u(self.tokens)
            .u(self.head_dim)
            .u(self.slots)
            .u(self.npast)
            .u(self.position)
            .f(self.scale)
            .u(self.tokens_first as usize)
            .u(self.write_cache as usize)
            .u(self.mask_stride.is_some() as usize)
            .u(self.mask_stride.unwrap_or(0))
            .u(self.segment.map_or(0, |g| g.r0))
            .u(self.segment.map_or(self.slots, |g| g.r1))
            .u(self.segment.is_none_or(|g| g.with_new) as usize)
            .u(self.segment.map_or(0, |g| g.index))
            .u(self
                .split
                .map_or(self.segment.map_or(1, |g| g.count), |s| s.1))
            .u(self.split.map_or(0, |s| s.0))
            .f(self.softcap)
            .u(self.key_start)
            .f(self.qk_norm_eps[0])
            .f(self.qk_norm_eps[1])
    }
}

#[cfg(test)]
mod tests {
    use super::super::exec::run_kernel_multi;
    use super::super::testutil::{ctx, max_rel, noise, rms_rows};
    use super::*;
    use crate::backend::cpu::attention::{reference_cached, reference_windowed, AttnShape, Scores};
    use half::f16;

    /// The standard additive mask `[T, S + T]`: slots `< p`, then causal among the chunk's rows.
    fn std_mask(t: usize, s: usize, p: usize) -> Vec<f32> {
        let mut mask = vec![f32::NEG_INFINITY; t * (s + t)];
        for tt in 0..t {
            for j in 0..p {
                mask[tt * (s + t) + j] = 0.0;
            }
            for j in 0..=tt {
                mask[tt * (s + t) + s + j] = 0.0;
            }
        }
        mask
    }

    /// [`std_mask`] under a sliding window of `w` keys (row `tt` attends positions `> p + tt − w`).
    fn window_mask(t: usize, s: usize, p: usize, w: usize) -> Vec<f32> {
        let mut mask = std_mask(t, s, p);
        for tt in 0..t {
            for j in 0..p + t {
                let col = if j < p { j } else { s + j - p };
                if j + w <= p + tt {
                    mask[tt * (s + t) + col] = f32::NEG_INFINITY;
                }
            }
        }
        mask
    }

    /// Rows `r0..r1` of a head-major `[KVH, S, D]` cache, token-major (the kernels' layout).
    fn token_major(c: &[f32], kvh: usize, s: usize, d: usize, r0: usize, r1: usize) -> Vec<f32> {
        let mut o = Vec::with_capacity((r1 - r0) * kvh * d);
        for j in r0..r1 {
            for g in 0..kvh {
                o.extend_from_slice(&c[(g * s + j) * d..][..d]);
            }
        }
        o
    }

    /// Cache bytes: f16 (two a word) or f32.
    fn encode(v: &[f32], f16c: bool) -> Vec<u8> {
        if f16c {
            let h: Vec<f16> = v.iter().map(|x| f16::from_f32(*x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        } else {
            bytemuck::cast_slice(v).to_vec()
        }
    }

    /// Random inputs of one attention case (the new rows and caches as an f16 cache holds them) and the
    /// CPU reference output: `(q, new k, new v, cache k, cache v, want)`, head-major.
    #[allow(clippy::type_complexity)]
    fn case(
        h: usize,
        kvh: usize,
        t: usize,
        d: usize,
        s: usize,
        p: usize,
        f16c: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let round = |v: &[f32]| -> Vec<f32> {
            if f16c {
                v.iter().map(|x| f16::from_f32(*x).to_f32()).collect()
            } else {
                v.to_vec()
            }
        };
        let q = noise(h * t * d, 21);
        let nk = round(&noise(kvh * t * d, 22));
        let nv = round(&noise(kvh * t * d, 23));
        let ck = round(&noise(kvh * s * d, 24));
        let cv = round(&noise(kvh * s * d, 25));
        let shape = AttnShape {
            heads: h,
            kv_heads: kvh,
            tokens: t,
            head_dim: d,
            cache_len: s,
            q_tokens_first: false,
            kv_tokens_first: false,
        };
        let mut want = vec![0.0; h * t * d];
        reference_cached(&q, &ck, &cv, &nk, &nv, p, &shape, None, &mut want).unwrap();
        (q, nk, nv, ck, cv, want)
    }

    /// A chunk of `t` tokens at position `p` over `s` slots with the standard mask, rows written.
    fn std_params(h: usize, kvh: usize, t: usize, d: usize, s: usize, p: usize) -> AttnParams {
        AttnParams {
            heads: h,
            kv_heads: kvh,
            tokens: t,
            head_dim: d,
            slots: s,
            npast: p,
            position: p,
            scale: 1.0 / (d as f32).sqrt(),
            softcap: 0.0,
            key_start: 0,
            tokens_first: true,
            write_cache: true,
            mask_stride: Some(s + t),
            segment: None,
            split: None,
            qk_norm_eps: [0.0; 2],
        }
    }

    /// A head-major cache `[KVH, S, D]` with the chunk's `t` rows (head-major `[KVH, T, D]`) at `p..`.
    #[allow(clippy::too_many_arguments)]
    fn with_rows(
        old: &[f32],
        new: &[f32],
        kvh: usize,
        s: usize,
        t: usize,
        d: usize,
        p: usize,
    ) -> Vec<f32> {
        let mut c = old.to_vec();
        for g in 0..kvh {
            for tt in 0..t {
                c[(g * s + p + tt) * d..][..d].copy_from_slice(&new[(g * t + tt) * d..][..d]);
            }
        }
        c
    }

    #[test]
    fn attention_matches_cpu_reference_and_writes_rows() {
        let Some(ctx) = ctx() else { return };
        for (h, kvh, t, d, s, p, f16c) in [
            (9, 3, 1, 64, 64, 17, true),
            (4, 4, 5, 32, 40, 0, false),
            (6, 2, 3, 128, 300, 250, true),
            (2, 1, 8, 16, 16, 8, false),
            (4, 4, 1, 128, 16, 8, false),
            (2, 1, 2, 96, 20, 5, true),
            (6, 2, 3, 64, 300, 250, true),
            (6, 2, 3, 128, 30, 25, true),
            (8, 2, 1, 64, 1100, 1099, true),
            (4, 1, 2, 128, 600, 590, false),
        ] {
            let q = noise(h * t * d, 1);
            let nk = noise(kvh * t * d, 2);
            let nv = noise(kvh * t * d, 3);
            let ck = noise(kvh * s * d, 4);
            let cv = noise(kvh * s * d, 5);
            // What the CPU would hold: f16-rounded rows in an f16 cache.
            let round = |v: &[f32]| -> Vec<f32> {
                if f16c {
                    v.iter().map(|x| f16::from_f32(*x).to_f32()).collect()
                } else {
                    v.to_vec()
                }
            };
            let (nk, nv, ck, cv) = (round(&nk), round(&nv), round(&ck), round(&cv));
            let shape = AttnShape {
                heads: h,
                kv_heads: kvh,
                tokens: t,
                head_dim: d,
                cache_len: s,
                q_tokens_first: false,
                kv_tokens_first: false,
            };
            // Every other case with a soft cap small enough to bite (Gemma 2's scores).
            let softcap = if (h + t) % 2 == 1 { 0.1 } else { 0.0 };
            let scores = Scores {
                scale: None,
                softcap: Some(softcap).filter(|&c| c > 0.0),
            };
            // Every third case under a sliding window of about half the sequence (Gemma's local
            // layers): the kernel starts at row 0's first key, the mask does the rest.
            let window = (d % 3 == 1 || (h + t) % 3 == 0).then(|| ((p + t) / 2).max(1));
            let mut want = vec![0.0; h * t * d];
            let (kv, new) = ((&ck[..], &cv[..]), (&nk[..], &nv[..]));
            reference_windowed(&q, kv, new, (p, window), &shape, scores, &mut want).unwrap();
            // Additive mask [T, S + T]: slots < p, then causal (and inside the window).
            let mask = window.map_or_else(|| std_mask(t, s, p), |w| window_mask(t, s, p, w));
            let enc = |v: &[f32]| encode(v, f16c);
            let ap = AttnParams {
                softcap,
                key_start: window.map_or(0, |w| (p + 1).saturating_sub(w)),
                ..std_params(h, kvh, t, d, s, p)
            };
            // The kernel's cache is token-major [S, KVH, D].
            let tm = |c: &[f32]| token_major(c, kvh, s, d, 0, s);
            for rows in [false, true] {
                assert!(
                    !rows || rows_ok(d, s + t),
                    "{d} {s}: pick cases the rows variant takes"
                );
                let k = kernel(&ctx, f16c, rows, Inputs::Graph).unwrap();
                let outs = run_kernel_multi(
                    &ctx,
                    &k,
                    &ap.params(),
                    &[
                        bytemuck::cast_slice(&q),
                        bytemuck::cast_slice(&nk),
                        bytemuck::cast_slice(&nv),
                        bytemuck::cast_slice(&mask),
                        &enc(&tm(&ck)),
                        &enc(&tm(&cv)),
                    ],
                    &[h * t * d * 4],
                    {
                        let (x, y, _) = groups(&ctx, h * t, rows);
                        (x, y)
                    },
                )
                .unwrap();
                let got: &[f32] = bytemuck::cast_slice(&outs[0]);
                let e = max_rel(got, &want);
                assert!(e < 2e-5, "{h} {kvh} {t} {d} {s} {p} rows {rows}: {e}");
                // The cache buffers (inputs 4, 5) now hold the rows at p..p+t.
                let caches = &outs[1..];
                for (c, (new, old)) in caches.iter().zip([(&nk, &ck), (&nv, &cv)]) {
                    let expect = with_rows(old, new, kvh, s, t, d, p);
                    assert_eq!(
                        c,
                        &enc(&tm(&expect)),
                        "cache rows {h} {kvh} {t} {d} {s} {p} rows {rows}"
                    );
                }
            }
        }
    }

    /// Reading the projections token-major with the rotary and the f16 round trip done in the kernel
    /// ([`Inputs::Rope`]): the CPU rotary, transpose and rounding, then the CPU attention; with
    /// `qk_norm`, each head of q and k normalized first (Qwen3's and Gemma 3's q/k norms).
    #[test]
    fn rope_inputs_match_rotary_then_attention() {
        use crate::backend::cpu::rope::{reference as rope_ref, RopeShape};
        let Some(ctx) = ctx() else { return };
        let cases = [
            (9, 3, 1, 64, 64, 17, true, false),
            (4, 2, 5, 32, 40, 3, false, true),
            (6, 2, 3, 64, 300, 250, true, true),
            (2, 1, 4, 128, 20, 0, true, false),
            (4, 1, 6, 256, 30, 7, false, false),
        ];
        for ((h, kvh, t, d, s, p, f16c, inter), qk_norm) in
            cases.into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let max_pos = s + 4;
            let half = d / 2;
            let (cos, sin): (Vec<f32>, Vec<f32>) = (0..max_pos * half)
                .map(|i| {
                    let (pos, j) = ((i / half) as f32, (i % half) as f32);
                    let a = pos / 10000f32.powf(j / half as f32);
                    (a.cos(), a.sin())
                })
                .unzip();
            let pos: Vec<i64> = (p..p + t).map(|x| x as i64).collect();
            // Token-major projections [T, heads, D]; the q/k norms' scales and epsilons.
            let q: Vec<f32> = noise(t * h * d, 11).iter().map(|x| 3.0 * x).collect();
            let k: Vec<f32> = noise(t * kvh * d, 12).iter().map(|x| 3.0 * x).collect();
            let v = noise(t * kvh * d, 13);
            let (qn, kn) = (noise(d, 16), noise(d, 17));
            let (qn, kn): (Vec<f32>, Vec<f32>) = (
                qn.iter().map(|x| 1.0 + 0.5 * x).collect(),
                kn.iter().map(|x| 1.0 + 0.5 * x).collect(),
            );
            let eps = [1e-6f32, 1e-5];
            let (qin, kin) = match qk_norm {
                true => (rms_rows(&q, &qn, eps[0]), rms_rows(&k, &kn, eps[1])),
                false => (q.clone(), k.clone()),
            };
            let ck = noise(kvh * s * d, 14);
            let cv = noise(kvh * s * d, 15);
            let round = |x: &[f32]| -> Vec<f32> {
                if f16c {
                    x.iter().map(|v| f16::from_f32(*v).to_f32()).collect()
                } else {
                    x.to_vec()
                }
            };
            let (ck, cv) = (round(&ck), round(&cv));
            let rope = |x: &[f32], heads: usize| {
                let mut out = vec![0.0; x.len()];
                let shape = RopeShape {
                    heads,
                    tokens: t,
                    head_dim: d,
                    rotary_dim: d,
                    tokens_first: true,
                    interleaved: inter,
                };
                rope_ref(x, &shape, &cos, &sin, &pos, &mut out).unwrap();
                out
            };
            // The graph's order: rotary, to head-major, f16 round trip of the new rows.
            let heads_first = |x: &[f32], heads: usize| {
                let mut o = vec![0.0; x.len()];
                for tt in 0..t {
                    for g in 0..heads {
                        o[(g * t + tt) * d..][..d].copy_from_slice(&x[(tt * heads + g) * d..][..d]);
                    }
                }
                o
            };
            let qr = heads_first(&rope(&qin, h), h);
            let kr = round(&heads_first(&rope(&kin, kvh), kvh));
            let vr = round(&heads_first(&v, kvh));
            let shape = AttnShape {
                heads: h,
                kv_heads: kvh,
                tokens: t,
                head_dim: d,
                cache_len: s,
                q_tokens_first: false,
                kv_tokens_first: false,
            };
            let mut want = vec![0.0; h * t * d];
            reference_cached(&qr, &ck, &cv, &kr, &vr, p, &shape, None, &mut want).unwrap();
            let mask = std_mask(t, s, p);
            let ap = AttnParams {
                qk_norm_eps: eps,
                ..std_params(h, kvh, t, d, s, p)
            };
            let tm = |c: &[f32]| token_major(c, kvh, s, d, 0, s);
            let mut tail: Vec<&[u8]> = vec![
                bytemuck::cast_slice(&cos),
                bytemuck::cast_slice(&sin),
                bytemuck::cast_slice(&pos),
            ];
            if qk_norm {
                tail.extend([bytemuck::cast_slice(&qn), bytemuck::cast_slice(&kn)]);
            }
            for rows in [false, true] {
                let inputs = Inputs::Rope {
                    interleaved: inter,
                    qk_norm,
                };
                let kern = kernel(&ctx, f16c, rows, inputs).unwrap();
                let outs = super::super::exec::run_kernel_multi_tail(
                    &ctx,
                    &kern,
                    &ap.params(),
                    &[
                        bytemuck::cast_slice(&q),
                        bytemuck::cast_slice(&k),
                        bytemuck::cast_slice(&v),
                        bytemuck::cast_slice(&mask),
                        &encode(&tm(&ck), f16c),
                        &encode(&tm(&cv), f16c),
                    ],
                    &[h * t * d * 4],
                    &tail,
                    groups(&ctx, h * t, rows),
                )
                .unwrap();
                let what = format!(
                    "{h} {kvh} {t} {d} {s} {p} f16 {f16c} interleaved {inter} rows {rows} norm {qk_norm}"
                );
                let e = max_rel(bytemuck::cast_slice(&outs[0]), &want);
                assert!(e < 3e-5, "{what}: {e}");
                // The rows written are the rotated (and rounded) ones.
                for (c, (new, old)) in outs[1..].iter().zip([(&kr, &ck), (&vr, &cv)]) {
                    let expect = with_rows(old, new, kvh, s, t, d, p);
                    // The CPU rotary works in f64: an f16 rounding may land one ulp (2^-11) away.
                    let got: Vec<f32> = if f16c {
                        bytemuck::cast_slice::<u8, f16>(c)
                            .iter()
                            .map(|x| x.to_f32())
                            .collect()
                    } else {
                        bytemuck::cast_slice(c).to_vec()
                    };
                    let tol = if f16c { 1e-3 } else { 1e-6 };
                    assert!(max_rel(&got, &tm(&expect)) < tol, "cache rows {what}");
                }
            }
        }
    }

    /// Split keys (decode over a long context): `attention` with one workgroup per chunk of keys writing
    /// partials, then `attention_combine`, against the CPU reference; the new rows written once.
    #[test]
    fn split_keys_match_cpu_reference() {
        let Some(ctx) = ctx() else { return };
        for (h, kvh, t, d, s, p, f16c) in [
            (9, 3, 1, 64, 600, 530, true),
            (4, 2, 1, 128, 200, 64, false),
            (2, 1, 1, 32, 300, 299, true),
            (4, 4, 2, 64, 300, 150, true),
        ] {
            let (q, nk, nv, ck, cv, want) = case(h, kvh, t, d, s, p, f16c);
            // and under a sliding window of a third of the sequence: chunks from the window's start
            for window in [None, Some(((p + t) / 3).max(1))] {
                let want = match window {
                    None => want.clone(),
                    Some(_) => {
                        let shape = AttnShape {
                            heads: h,
                            kv_heads: kvh,
                            tokens: t,
                            head_dim: d,
                            cache_len: s,
                            q_tokens_first: false,
                            kv_tokens_first: false,
                        };
                        let mut w = vec![0.0; h * t * d];
                        let (kv, new) = ((&ck[..], &cv[..]), (&nk[..], &nv[..]));
                        reference_windowed(&q, kv, new, (p, window), &shape, None, &mut w).unwrap();
                        w
                    }
                };
                let key_start = window.map_or(0, |w| (p + 1).saturating_sub(w));
                let chunks = (p + t - key_start).div_ceil(SPLIT_CHUNK);
                let ap = AttnParams {
                    split: Some((SPLIT_CHUNK, chunks)),
                    key_start,
                    ..std_params(h, kvh, t, d, s, p)
                };
                let tm = |c: &[f32]| token_major(c, kvh, s, d, 0, s);
                let mask = window.map_or_else(|| std_mask(t, s, p), |w| window_mask(t, s, p, w));
                let (x, y, _) = groups(&ctx, h * t, false);
                let outs = super::super::exec::run_kernel_multi_tail(
                    &ctx,
                    &kernel(&ctx, f16c, false, Inputs::Graph).unwrap(),
                    &ap.params(),
                    &[
                        bytemuck::cast_slice(&q),
                        bytemuck::cast_slice(&nk),
                        bytemuck::cast_slice(&nv),
                        bytemuck::cast_slice(&mask),
                        &encode(&tm(&ck), f16c),
                        &encode(&tm(&cv), f16c),
                    ],
                    &[chunks * h * t * (d + 2) * 4],
                    &[],
                    (x, y, chunks as u32),
                )
                .unwrap();
                let (cx, cy, _) = groups(&ctx, h * t, true);
                let got = run_kernel_multi(
                    &ctx,
                    &combine_kernel(&ctx).unwrap(),
                    &ap.params(),
                    &[&outs[0]],
                    &[h * t * d * 4],
                    (cx, cy),
                )
                .unwrap();
                // Both in [T, H, D] (tokens first, as the step graph's transpose wants).
                let e = max_rel(bytemuck::cast_slice(&got[0]), &want);
                assert!(
                    e < 2e-5,
                    "{h} {kvh} {t} {d} {s} {p} {window:?} chunks {chunks}: {e}"
                );
                for (c, (new, old)) in outs[1..].iter().zip([(&nk, &ck), (&nv, &cv)]) {
                    let expect = with_rows(old, new, kvh, s, t, d, p);
                    assert_eq!(
                        c,
                        &encode(&tm(&expect), f16c),
                        "cache rows {h} {t} {d} {s} {p}"
                    );
                }
            }
        }
    }

    /// A cache split into segments (`attention_part` per segment + `attention_combine`) against the CPU
    /// reference, and the chunk's rows written into the segments they fall in.
    #[test]
    fn split_cache_matches_cpu_reference() {
        let Some(ctx) = ctx() else { return };
        for (h, kvh, t, d, s, p, seg_rows, f16c) in [
            (9, 3, 1, 64, 64, 40, 16, true),
            (4, 2, 5, 32, 50, 13, 7, false),
            (2, 1, 3, 16, 30, 0, 8, true),
            (6, 3, 4, 64, 100, 96, 33, true),
        ] {
            let (q, nk, nv, ck, cv, want) = case(h, kvh, t, d, s, p, f16c);
            let mask = std_mask(t, s, p);
            let enc = |v: &[f32]| encode(v, f16c);
            let seg = |c: &[f32], r0: usize, r1: usize| token_major(c, kvh, s, d, r0, r1);
            let nseg = s.div_ceil(seg_rows);
            let base = std_params(h, kvh, t, d, s, p);
            let part_len = nseg * h * t * (d + 2);
            let mut parts = vec![0f32; part_len];
            let (x, y, _) = groups(&ctx, h * t, true);
            for sg in 0..nseg {
                let (r0, r1) = (sg * seg_rows, ((sg + 1) * seg_rows).min(s));
                let ap = AttnParams {
                    segment: Some(Segment {
                        r0,
                        r1,
                        with_new: sg + 1 == nseg,
                        index: sg,
                        count: nseg,
                    }),
                    ..base
                };
                let outs = run_kernel_multi(
                    &ctx,
                    &part_kernel(&ctx, f16c, Inputs::Graph).unwrap(),
                    &ap.params(),
                    &[
                        bytemuck::cast_slice(&q),
                        bytemuck::cast_slice(&nk),
                        bytemuck::cast_slice(&nv),
                        bytemuck::cast_slice(&mask),
                        &enc(&seg(&ck, r0, r1)),
                        &enc(&seg(&cv, r0, r1)),
                    ],
                    &[part_len * 4],
                    (x, y),
                )
                .unwrap();
                let got: &[f32] = bytemuck::cast_slice(&outs[0]);
                let n = h * t * (d + 2);
                parts[sg * n..(sg + 1) * n].copy_from_slice(&got[sg * n..(sg + 1) * n]);
                // The segment's buffers now hold the chunk's rows that fall in r0..r1.
                for (c, (new, old)) in outs[1..].iter().zip([(&nk, &ck), (&nv, &cv)]) {
                    let expect = with_rows(old, new, kvh, s, t, d, p);
                    assert_eq!(c, &enc(&seg(&expect, r0, r1)), "segment {sg} rows");
                }
            }
            let ap = AttnParams {
                segment: Some(Segment {
                    r0: 0,
                    r1: s,
                    with_new: true,
                    index: 0,
                    count: nseg,
                }),
                ..base
            };
            let outs = run_kernel_multi(
                &ctx,
                &combine_kernel(&ctx).unwrap(),
                &ap.params(),
                &[bytemuck::cast_slice(&parts)],
                &[h * t * d * 4],
                (x, y),
            )
            .unwrap();
            let got: &[f32] = bytemuck::cast_slice(&outs[0]);
            let e = max_rel(got, &want);
            assert!(
                e < 2e-5,
                "{h} {kvh} {t} {d} {s} {p} in {nseg} segments: {e}"
            );
        }
    }
}
