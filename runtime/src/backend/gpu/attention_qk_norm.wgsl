// The q/k head norms' scales of `attention_rope_in.wgsl` (compiled before it; without this file the
// kernel has no QKNORM and binds two buffers fewer): bindings 11-12 QN, KN, each [D].
const QKNORM: bool = true;

@group(0) @binding(11) var<storage, read> QN: array<f32>;
@group(0) @binding(12) var<storage, read> KN: array<f32>;

fn qn(j: u32) -> f32 { return QN[j]; }
fn kn(j: u32) -> f32 { return KN[j]; }
