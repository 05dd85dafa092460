//! ONNX `Conv`: its attributes and shapes checked into a `ConvGeom`; the arithmetic is in
//! `conv_kernel.rs`.

use super::elementwise::cast;
use super::{attr_str, floats, input, Ctx, MAX_OUTPUT_ELEMENTS};
use crate::error::Result;
use crate::graph::DType;
use crate::tensor::Tensor;

/// ONNX `Conv` (opset 11–22): N-D (at least one spatial dim), `strides`, `pads`, `dilations`, `group`,
/// `kernel_shape` (checked against W), `auto_pad`, optional bias; f32, and f16/bf16 through f32. The
/// arithmetic is [`super::conv_kernel::conv`]'s.
pub(super) fn conv(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let x = input(ctx, inputs, 0)?;
    let w = input(ctx, inputs, 1)?;
    let bias = inputs.get(2).copied().flatten();
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(ctx.err(format!(
            "X {:?} and W {:?}: need [N, C, spatial..] and [M, C/group, kernel..] of one rank ≥ 3",
            x.shape, w.shape
        )));
    }
    if w.dtype != x.dtype || bias.is_some_and(|b| b.dtype != x.dtype) {
        return Err(ctx.err("X, W and B differ in dtype"));
    }
    let sp = x.rank() - 2;
    let (batch, c, m) = (x.shape[0], x.shape[1], w.shape[0]);
    let group = usize::try_from(ctx.node.attr_int("group", 1))
        .ok()
        .filter(|&g| g > 0 && c.is_multiple_of(g) && m.is_multiple_of(g) && w.shape[1] * g == c)
        .ok_or_else(|| {
            ctx.err(format!(
                "group {} does not fit X {:?} and W {:?}",
                ctx.node.attr_int("group", 1),
                x.shape,
                w.shape
            ))
        })?;
    let kernel = w.shape[2..].to_vec();
    if let Some(ks) = ctx.node.attr_ints("kernel_shape") {
        if ks.len() != sp || ks.iter().zip(&kernel).any(|(&a, &b)| a != b as i64) {
            return Err(ctx.err(format!("kernel_shape {ks:?} differs from W {:?}", w.shape)));
        }
    }
    let per_dim = |key: &str, default: i64, len: usize, min: i64| -> Result<Vec<usize>> {
        match ctx.node.attr_ints(key) {
            None => Ok(vec![default as usize; len]),
            Some(v) if v.len() == len && v.iter().all(|&x| x >= min) => {
                Ok(v.iter().map(|&x| x as usize).collect())
            }
            Some(v) => Err(ctx.err(format!(
                "`{key}` {v:?}: needs {len} values ≥ {min} for {sp} spatial dims"
            ))),
        }
    };
    let strides = per_dim("strides", 1, sp, 1)?;
    let dilations = per_dim("dilations", 1, sp, 1)?;
    let auto_pad = attr_str(ctx, "auto_pad", "NOTSET")?;
    let pads = match auto_pad {
        "NOTSET" | "" => per_dim("pads", 0, 2 * sp, 0)?,
        "VALID" | "SAME_UPPER" | "SAME_LOWER" => vec![0; 2 * sp],
        other => return Err(ctx.err(format!("auto_pad `{other}` is not a known value"))),
    };
    let mut pads_begin = pads[..sp].to_vec();
    let mut output = Vec::with_capacity(sp);
    for d in 0..sp {
        let input = x.shape[d + 2];
        let too_big = || ctx.err("attribute values overflow");
        // Extent of the dilated kernel.
        let ek = (kernel[d].max(1) - 1)
            .checked_mul(dilations[d])
            .and_then(|e| e.checked_add(1))
            .ok_or_else(too_big)?;
        let out = if auto_pad.starts_with("SAME") {
            let out = input.div_ceil(strides[d]);
            let need = (out.saturating_sub(1))
                .checked_mul(strides[d])
                .and_then(|v| v.checked_add(ek))
                .ok_or_else(too_big)?
                .saturating_sub(input);
            pads_begin[d] = if auto_pad == "SAME_UPPER" {
                need / 2
            } else {
                need - need / 2
            };
            out
        } else {
            let total = input
                .checked_add(pads[d])
                .and_then(|v| v.checked_add(pads[d + sp]))
                .ok_or_else(too_big)?;
            if total < ek {
                return Err(ctx.err(format!(
                    "spatial dim {d}: the kernel ({ek} with dilation) is longer than the padded input ({total})"
                )));
            }
            (total - ek) / strides[d] + 1
        };
        output.push(out);
    }
    let mut shape = vec![batch, m];
    shape.extend_from_slice(&output);
    if shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none_or(|n| n > MAX_OUTPUT_ELEMENTS)
    {
        return Err(ctx.err(format!("output {shape:?} is too large")));
    }
    let geom = super::conv_kernel::ConvGeom {
        batch,
        in_channels: c,
        out_channels: m,
        group,
        input: x.shape[2..].to_vec(),
        kernel,
        output,
        strides,
        dilations,
        pads_begin,
    };
    let (xv, wv) = (floats(ctx, x)?, floats(ctx, w)?);
    let bv = match bias {
        Some(b) if b.numel() != m => {
            return Err(ctx.err(format!(
                "B {:?} is not one value per output channel",
                b.shape
            )))
        }
        Some(b) => Some(floats(ctx, b)?),
        None => None,
    };
    let mut out = Tensor::zeros(DType::F32, &shape);
    super::conv_kernel::conv(&xv, &wv, bv.as_deref(), &geom, out.typed_mut::<f32>())
        .map_err(|e| ctx.err(e.to_string()))?;
    cast(ctx, &out, x.dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops::tests::run;
    use crate::graph::Attr;
    use crate::tensor::numel;

    /// A direct convolution from the ONNX definition, in f64: output size and SAME padding computed
    /// here on their own, every output the sum over its receptive field.
    #[allow(clippy::too_many_arguments)]
    fn conv_reference(
        x: &[f32],
        xs: &[usize],
        w: &[f32],
        ws: &[usize],
        b: Option<&[f32]>,
        strides: &[usize],
        dil: &[usize],
        pads: &[usize],
        auto_pad: &str,
        group: usize,
    ) -> (Vec<usize>, Vec<f32>, Vec<f64>) {
        let sp = xs.len() - 2;
        let (n, c, m) = (xs[0], xs[1], ws[0]);
        let (cg, mg) = (c / group, m / group);
        let mut begin = vec![0i64; sp];
        let mut out = vec![0usize; sp];
        for d in 0..sp {
            let ek = (ws[d + 2] - 1) * dil[d] + 1;
            match auto_pad {
                "NOTSET" => {
                    begin[d] = pads[d] as i64;
                    out[d] = (xs[d + 2] + pads[d] + pads[d + sp] - ek) / strides[d] + 1;
                }
                "VALID" => out[d] = (xs[d + 2] - ek) / strides[d] + 1,
                _ => {
                    out[d] = xs[d + 2].div_ceil(strides[d]);
                    let total = ((out[d] - 1) * strides[d] + ek).saturating_sub(xs[d + 2]);
                    let lower = if auto_pad == "SAME_UPPER" {
                        total / 2
                    } else {
                        total - total / 2
                    };
                    begin[d] = lower as i64;
                }
            }
        }
        let osz: usize = out.iter().product();
        let isz: usize = xs[2..].iter().product();
        let ksz: usize = ws[2..].iter().product();
        let mut y = vec![0.0f32; n * m * osz];
        // Σ|w·x| + |b| per output: the scale of the rounding error a float sum may carry.
        let mut mass = vec![0.0f64; n * m * osz];
        for ni in 0..n {
            for mi in 0..m {
                let g = mi / mg;
                for o in 0..osz {
                    let mut oc = vec![0usize; sp];
                    let mut r = o;
                    for d in (0..sp).rev() {
                        oc[d] = r % out[d];
                        r /= out[d];
                    }
                    let bias = b.map_or(0.0, |b| b[mi] as f64);
                    let (mut acc, mut abs) = (bias, bias.abs());
                    for ci in 0..cg {
                        for kf in 0..ksz {
                            let mut kc = vec![0usize; sp];
                            let mut r = kf;
                            for d in (0..sp).rev() {
                                kc[d] = r % ws[d + 2];
                                r /= ws[d + 2];
                            }
                            let mut at = Some(0usize);
                            for d in 0..sp {
                                let p = (oc[d] * strides[d] + kc[d] * dil[d]) as i64 - begin[d];
                                at = at
                                    .filter(|_| p >= 0 && p < xs[d + 2] as i64)
                                    .map(|a| a * xs[d + 2] + p as usize);
                            }
                            if let Some(p) = at {
                                let xv = x[(ni * c + g * cg + ci) * isz + p] as f64;
                                let wv = w[(mi * cg + ci) * ksz + kf] as f64;
                                acc += xv * wv;
                                abs += (xv * wv).abs();
                            }
                        }
                    }
                    y[(ni * m + mi) * osz + o] = acc as f32;
                    mass[(ni * m + mi) * osz + o] = abs;
                }
            }
        }
        let mut shape = vec![n, m];
        shape.extend_from_slice(&out);
        (shape, y, mass)
    }

    /// Conv against [`conv_reference`] on random inputs: 1-D (Whisper's stem in small), 2-D and 3-D;
    /// strides, asymmetric pads, dilations, groups (depthwise too), every auto_pad, with and without
    /// bias, outputs long enough for several tiles. Tolerance: 1e-5 of each output's Σ|w·x| + |b|
    /// (f32 sums of at most a few hundred products stay far inside it).
    #[test]
    fn conv_matches_direct_convolution() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        struct Case {
            x: Vec<usize>,
            w: Vec<usize>,
            strides: Vec<usize>,
            dil: Vec<usize>,
            pads: Vec<usize>,
            auto_pad: &'static str,
            group: usize,
            bias: bool,
        }
        let case = |x: &[usize], w: &[usize], s: &[usize], d: &[usize], p: &[usize]| Case {
            x: x.to_vec(),
            w: w.to_vec(),
            strides: s.to_vec(),
            dil: d.to_vec(),
            pads: p.to_vec(),
            auto_pad: "NOTSET",
            group: 1,
            bias: true,
        };
        let cases = vec![
            case(&[1, 8, 300], &[12, 8, 3], &[1], &[1], &[1, 1]),
            case(&[1, 12, 300], &[12, 12, 3], &[2], &[1], &[1, 1]),
            case(&[2, 3, 17], &[5, 3, 4], &[3], &[2], &[2, 0]),
            Case {
                group: 2,
                bias: false,
                ..case(&[2, 6, 40], &[4, 3, 5], &[1], &[3], &[0, 4])
            },
            Case {
                group: 6,
                ..case(&[1, 6, 33], &[6, 1, 3], &[1], &[1], &[1, 1])
            },
            case(
                &[1, 3, 9, 11],
                &[7, 3, 3, 2],
                &[2, 1],
                &[1, 2],
                &[1, 0, 2, 1],
            ),
            Case {
                group: 3,
                ..case(
                    &[2, 6, 8, 7],
                    &[9, 2, 2, 3],
                    &[1, 2],
                    &[2, 1],
                    &[0, 1, 1, 0],
                )
            },
            case(
                &[1, 2, 40, 40],
                &[5, 2, 3, 3],
                &[1, 1],
                &[1, 1],
                &[1, 1, 1, 1],
            ),
            case(
                &[1, 2, 4, 5, 6],
                &[3, 2, 2, 3, 2],
                &[1, 2, 1],
                &[1, 1, 2],
                &[1, 0, 1, 0, 1, 1],
            ),
            case(&[1, 4, 1], &[2, 4, 1], &[1], &[1], &[0, 0]),
            Case {
                auto_pad: "SAME_UPPER",
                ..case(&[1, 3, 10, 9], &[4, 3, 4, 3], &[3, 2], &[1, 1], &[])
            },
            Case {
                auto_pad: "SAME_LOWER",
                ..case(&[1, 3, 10, 9], &[4, 3, 4, 3], &[3, 2], &[1, 1], &[])
            },
            Case {
                auto_pad: "VALID",
                ..case(&[1, 3, 10, 9], &[4, 3, 4, 3], &[3, 2], &[1, 1], &[])
            },
        ];
        for c in &cases {
            let xv: Vec<f32> = (0..numel(&c.x))
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let wv: Vec<f32> = (0..numel(&c.w))
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let bv: Vec<f32> = (0..c.w[0]).map(|_| rng.random_range(-1.0..1.0)).collect();
            let ints = |v: &[usize]| Attr::Ints(v.iter().map(|&x| x as i64).collect());
            let mut attrs = vec![
                ("strides", ints(&c.strides)),
                ("dilations", ints(&c.dil)),
                ("group", Attr::Int(c.group as i64)),
                ("kernel_shape", ints(&c.w[2..])),
                ("auto_pad", Attr::Str(c.auto_pad.into())),
            ];
            if !c.pads.is_empty() {
                attrs.push(("pads", ints(&c.pads)));
            }
            let (xt, wt, bt) = (
                Tensor::f32(&c.x, &xv),
                Tensor::f32(&c.w, &wv),
                Tensor::f32(&[c.w[0]], &bv),
            );
            let ins: Vec<&Tensor> = if c.bias {
                vec![&xt, &wt, &bt]
            } else {
                vec![&xt, &wt]
            };
            let got = run("Conv", &attrs, &ins).unwrap().remove(0);
            let (shape, want, mass) = conv_reference(
                &xv,
                &c.x,
                &wv,
                &c.w,
                c.bias.then_some(&bv[..]),
                &c.strides,
                &c.dil,
                &c.pads,
                c.auto_pad,
                c.group,
            );
            assert_eq!(got.shape, shape, "x {:?} w {:?}", c.x, c.w);
            for (i, (&g, &w)) in got.typed::<f32>().iter().zip(&want).enumerate() {
                assert!(
                    ((g - w) as f64).abs() <= 1e-5 * mass[i] + 1e-7,
                    "x {:?} w {:?} at {i}: {g} vs {w}",
                    c.x,
                    c.w
                );
            }
        }
    }

    #[test]
    fn conv_refuses_bad_geometry() {
        let x = Tensor::f32(&[1, 4, 5], &[0.0; 20]);
        let w = Tensor::f32(&[2, 4, 7], &[0.0; 56]);
        let e = run("Conv", &[], &[&x, &w]).unwrap_err().to_string();
        assert!(e.contains("longer than the padded input"), "{e}");
        let w3 = Tensor::f32(&[2, 3, 3], &[0.0; 18]);
        assert!(run("Conv", &[], &[&x, &w3]).is_err(), "C mismatch");
        let w = Tensor::f32(&[2, 4, 3], &[0.0; 24]);
        for (k, v) in [
            ("strides", Attr::Ints(vec![0])),
            ("dilations", Attr::Ints(vec![1, 1])),
            ("pads", Attr::Ints(vec![-1, 0])),
            ("group", Attr::Int(3)),
            ("kernel_shape", Attr::Ints(vec![2])),
            ("auto_pad", Attr::Str("SAME".into())),
            ("pads", Attr::Ints(vec![1 << 40, 1 << 40])),
        ] {
            assert!(
                run("Conv", &[(k, v.clone())], &[&x, &w]).is_err(),
                "{k} {v:?}"
            );
        }
        let b = Tensor::f32(&[3], &[0.0; 3]);
        assert!(run("Conv", &[], &[&x, &w, &b]).is_err(), "bias length");
    }

    /// Whisper's two stem convolutions at full size (release build: `cargo test --release -p onestep
    /// --lib conv_whisper_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn conv_whisper_timing() {
        for (c, stride) in [(80usize, 1i64), (384, 2)] {
            let x = Tensor::f32(
                &[1, c, 3000],
                &(0..c * 3000)
                    .map(|i| (i as f32 * 0.013).sin())
                    .collect::<Vec<_>>(),
            );
            let w = Tensor::f32(
                &[384, c, 3],
                &(0..384 * c * 3)
                    .map(|i| (i as f32 * 0.007).cos() * 0.05)
                    .collect::<Vec<_>>(),
            );
            let b = Tensor::f32(&[384], &[0.1; 384]);
            let attrs = [
                ("pads", Attr::Ints(vec![1, 1])),
                ("strides", Attr::Ints(vec![stride])),
            ];
            let _ = run("Conv", &attrs, &[&x, &w, &b]).unwrap();
            let reps = 5;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(run("Conv", &attrs, &[&x, &w, &b]).unwrap());
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let flops = 2.0 * 384.0 * c as f64 * 3.0 * (3000 / stride as usize) as f64;
            println!(
                "Conv x [1, {c}, 3000] w [384, {c}, 3] stride {stride}: {ms:.2} ms ({:.1} GFLOP/s, {} threads)",
                flops / ms / 1e6,
                crate::backend::cpu::pool::threads()
            );
        }
    }
}
