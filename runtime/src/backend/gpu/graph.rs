//! A plain ONNX graph — outside the step-graph contract: no caches, no token ids — run once on the GPU,
//! every step a kernel takes there (light ones reading only inputs too), the rest on the CPU executor.
//! It is how the kernels are checked op by op against the generic CPU ops on ONNX's own node cases
//! (`runtime/tests/onnx_node.rs`); models run through [`Model`](crate::Model).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::exec::GpuPlan;
use super::GpuContext;
use crate::backend::cpu::exec::{exec_step, CpuRun};
use crate::backend::cpu::linear::Precision;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::kv::{GpuCacheBudget, PagedCache};
use crate::plan::{Plan, Step, ValId};
use crate::tensor::Tensor;

/// What [`run_graph`] computed, and where.
#[derive(Debug)]
pub struct GraphRun {
    /// The graph's outputs by name.
    pub outputs: BTreeMap<String, Tensor>,
    /// Each step's kind (its label: the op of a generic node, `[linear]`, `[linear group]`, ...)
    /// and whether it ran on the GPU, in plan order.
    pub kinds: Vec<(String, bool)>,
}

impl GraphRun {
    /// Plan steps that ran on the GPU.
    pub fn gpu_steps(&self) -> usize {
        self.kinds.iter().filter(|(_, gpu)| *gpu).count()
    }
}

/// Runs `graph` once on `ctx` with `inputs` (by name): planned as a model is for `ctx` (every fusion its
/// kernels take), every step a kernel takes on the GPU, the others on the CPU (exact precision). A graph with caches, or an
/// input it does not have, is an [`Error::InvalidArgument`].
pub fn run_graph(
    ctx: &Arc<GpuContext>,
    graph: Graph,
    inputs: &[(&str, Tensor)],
) -> Result<GraphRun> {
    let plan = Plan::with_options(
        graph,
        super::plan_options_for(crate::plan::PlanOptions::default(), ctx),
    )?;
    if !plan.caches.is_empty() {
        return Err(Error::InvalidArgument(
            "a graph with caches runs through Model".into(),
        ));
    }
    let mut env: Vec<Option<Tensor>> = vec![None; plan.names.len()];
    for (name, t) in inputs {
        let v = plan
            .inputs
            .get(*name)
            .ok_or_else(|| Error::InvalidArgument(format!("the graph has no input `{name}`")))?;
        env[*v] = Some(t.clone());
    }
    let given: Vec<(ValId, Tensor)> = env
        .iter()
        .enumerate()
        .filter_map(|(v, t)| t.clone().map(|t| (v, t)))
        .collect();
    let mut run = CpuRun::new(Precision::Exact, None);
    let mut cpu_step =
        |s: &Step, env: &mut [Option<Tensor>]| exec_step(&plan, s, env, None, &mut run);
    let exec = GpuPlan::placed(ctx.clone(), &plan, &mut cpu_step, &given, None, true)?;
    let state = exec.new_state(&plan, &[], GpuCacheBudget::All, 1)?;
    let mut host = PagedCache::new(&[], 1)?;
    let want: Vec<ValId> = plan.outputs.values().copied().collect();
    let f = exec.begin(&plan, &state, &host, env, 0, 1, &want, &mut cpu_step, None)?;
    let (env, _) = exec.finish(&plan, &state, &mut host, f, &mut cpu_step)?;
    let mut outputs = BTreeMap::new();
    for (name, &v) in &plan.outputs {
        let t = env[v]
            .clone()
            .or_else(|| plan.consts[v].clone())
            .ok_or_else(|| Error::internal(format!("output `{name}` was not computed")))?;
        outputs.insert(name.clone(), t);
    }
    Ok(GraphRun {
        outputs,
        kinds: plan
            .steps
            .iter()
            .enumerate()
            .map(|(si, s)| (s.label(&plan.graph).to_string(), exec.step_on_gpu(si)))
            .collect(),
    })
}
