//! What each step kind does on the GPU ([`GpuPlan::describe`]): at load (the dry run) with its kernels
//! and candidate fusions, at run time for the step's token count and cache prefix.

use super::*;

impl GpuPlan {
    /// What step `si` does on the GPU with these inputs, or `None` when it must run on the CPU; at load
    /// or at run time as `e`'s [`Stage`] says.
    pub(super) fn describe(&self, si: usize, s: &Step, e: &Env) -> Result<Option<Desc>> {
        match s {
            Step::LinearGroup(_) => match self.lin_groups.get(&si) {
                Some(gr) => self.describe_group(si, gr, e).map(Some),
                None => Ok(None),
            },
            Step::Linear { .. } => self.linear_desc(si, s, e),
            Step::Embedding(_) => self.embedding_desc(si, s, e),
            Step::Gate(_) => self.gate_desc(s, e),
            Step::Rope(r) => {
                let n = &e.plan.graph.nodes[r.node];
                self.rope_desc(n, r.x, (true, r.norm.as_ref()), &r.rest, r.out, e)
            }
            Step::RoundTrip(r) => self.round_trip_desc(r, e),
            Step::NormResidual(nr) => {
                let n = &e.plan.graph.nodes[nr.norm.node];
                let (xw, res) = ((nr.x, nr.norm.scale), Some(nr.residual.other));
                self.norm_desc(n, xw, res, nr.out, e)
            }
            Step::CacheAttention { .. } => self.attention_desc(s, e),
            Step::TokenChoice(_) => self.token_choice_desc(s, e),
            Step::Node { .. } => self.node_desc(s, e),
        }
    }

    /// The f16 round trip of new cache rows: one rounding dispatch for the rows read back. The f16 cache
    /// output gets its buffer and no dispatch: the attention stores the rows in the cache, and the
    /// GPU KV state returns them from there.
    fn round_trip_desc(&self, r: &RoundTrip, e: &Env) -> Result<Option<Desc>> {
        let Some(xm) = e.f32m(r.x) else {
            return Ok(None);
        };
        let nn = xm.numel();
        let half = Meta {
            dtype: DType::F16,
            shape: xm.shape.clone(),
        };
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(r.half, half, None), (r.out, xm, None)],
            reads: vec![r.x],
            disp: vec![self.ew_disp(
                e.stage,
                "unary",
                vec![BufRef::Val(r.x), BufRef::Dummy, BufRef::Val(r.out)],
                Params::new().u(nn).u(UnOp::RoundF16 as usize),
                nn,
            )?],
        }))
    }

    /// One elementwise dispatch of `entry` over `items` (the kernel made when placing).
    pub(super) fn ew_disp(
        &self,
        stage: Stage,
        entry: &'static str,
        binds: Vec<BufRef>,
        params: Params,
        items: usize,
    ) -> Result<Disp> {
        let (x, y) = grid(items, 256, self.ctx.max_groups);
        Ok(Disp {
            kernel: stage.kernel(&|| ew::kernel(&self.ctx, entry))?,
            binds,
            params,
            groups: (x, y, 1),
        })
    }

    /// A linear layer: the GEMV (and, on GPUs, tiled-GEMM) slot of each weight part, with the plan's
    /// residual `Add` in its epilogue.
    fn linear_desc(&self, si: usize, s: &Step, e: &Env) -> Result<Option<Desc>> {
        let Step::Linear {
            x, residual, out, ..
        } = s
        else {
            return Ok(None);
        };
        let ctx = &self.ctx;
        let plan = e.plan;
        let f32m = |v: ValId| e.f32m(v);
        let Some(g) = self.linears.get(&si) else {
            return Ok(None);
        };
        let Some(xm) = f32m(*x) else { return Ok(None) };
        if xm.shape.last() != Some(&g.k) {
            return Ok(None);
        }
        let m = xm.numel() / g.k.max(1);
        let mut shape = xm.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = g.n;
        }
        // The plan's residual in the epilogue, when it is f32 of this output's shape (else the layer
        // runs on the CPU, which adds it as the graph's `Add` would).
        let other = residual.map(|r| r.other);
        if let Some(o) = other {
            if !e.meta_is(
                o,
                &Meta {
                    dtype: DType::F32,
                    shape: shape.clone(),
                },
            ) {
                return e.stage.refuse(Error::device(
                    DeviceFault::Unsupported,
                    format!(
                        "`{}`: residual has another shape than the linear output",
                        plan.names[*out]
                    ),
                ));
            }
        }
        let res = other.map_or(BufRef::Dummy, BufRef::Val);
        // Each part: the GEMV slot and, on GPUs, the tiled-GEMM slot; a step records the one
        // its token count takes (the other has no workgroups).
        let gemm = g.uses_gemm(m);
        let mut disp = Vec::new();
        for i in 0..g.parts.len() {
            let kernels =
                std::iter::once((&g.kernel, !gemm)).chain(g.gemm.as_ref().map(|k| (k, gemm)));
            for (kernel, taken) in kernels {
                disp.push(Disp {
                    kernel: e.stage.made(kernel),
                    binds: vec![
                        BufRef::Val(*x),
                        BufRef::LinW(i),
                        BufRef::LinS(i),
                        BufRef::LinZ(i),
                        BufRef::LinBias,
                        res,
                        BufRef::Val(*out),
                    ],
                    params: g.params(i, m, other.is_some()),
                    groups: if taken {
                        g.groups(i, m, ctx.max_groups)
                    } else {
                        (0, 0, 0)
                    },
                });
            }
        }
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(
                *out,
                Meta {
                    dtype: DType::F32,
                    shape,
                },
                None,
            )],
            reads: std::iter::once(*x).chain(other).collect(),
            disp,
        }))
    }

    /// The token embedding: the rows of the table the ids pick, one dispatch a weight part (host-held ids
    /// checked against the table first).
    fn embedding_desc(&self, si: usize, s: &Step, e: &Env) -> Result<Option<Desc>> {
        let Step::Embedding(emb) = s else {
            return Ok(None);
        };
        let ctx = &self.ctx;
        let plan = e.plan;
        let k = |f: &dyn Fn() -> Result<Arc<Kernel>>| e.stage.kernel(f);
        let Ok(g) = self.linear(si) else {
            return Ok(None);
        };
        let Some(im) = e.meta(emb.ids).filter(|m| m.dtype == DType::I64) else {
            return Ok(None);
        };
        // Ids the host holds are checked here (the GPU writes zeros for one outside).
        if e.meta[emb.ids].is_none() {
            let Some(it) = e.cpu(emb.ids) else {
                return Ok(None);
            };
            let rows = g.n as i64;
            e.stage.check(|| {
                match it.typed::<i64>().iter().find(|&&i| i < -rows || i >= rows) {
                    Some(bad) => {
                        let n = &plan.graph.nodes[emb.node];
                        Err(Error::node(
                            &n.name,
                            &n.op,
                            format!("token id {bad} is out of range for the {rows}-row embedding"),
                        ))
                    }
                    None => Ok(()),
                }
            })?;
        }
        let t = im.numel();
        let mut shape = im.shape.clone();
        shape.push(g.k);
        let disp = (0..g.parts.len())
            .map(|i| -> Result<Disp> {
                Ok(Disp {
                    kernel: k(&|| g.embed_kernel(ctx))?,
                    binds: vec![
                        BufRef::Val(emb.ids),
                        BufRef::LinW(i),
                        BufRef::LinS(i),
                        BufRef::LinZ(i),
                        BufRef::Dummy,
                        BufRef::Dummy,
                        BufRef::Val(emb.out),
                    ],
                    params: g.embed_params(i, t),
                    groups: g.embed_groups(t, ctx.max_groups),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(
                emb.out,
                Meta {
                    dtype: DType::F32,
                    shape,
                },
                None,
            )],
            reads: vec![emb.ids],
            disp,
        }))
    }

    /// The gate `act(g) · u`: one elementwise dispatch.
    fn gate_desc(&self, s: &Step, e: &Env) -> Result<Option<Desc>> {
        let Step::Gate(sg) = s else {
            return Ok(None);
        };
        let f32m = |v: ValId| e.f32m(v);
        let ew_disp =
            |entry, binds, params, items| self.ew_disp(e.stage, entry, binds, params, items);
        let (Some(gm), Some(um)) = (f32m(sg.g), f32m(sg.u)) else {
            return Ok(None);
        };
        if gm.shape != um.shape {
            return Ok(None);
        }
        let n = gm.numel();
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(sg.out, gm, None)],
            reads: vec![sg.g, sg.u],
            disp: vec![ew_disp(
                "gate",
                vec![BufRef::Val(sg.g), BufRef::Val(sg.u), BufRef::Val(sg.out)],
                Params::new().u(n).u(match sg.act {
                    GateAct::Silu => 0,
                    GateAct::GeluTanh => 1,
                }),
                n,
            )?],
        }))
    }

    /// The token choice after the `TopK`: one workgroup draws the token from the sorted candidates (nucleus
    /// mass and the draw read now, so never kept).
    fn token_choice_desc(&self, s: &Step, e: &Env) -> Result<Option<Desc>> {
        let Step::TokenChoice(c) = s else {
            return Ok(None);
        };
        let ctx = &self.ctx;
        let plan = e.plan;
        let k = |f: &dyn Fn() -> Result<Arc<Kernel>>| e.stage.kernel(f);
        let (Some(vm), Some(im)) = (e.meta[c.vals].clone(), e.meta[c.idx].clone()) else {
            return Ok(None);
        };
        let kk = vm.numel();
        if vm.dtype != DType::F32
            || im.dtype != DType::I64
            || vm.shape != [1, kk]
            || im.shape != vm.shape
            || kk == 0
        {
            return Ok(None);
        }
        // The nucleus mass and the draw are parameters (read now: never a kept description).
        let one = |v: ValId| -> Option<f32> {
            let t = e.cpu(v)?;
            (t.dtype == DType::F32 && t.numel() == 1).then(|| t.typed::<f32>()[0])
        };
        let (Some(top_p), Some(u)) = (one(c.top_p), one(c.u)) else {
            return Ok(None);
        };
        let k_in = e.cpu(c.k).map(|t| t.to_i64_vec(&plan.names[c.k]));
        if !matches!(k_in, Some(Ok(ref v)) if v[..] == [kk as i64]) {
            return Ok(None);
        }
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(
                c.out,
                Meta {
                    dtype: DType::I64,
                    shape: c.out_shape.clone(),
                },
                None,
            )],
            reads: vec![c.vals, c.idx],
            disp: vec![Disp {
                kernel: k(&|| choice::kernel(ctx))?,
                binds: vec![BufRef::Val(c.vals), BufRef::Val(c.idx), BufRef::Val(c.out)],
                params: choice::params(kk, top_p, u),
                groups: (1, 1, 1),
            }],
        }))
    }

    /// A linear group's one dispatch (the plan's [`LinearGroup`](crate::plan::LinearGroup)).
    pub(super) fn describe_group(&self, si: usize, gr: &GpuGroup, e: &Env) -> Result<Desc> {
        use linear::FusedOut;
        let g = self.linear(si)?;
        let xin = gr.norm.map_or(gr.x, |n| n.0);
        let name = &gr.name;
        let xm = e
            .meta(xin)
            .filter(|m| m.dtype == DType::F32 && m.shape.last() == Some(&g.k))
            .ok_or_else(|| {
                Error::device(
                    DeviceFault::Unsupported,
                    format!(
                        "fused linear `{name}`: its input `{}` is not f32 [.., {}]",
                        e.plan.names[xin], g.k
                    ),
                )
            })?;
        let m = xm.numel() / g.k.max(1);
        let meta = |n: usize| {
            let mut shape = xm.shape.clone();
            if let Some(l) = shape.last_mut() {
                *l = n;
            }
            Meta {
                dtype: DType::F32,
                shape,
            }
        };
        let mut at = Vec::new();
        let (out, outs) = if let Some((act, so)) = gr.gate {
            (FusedOut::GatePair(act), vec![(so, meta(g.n / 2), None)])
        } else if gr.members.len() == 1 {
            (FusedOut::One, vec![(gr.members[0].0, meta(g.n), None)])
        } else {
            let mut bases = gr
                .bases
                .lock()
                .map_err(|_| Error::internal("group lock poisoned"))?;
            if e.stage.placing() {
                // Each member's [T, rows] at an offset a binding may start at (decided at load).
                let align = (self.ctx.device.limits().min_storage_buffer_offset_alignment as usize
                    / 4)
                .max(1);
                bases.clear();
                let mut b = 0;
                for mb in &gr.members {
                    bases.push(b);
                    b = (b + m * mb.1).next_multiple_of(align);
                }
            }
            let o0 = gr.members[0].0;
            let mut outs = Vec::new();
            for (mb, &b) in gr.members.iter().zip(bases.iter()) {
                outs.push((mb.0, meta(mb.1), (mb.0 != o0).then_some(o0)));
                at.push((mb.0, 4 * b as u64));
            }
            (
                FusedOut::Parts(
                    gr.members
                        .iter()
                        .zip(bases.iter())
                        .map(|(mb, &b)| (mb.1, b))
                        .collect(),
                ),
                outs,
            )
        };
        let target = outs[0].0;
        let mut reads = vec![xin];
        let aux = match gr.norm {
            Some((_, w, _)) => {
                reads.push(w);
                BufRef::Val(w)
            }
            None => BufRef::Dummy,
        };
        let pick = g.fused_pick(m);
        let disp = gr
            .kernels
            .iter()
            .enumerate()
            .map(|(j, kernel)| Disp {
                kernel: e.stage.made(kernel),
                binds: vec![
                    BufRef::Val(xin),
                    BufRef::LinW(0),
                    BufRef::LinS(0),
                    BufRef::LinZ(0),
                    BufRef::LinBias,
                    aux,
                    BufRef::Val(target),
                ],
                params: g.fused_params(m, &out, gr.norm.map(|n| n.2)),
                // The slot not taken this step records nothing.
                groups: if j == pick {
                    g.fused_groups(m, &out, self.ctx.max_groups)
                } else {
                    (0, 0, 0)
                },
            })
            .collect();
        Ok(Desc {
            at,
            outs,
            reads,
            disp,
        })
    }

    /// Whether the attention's new-row inputs are exactly the cache outputs (directly, or read back from
    /// an f16 output by a `Cast` to f32 or the plan's [`RoundTrip`]) — then writing them back into the cache reproduces the graph's outputs.
    pub(super) fn writes_rows(&self, plan: &Plan, past: &[usize; 2], new: &[ValId; 2]) -> bool {
        (0..2).all(|j| {
            let c = &plan.caches[past[j]];
            if new[j] == c.output_val {
                return c.dtype == DType::F32;
            }
            plan.steps.iter().any(|s| match s {
                Step::RoundTrip(r) => {
                    r.out == new[j] && r.half == c.output_val && c.dtype == DType::F16
                }
                Step::Node {
                    node,
                    inputs,
                    outputs,
                } => {
                    let n = &plan.graph.nodes[*node];
                    n.op == "Cast"
                        && outputs.first() == Some(&new[j])
                        && inputs.first().copied().flatten() == Some(c.output_val)
                        && n.attr_int("to", 0) == DType::F32.onnx_code() as i64
                        && c.dtype == DType::F16
                }
                _ => false,
            })
        })
    }
}
