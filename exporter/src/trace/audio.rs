//! The ops of an audio encoder: convolution, layer norm, the exact GELU, padding, the log and a
//! global maximum (the log-mel front end and Whisper's encoder, docs/GRAPH.md).

use onestep_format::graph::{Attr, DType};

use super::{is_float, SDim, Sym, Tracer, R};

/// A known size, or `None`.
fn known(d: &SDim) -> Option<usize> {
    match d {
        SDim::N(n) => Some(*n),
        _ => None,
    }
}

impl Tracer {
    /// `Conv(x, w, [b])` over one spatial axis: x f32 `[N, C, L]`, w f32 `[M, C, k]`, b f32 `[M]`,
    /// `stride`, `pad` zeros at both ends; output `[N, M, (L + 2·pad − k)/stride + 1]`.
    pub fn conv1d(
        &mut self,
        name: &str,
        x: &Sym,
        w: &Sym,
        b: Option<&Sym>,
        stride: usize,
        pad: usize,
    ) -> R<Sym> {
        let mut ops = vec![x, w];
        ops.extend(b);
        let fail = |t: &Self, d: &str| t.err(name, "Conv", d, &ops);
        if x.rank() != 3 || w.rank() != 3 || x.dtype != DType::F32 || w.dtype != DType::F32 {
            return Err(fail(self, "x and w must be f32 rank-3"));
        }
        let (Some(l), Some(k)) = (known(&x.shape[2]), known(&w.shape[2])) else {
            return Err(fail(self, "lengths must be known"));
        };
        if x.shape[1] != w.shape[1] || stride == 0 || l + 2 * pad < k {
            return Err(fail(
                self,
                "channels differ, or the kernel is longer than the input",
            ));
        }
        if b.is_some_and(|b| b.dtype != DType::F32 || b.shape[..] != [w.shape[0].clone()]) {
            return Err(fail(self, "bias must be f32 [M]"));
        }
        let out = (l + 2 * pad - k) / stride + 1;
        let p = pad as i64;
        Ok(self.one(
            name,
            "Conv",
            &[Some(x), Some(w), b],
            vec![
                ("kernel_shape", Attr::Ints(vec![k as i64])),
                ("strides", Attr::Ints(vec![stride as i64])),
                ("pads", Attr::Ints(vec![p, p])),
            ],
            DType::F32,
            vec![x.shape[0].clone(), w.shape[0].clone(), SDim::N(out)],
            None,
        ))
    }

    /// `LayerNormalization(x, scale, bias, axis=-1, epsilon)`: scale and bias f32 `[H]`, H the last dim.
    pub fn layer_norm(&mut self, name: &str, x: &Sym, scale: &Sym, bias: &Sym, eps: f32) -> R<Sym> {
        let last = x.shape.last().cloned();
        if x.dtype != DType::F32
            || [scale.dtype, bias.dtype] != [DType::F32; 2]
            || last.is_none()
            || scale.shape[..] != [last.clone().unwrap()]
            || bias.shape != scale.shape
        {
            return Err(self.err(
                name,
                "LayerNormalization",
                "x must be f32, scale and bias f32 [last dim of x]",
                &[x, scale, bias],
            ));
        }
        Ok(self.one(
            name,
            "LayerNormalization",
            &[Some(x), Some(scale), Some(bias)],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
            DType::F32,
            x.shape.clone(),
            None,
        ))
    }

    /// `Gelu(x)` (`approximate="none"`): `x·Φ(x)`, the erf form.
    pub fn gelu(&mut self, name: &str, x: &Sym) -> R<Sym> {
        self.unary_float(name, "Gelu", x, vec![])
    }

    /// `Log(x)`.
    pub fn log(&mut self, name: &str, x: &Sym) -> R<Sym> {
        self.unary_float(name, "Log", x, vec![])
    }

    /// `ReduceMax(x)` over every axis, keepdims: the maximum as a tensor of x's rank with all dims 1.
    pub fn reduce_max_all(&mut self, name: &str, x: &Sym) -> R<Sym> {
        if !is_float(x.dtype) {
            return Err(self.err(name, "ReduceMax", "needs a float", &[x]));
        }
        Ok(self.one(
            name,
            "ReduceMax",
            &[Some(x)],
            vec![("keepdims", Attr::Int(1))],
            x.dtype,
            vec![SDim::N(1); x.rank()],
            None,
        ))
    }

    /// `Pad(x, pads, mode)` with constant pads (`[begin of each axis…, end of each axis…]`, ≥ 0) and
    /// `mode` `reflect` or `constant` (zeros). Reflection needs each pad shorter than its axis.
    pub fn pad(&mut self, name: &str, x: &Sym, pads: &[usize], mode: &str) -> R<Sym> {
        let r = x.rank();
        let dims: Option<Vec<usize>> = x.shape.iter().map(known).collect();
        let ok_mode = matches!(mode, "reflect" | "constant");
        let Some(dims) = dims.filter(|_| pads.len() == 2 * r && ok_mode) else {
            return Err(self.err(
                name,
                "Pad",
                format!(
                    "needs known dims, 2·rank pads and reflect or constant, got {pads:?} {mode}"
                ),
                &[x],
            ));
        };
        if mode == "reflect" && (0..r).any(|a| pads[a] >= dims[a] || pads[a + r] >= dims[a]) {
            return Err(self.err(
                name,
                "Pad",
                "a reflected pad must be shorter than its axis",
                &[x],
            ));
        }
        let pv: Vec<i64> = pads.iter().map(|&p| p as i64).collect();
        let pads_c = self.const_i64(&pv, false);
        let shape = (0..r)
            .map(|a| SDim::N(dims[a] + pads[a] + pads[a + r]))
            .collect();
        Ok(self.one(
            name,
            "Pad",
            &[Some(x), Some(&pads_c)],
            vec![("mode", Attr::Str(mode.into()))],
            x.dtype,
            shape,
            None,
        ))
    }
}
