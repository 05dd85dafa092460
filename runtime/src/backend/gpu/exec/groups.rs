//! Fused linear groups bound to the GPU: the members' weights concatenated and uploaded once, the
//! norm and the SiLU gate folded in where the kernel takes them.

use super::*;

/// A [`LinGroup`] bound to the GPU: its concatenated weights are the leader's (its first step's)
/// [`GpuLinear`]; the other members, the norm and the gate are absorbed.
#[derive(Debug)]
pub(super) struct GpuGroup {
    /// The members' node names, joined by `+` (for errors).
    pub(super) name: String,
    /// `(step, output, rows)` of every member, in concatenation order.
    pub(super) members: Vec<(usize, ValId, usize)>,
    /// The members' input.
    pub(super) x: ValId,
    /// `(input, scale, epsilon)` of the folded norm.
    pub(super) norm: Option<(ValId, ValId, f32)>,
    /// Output of the folded SiLU gate.
    pub(super) silu_out: Option<ValId>,
    /// [`GpuLinear::fused_kernels`]: one dispatch slot each; a step records the one for its token count.
    pub(super) kernels: Vec<Arc<Kernel>>,
    /// Element offsets of the members' outputs in the shared buffer (parts form; set by the dry run).
    pub(super) bases: Mutex<Vec<usize>>,
}

impl GpuPlan {
    /// Uploads the concatenated weights of every fused linear group the GPU kernel takes (into
    /// `linears`, under the group's first step) and returns the groups and the steps they absorb.
    pub(super) fn bind_groups(
        ctx: &Arc<GpuContext>,
        plan: &Plan,
        cand: &Fusions,
        linears: &mut HashMap<usize, GpuLinear>,
        weight_bytes: &mut u64,
    ) -> Result<(HashMap<usize, GpuGroup>, HashSet<usize>)> {
        use linear::FusedOut;
        let mut groups = HashMap::new();
        let mut absorbed = HashSet::new();
        // CPU adapters compute every row's x·scale product (the norm's cost times N), where a GPU hides
        // it behind the weight loads: there the norm stays a dispatch of its own. The SiLU pair (two rows
        // an invocation there) also ran slower on lavapipe than parts + the gate's own dispatch.
        let cpu_adapter = rows_variant(ctx);
        for gr in &cand.groups {
            let mut gr = gr.clone();
            if cpu_adapter {
                gr.norm = None;
                gr.silu = None;
            }
            if gr.members.len() < 2 && gr.norm.is_none() {
                continue;
            }
            let mut ws = Vec::new();
            let mut biases = Vec::new();
            let mut members = Vec::new();
            let mut x0 = None;
            for &si in &gr.members {
                if let Step::Linear {
                    w, bias, out, x, ..
                } = &plan.steps[si]
                {
                    ws.push(&**w);
                    biases.push(bias.as_ref().map(|b| b.typed::<f32>().to_vec()));
                    members.push((si, *out, w.n));
                    x0 = Some(*x);
                }
            }
            let Some(x) = x0 else { continue };
            if members.len() != gr.members.len() || !ws.iter().all(|w| GpuLinear::supports(w)) {
                continue;
            }
            let Some(cat) = crate::weights::LinearWeights::concat(&ws) else {
                continue;
            };
            if let Some((_, _, w, _)) = gr.norm {
                if plan.consts[w].as_ref().map(|t| t.numel()) != Some(cat.k) {
                    continue;
                }
            }
            let bias: Option<Vec<f32>> = biases.iter().any(|b| b.is_some()).then(|| {
                biases
                    .iter()
                    .zip(&members)
                    .flat_map(|(b, m)| b.clone().unwrap_or_else(|| vec![0.0; m.2]))
                    .collect()
            });
            let names: Vec<&str> = gr
                .members
                .iter()
                .map(|&si| match &plan.steps[si] {
                    Step::Linear { node, .. } => plan.graph.nodes[*node].name.as_str(),
                    _ => "",
                })
                .collect();
            let name = names.join("+");
            let Ok(g) = GpuLinear::new(ctx, &name, &cat, bias.as_deref()) else {
                // Too large for one binding together: the members run alone.
                continue;
            };
            let out = if gr.silu.is_some() {
                FusedOut::SiluPair
            } else if members.len() > 1 {
                FusedOut::Parts(members.iter().map(|m| (m.2, 0)).collect())
            } else {
                FusedOut::One
            };
            let Some(kernels) = g.fused_kernels(ctx, &out, gr.norm.is_some())? else {
                continue;
            };
            let leader = *gr.members.iter().min().unwrap_or(&members[0].0);
            *weight_bytes += g.bytes;
            linears.insert(leader, g);
            absorbed.extend(gr.members.iter().copied().filter(|&m| m != leader));
            absorbed.extend(gr.norm.map(|n| n.0));
            absorbed.extend(gr.silu);
            let silu_out = gr.silu.and_then(|si| match &plan.steps[si] {
                Step::Gate(sg) => Some(sg.out),
                _ => None,
            });
            groups.insert(
                leader,
                GpuGroup {
                    name,
                    members,
                    x,
                    norm: gr.norm.map(|(_, xin, w, eps)| (xin, w, eps)),
                    silu_out,
                    kernels,
                    bases: Mutex::new(Vec::new()),
                },
            );
        }
        Ok((groups, absorbed))
    }
}
