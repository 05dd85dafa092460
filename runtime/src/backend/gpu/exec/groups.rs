//! Linear groups bound to the GPU: the plan's [`LinearGroup`] steps, their members' weights stacked and
//! uploaded once, run as one dispatch with the norm and the gate the planner folded in.

use super::*;
use crate::plan::{GateAct, LinearGroup};

/// A [`LinearGroup`] bound to the GPU: its stacked weights are the step's [`GpuLinear`].
#[derive(Debug)]
pub(super) struct GpuGroup {
    /// The members' node names, joined by `+` (for errors).
    pub(super) name: String,
    /// `(output, rows)` of every member, in stacking order.
    pub(super) members: Vec<(ValId, usize)>,
    /// The members' input.
    pub(super) x: ValId,
    /// `(input, scale, epsilon)` of the folded norm.
    pub(super) norm: Option<(ValId, ValId, f32)>,
    /// The folded gate: its activation and output.
    pub(super) gate: Option<(GateAct, ValId)>,
    /// [`GpuLinear::fused_kernels`]: one dispatch slot each; a step records the one for its token count.
    pub(super) kernels: Vec<Arc<Kernel>>,
    /// Element offsets of the members' outputs in the shared buffer (parts form; set by the dry run).
    pub(super) bases: Mutex<Vec<usize>>,
}

impl GpuPlan {
    /// Uploads the stacked weights of every linear group the GPU kernels take (into `linears`, under
    /// the group's step) and returns the groups by step. A group they do not take runs on the CPU.
    pub(super) fn bind_groups(
        ctx: &Arc<GpuContext>,
        plan: &Plan,
        linears: &mut HashMap<usize, GpuLinear>,
        weight_bytes: &mut u64,
    ) -> Result<HashMap<usize, GpuGroup>> {
        let mut groups = HashMap::new();
        for (si, s) in plan.steps.iter().enumerate() {
            let Step::LinearGroup(gr) = s else { continue };
            if let Some((g, group)) = Self::bind_group_weights(ctx, plan, gr)? {
                *weight_bytes += g.bytes;
                linears.insert(si, g);
                groups.insert(si, group);
            }
        }
        Ok(groups)
    }

    /// One group's stacked weights and kernels, or `None` when the kernels do not take them.
    fn bind_group_weights(
        ctx: &Arc<GpuContext>,
        plan: &Plan,
        gr: &LinearGroup,
    ) -> Result<Option<(GpuLinear, GpuGroup)>> {
        use linear::FusedOut;
        let mut ws = Vec::new();
        let mut biases = Vec::new();
        let mut members = Vec::new();
        let mut names = Vec::new();
        for m in &gr.members {
            if let Step::Linear {
                node, w, bias, out, ..
            } = m
            {
                ws.push(&**w);
                biases.push(bias.as_ref().map(|b| b.typed::<f32>().to_vec()));
                members.push((*out, w.n));
                names.push(plan.graph.nodes[*node].name.as_str());
            }
        }
        if members.len() != gr.members.len() || !ws.iter().all(|w| GpuLinear::supports(w)) {
            return Ok(None);
        }
        let Some(cat) = crate::weights::LinearWeights::concat(&ws) else {
            return Ok(None);
        };
        let bias: Option<Vec<f32>> = biases.iter().any(|b| b.is_some()).then(|| {
            biases
                .iter()
                .zip(&members)
                .flat_map(|(b, m)| b.clone().unwrap_or_else(|| vec![0.0; m.1]))
                .collect()
        });
        let name = names.join("+");
        let Ok(g) = GpuLinear::new(ctx, &name, &cat, bias.as_deref()) else {
            return Ok(None);
        };
        let out = if let Some(gt) = &gr.gate {
            FusedOut::GatePair(gt.act)
        } else if members.len() > 1 {
            FusedOut::Parts(members.iter().map(|m| (m.1, 0)).collect())
        } else {
            FusedOut::One
        };
        let Some(kernels) = g.fused_kernels(ctx, &out, gr.norm.is_some())? else {
            return Ok(None);
        };
        let group = GpuGroup {
            name,
            members,
            x: gr.x,
            norm: gr.norm.as_ref().map(|n| (n.x, n.scale, n.epsilon)),
            gate: gr.gate.as_ref().map(|gt| (gt.act, gt.out)),
            kernels,
            bases: Mutex::new(Vec::new()),
        };
        Ok(Some((g, group)))
    }
}
