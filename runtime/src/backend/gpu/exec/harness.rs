//! Test harness: a kernel, a linear layer, an embedding or a fused linear group run once on given
//! inputs (the kernel files' tests compare these with their CPU references).

use super::*;

/// Test helper: runs `kernel` once with `inputs` bound at 1.. and `outs` zeroed buffers after them;
/// returns the outputs, then every input bound as writable (in order).
#[cfg(test)]
pub(crate) fn run_kernel_multi(
    ctx: &GpuContext,
    kernel: &Kernel,
    params: &Params,
    inputs: &[&[u8]],
    outs: &[usize],
    groups: (u32, u32),
) -> Result<Vec<Vec<u8>>> {
    run_kernel_multi_tail(
        ctx,
        kernel,
        params,
        inputs,
        outs,
        &[],
        (groups.0, groups.1, 1),
    )
}

/// [`run_kernel_multi`] with more read-only inputs bound after the outputs (`tail`).
#[cfg(test)]
pub(crate) fn run_kernel_multi_tail(
    ctx: &GpuContext,
    kernel: &Kernel,
    params: &Params,
    inputs: &[&[u8]],
    outs: &[usize],
    tail: &[&[u8]],
    groups: (u32, u32, u32),
) -> Result<Vec<Vec<u8>>> {
    let pbuf = ctx.uniform("p", 256);
    ctx.queue.write_buffer(&pbuf, 0, params.bytes());
    let mut bufs: Vec<wgpu::Buffer> = inputs
        .iter()
        .map(|b| ctx.buffer_with("in", b))
        .collect::<Result<_>>()?;
    for &n in outs {
        bufs.push(ctx.storage("out", n as u64)?);
    }
    for b in tail {
        bufs.push(ctx.buffer_with("tail", b)?);
    }
    let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
    let bg = ctx.bind(kernel, (&pbuf, 0), &refs);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }
    // Outputs, then inputs that are bound writable (the attention's caches).
    let writable: Vec<usize> = (0..inputs.len())
        .filter(|&i| kernel.name.starts_with("attention") && (i == 4 || i == 5))
        .collect();
    let mut order: Vec<(usize, usize)> = outs
        .iter()
        .enumerate()
        .map(|(i, &n)| (inputs.len() + i, n))
        .collect();
    order.extend(writable.iter().map(|&i| (i, inputs[i].len())));
    let stagings: Vec<wgpu::Buffer> = order
        .iter()
        .map(|&(_, n)| ctx.staging("s", n as u64))
        .collect();
    for ((bi, n), st) in order.iter().zip(&stagings) {
        enc.copy_buffer_to_buffer(&bufs[*bi], 0, st, 0, (*n as u64).next_multiple_of(4));
    }
    ctx.queue.submit([enc.finish()]);
    ctx.read_back(
        &stagings
            .iter()
            .zip(&order)
            .map(|(s, &(_, n))| (s, n))
            .collect::<Vec<_>>(),
        None,
    )
}

/// Test helper: one output.
#[cfg(test)]
pub(crate) fn run_kernel_once(
    ctx: &GpuContext,
    kernel: &Kernel,
    params: &Params,
    inputs: &[&[u8]],
    out: usize,
    groups: (u32, u32),
) -> Result<Vec<u8>> {
    Ok(run_kernel_multi(ctx, kernel, params, inputs, &[out], groups)?.remove(0))
}

/// Test helper: `x · Wᵀ + bias + res` through every part of `g`.
#[cfg(test)]
pub(crate) fn run_linear_once(
    ctx: &GpuContext,
    g: &GpuLinear,
    x: &[f32],
    res: &[f32],
    t: usize,
) -> Result<Vec<f32>> {
    let xb = ctx.buffer_with("x", bytemuck::cast_slice(x))?;
    let rb = ctx.buffer_with("res", bytemuck::cast_slice(res))?;
    let ob = ctx.storage("o", (t * g.n * 4) as u64)?;
    let pbuf = ctx.uniform("p", (256 * g.parts.len()) as u64);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let mut groups = Vec::new();
    for (i, part) in g.parts.iter().enumerate() {
        ctx.queue
            .write_buffer(&pbuf, (i * 256) as u64, g.params(i, t, true).bytes());
        groups.push(ctx.bind(
            g.kernel_for(t),
            (&pbuf, (i * 256) as u64),
            &[&xb, &part.w, &part.s, &part.z, &g.bias, &rb, &ob],
        ));
    }
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&g.kernel_for(t).pipeline);
        for (i, bg) in groups.iter().enumerate() {
            pass.set_bind_group(0, bg, &[]);
            let (x, y, z) = g.groups(i, t, ctx.max_groups);
            pass.dispatch_workgroups(x, y, z);
        }
    }
    let st = ctx.staging("s", (t * g.n * 4) as u64);
    enc.copy_buffer_to_buffer(&ob, 0, &st, 0, (t * g.n * 4) as u64);
    ctx.queue.submit([enc.finish()]);
    let v = ctx.read_back(&[(&st, t * g.n * 4)], None)?.remove(0);
    Ok(bytemuck::cast_slice(&v).to_vec())
}

/// Test helper: the token embedding of `ids` from the weights `g` (every part's dispatch), `[ids, K]`.
#[cfg(test)]
pub(crate) fn run_embed_once(ctx: &GpuContext, g: &GpuLinear, ids: &[i64]) -> Result<Vec<f32>> {
    let t = ids.len();
    let len = (t * g.k * 4) as u64;
    let kernel = g.embed_kernel(ctx)?;
    let ib = ctx.buffer_with("ids", bytemuck::cast_slice(ids))?;
    // Filled with NaN: an element no dispatch writes shows.
    let ob = ctx.buffer_with("o", &vec![0xff; len as usize])?;
    let dummy = ctx.buffer_with("dummy", &[0; 4])?;
    let pbuf = ctx.uniform("p", (256 * g.parts.len()) as u64);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let mut groups = Vec::new();
    for (i, part) in g.parts.iter().enumerate() {
        ctx.queue
            .write_buffer(&pbuf, (i * 256) as u64, g.embed_params(i, t).bytes());
        groups.push(ctx.bind(
            &kernel,
            (&pbuf, (i * 256) as u64),
            &[&ib, &part.w, &part.s, &part.z, &dummy, &dummy, &ob],
        ));
    }
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&kernel.pipeline);
        for bg in &groups {
            pass.set_bind_group(0, bg, &[]);
            let (x, y, z) = g.embed_groups(t, ctx.max_groups);
            pass.dispatch_workgroups(x, y, z);
        }
    }
    let st = ctx.staging("s", len);
    enc.copy_buffer_to_buffer(&ob, 0, &st, 0, len);
    ctx.queue.submit([enc.finish()]);
    let v = ctx.read_back(&[(&st, len as usize)], None)?.remove(0);
    Ok(bytemuck::cast_slice(&v).to_vec())
}

/// Test helper: the fused forms of `g` ([`linear::FusedOut`]) over `x` (`aux`: the norm's scale),
/// returning `out_len` floats of the output buffer.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_fused_linear_once(
    ctx: &GpuContext,
    g: &GpuLinear,
    out: &linear::FusedOut,
    norm: Option<f32>,
    x: &[f32],
    aux: &[f32],
    t: usize,
    out_len: usize,
) -> Result<Vec<f32>> {
    let kernel = g
        .fused_kernels(ctx, out, norm.is_some())?
        .ok_or_else(|| {
            Error::device(
                DeviceFault::Unsupported,
                "no fused kernel for these weights",
            )
        })?
        .swap_remove(g.fused_pick(t));
    let xb = ctx.buffer_with("x", bytemuck::cast_slice(x))?;
    let ab = ctx.buffer_with("aux", bytemuck::cast_slice(aux))?;
    let ob = ctx.storage("o", (out_len * 4) as u64)?;
    let pbuf = ctx.uniform("p", 256);
    ctx.queue
        .write_buffer(&pbuf, 0, g.fused_params(t, out, norm).bytes());
    let p = &g.parts[0];
    let bg = ctx.bind(
        &kernel,
        (&pbuf, 0),
        &[&xb, &p.w, &p.s, &p.z, &g.bias, &ab, &ob],
    );
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        let (gx, gy, gz) = g.fused_groups(t, out, ctx.max_groups);
        pass.dispatch_workgroups(gx, gy, gz);
    }
    let st = ctx.staging("s", (out_len * 4) as u64);
    enc.copy_buffer_to_buffer(&ob, 0, &st, 0, (out_len * 4) as u64);
    ctx.queue.submit([enc.finish()]);
    let v = ctx.read_back(&[(&st, out_len * 4)], None)?.remove(0);
    Ok(bytemuck::cast_slice(&v).to_vec())
}
