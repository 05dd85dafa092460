//! `onestep` demo CLI: chat, run, bench, transcribe.
//!
//! ```text
//! onestep chat model.onnx [--system "..."]          interactive; /reset, /quit
//! onestep run model.onnx -p "..." [--json] [--no-chat]
//! onestep bench model.onnx [--prompt-tokens 128] [--new-tokens 128] [--repeat 5]
//! onestep transcribe whisper.onnx audio.wav [--json] [--language de] [--translate]
//! ```
//! Common flags: --max-tokens, --temperature, --top-k, --top-p, --seed, --threads.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

mod transcribe;
use onestep::generate::{ChatMessage, Completion, GenerateOptions, Piece, Session};
use onestep::{Error, LoadOptions, Model, Result};

#[derive(Parser, Debug)]
#[command(
    name = "onestep",
    version,
    about = "Run one-file ONNX step graphs of language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Interactive chat on stdin (`/reset` forgets the conversation, `/quit` leaves).
    Chat {
        /// The model file.
        model: PathBuf,
        /// System message that starts the conversation.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Generate once from a prompt.
    Run {
        /// The model file.
        model: PathBuf,
        /// The prompt (a user message when the chat template applies).
        #[arg(short, long)]
        prompt: String,
        /// Apply the chat template (the default when the model has one).
        #[arg(long, conflicts_with = "no_chat")]
        chat: bool,
        /// Use the prompt as raw text.
        #[arg(long)]
        no_chat: bool,
        /// System message (with the chat template).
        #[arg(long)]
        system: Option<String>,
        /// Stop when the text contains this string (repeatable).
        #[arg(long = "stop")]
        stop: Vec<String>,
        /// Print one JSON object (text, token ids, stop reason, stats) instead of streaming.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Teacher-forced logits and greedy continuations as JSON, for checking against other runtimes.
    ///
    /// Reads a JSON list of jobs `{"ids": [...], "start": N, "generate": M}`: `ids[..start]` is
    /// prefilled in `max_chunk` chunks, the rest fed one token per step, recording each position's
    /// top logits (row r predicts `ids[start + r]`); then `M` greedy tokens follow the whole sequence.
    /// For a transcription model a job also names `"audio": "x.wav"` and `"window": W`: that 30 s
    /// window is encoded first.
    Score {
        /// The model file.
        model: PathBuf,
        /// JSON file with the jobs (`-` for standard input).
        #[arg(long)]
        jobs: PathBuf,
        /// Top logits recorded per position.
        #[arg(long, default_value_t = 8)]
        top: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Speech to text with a transcription model (Whisper): a WAV file (any rate, mono or stereo).
    Transcribe {
        /// The model file.
        model: PathBuf,
        /// The WAV file.
        audio: PathBuf,
        /// Language code of the speech (multilingual models; default `en`).
        #[arg(long)]
        language: Option<String>,
        /// Translate into English (multilingual models).
        #[arg(long)]
        translate: bool,
        /// One segment a 30 s window, untimed (`<|notimestamps|>`), the text streamed as decoded.
        #[arg(long)]
        no_timestamps: bool,
        /// Print one JSON object (text, segments, stats) instead of streaming.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Measure prefill and decode speed.
    Bench {
        /// The model file.
        model: PathBuf,
        /// Prompt length in tokens (built from repeated text).
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens to generate per run (stop tokens are ignored).
        #[arg(long, default_value_t = 128)]
        new_tokens: u32,
        /// Measured runs; the table shows medians.
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Unmeasured runs before the measured ones.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Print one JSON object (medians) instead of the table (for scripts/bench-peers).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
}

/// Flags every command takes.
#[derive(Args, Debug, Clone, Default)]
struct Common {
    /// Most new tokens per reply (default: the model file's setting).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy (default: the model file's setting).
    #[arg(long)]
    temperature: Option<f32>,
    /// Top-k; 0 disables.
    #[arg(long)]
    top_k: Option<u32>,
    /// Top-p in (0, 1]; 1 disables.
    #[arg(long)]
    top_p: Option<f32>,
    /// Random seed (reproducible runs).
    #[arg(long)]
    seed: Option<u64>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Device: auto (the faster of the GPU and the CPU, timed over a few decode steps on a model's first
    /// load and remembered in the user's cache folder), cpu, gpu, gpu:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// GPU API: vulkan, metal, dx12, gl (default: WGPU_BACKEND, else any).
    #[arg(long)]
    gpu_backend: Option<String>,
    /// GPU memory for the KV cache: `all`, bytes (`48M`, `1GiB`) or a percentage of the full cache
    /// (`50%`); layers beyond it stream through two GPU slots from host memory.
    #[arg(long, default_value = "all")]
    gpu_cache_budget: String,
    /// Positions per host KV-cache page.
    #[arg(long, default_value_t = onestep::kv::DEFAULT_PAGE_ROWS)]
    kv_page_rows: usize,
    /// Largest GPU buffer for one layer's K or V (bytes, `4M`); a longer cache is split into segments
    /// (default: the adapter's binding limit).
    #[arg(long)]
    gpu_cache_segment: Option<String>,
    /// How the CPU multiplies 4- and 8-bit weights: `fast` (8-bit activations, two digits in decode
    /// and the output layer, integer dot products) or `exact` (f32 activations: onnxruntime's results
    /// to ~1e-4 and the GPU kernels' math, so the same tokens on both).
    #[arg(long, default_value_t = onestep::LoadOptions::default().precision)]
    precision: onestep::Precision,
    /// Time every op (CPU) or every GPU dispatch, printed by `bench` (slows the GPU: measurements only).
    #[arg(long)]
    profile: bool,
    /// Runtime settings as `key=value[,key=value...]` (repeatable), applied after the flags above:
    /// precision, profile, cpu_isa (the integer kernels' instruction set: avx512-vnni, avx-vnni, avx2,
    /// neon-i8mm, neon-dotprod, neon, scalar — one this CPU runs) and the GPU tuning keys
    /// (gpu_variant=auto|rows|lanes|subgroups,
    /// gpu_no_fuse=all|group+attn+res+tr+round, gpu_split_keys, gpu_split_chunk, gpu_submit_every,
    /// gpu_run_ahead, gpu_gemm_tokens, gpu_block_lanes, gpu_pipeline_cache=DIR|none,
    /// gpu_trial_software, gpu_encoder_software).
    #[arg(long = "set", value_name = "KEY=VALUE,...")]
    settings: Vec<String>,
}

impl Common {
    fn apply(&self, mut o: GenerateOptions) -> GenerateOptions {
        if let Some(v) = self.max_tokens {
            o.max_new_tokens = v;
        }
        if let Some(v) = self.temperature {
            o.temperature = v;
        }
        if let Some(v) = self.top_k {
            o.top_k = v;
        }
        if let Some(v) = self.top_p {
            o.top_p = v;
        }
        if self.seed.is_some() {
            o.seed = self.seed;
        }
        o
    }

    fn load_options(&self) -> Result<LoadOptions> {
        if self.kv_page_rows == 0 {
            return Err(Error::InvalidArgument(
                "--kv-page-rows must be at least 1".into(),
            ));
        }
        // The library reads no environment: the CLI passes on what a wgpu user expects from it.
        let backend = self
            .gpu_backend
            .clone()
            .or_else(|| std::env::var("WGPU_BACKEND").ok());
        let mut o = LoadOptions::parse(
            &self.device,
            backend.as_deref(),
            &self.gpu_cache_budget,
            self.kv_page_rows,
        )?;
        o.precision = self.precision;
        o.profile = self.profile;
        #[cfg(feature = "gpu")]
        {
            o.gpu.pipeline_cache = user_cache_dir();
        }
        for s in &self.settings {
            o.set(s)?;
        }
        if let Some(b) = &self.gpu_cache_segment {
            match b.parse()? {
                onestep::kv::GpuCacheBudget::Bytes(n) => o.kv.gpu_segment_bytes = Some(n),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "--gpu-cache-segment `{b}`: expected bytes (`4M`)"
                    )))
                }
            }
        }
        Ok(o)
    }

    fn setup_threads(&self) -> Result<()> {
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(Error::InvalidArgument(
                    "--threads must be at least 1".into(),
                ));
            }
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .map_err(|e| Error::InvalidArgument(format!("cannot set {n} threads: {e}")))?;
        }
        Ok(())
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: PathBuf::from(what),
        source,
    }
}

fn open(path: &Path, common: &Common) -> Result<(Arc<Model>, Session)> {
    common.setup_threads()?;
    let model = Model::load_with(path, &common.load_options()?)?;
    if let Some(note) = model.device_note() {
        eprintln!("onestep: {note}");
    }
    let session = Session::new(model.clone())?;
    Ok((model, session))
}

/// Writes each piece to stdout as it comes.
fn printer() -> impl FnMut(&Piece) -> ControlFlow<()> {
    move |p: &Piece| {
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) stops the generation instead of failing it.
        if out
            .write_all(p.text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

fn summary(c: &Completion) -> String {
    format!(
        "[{} tokens, {}; prefill {} tok in {:.0} ms ({:.1} tok/s), first token {:.0} ms, decode {:.1} tok/s]",
        c.token_ids.len(),
        c.stop_reason,
        c.stats.prefill_tokens,
        c.stats.prefill_ms,
        c.stats.prefill_tokens_per_s,
        c.stats.time_to_first_token_ms,
        c.stats.decode_tokens_per_s
    )
}

fn cmd_chat(model: &Path, system: Option<String>, common: &Common) -> Result<()> {
    let (_model, mut session) = open(model, common)?;
    if session.chat_template().is_none() {
        return Err(Error::Template(
            "the model carries no chat template; use `onestep run --no-chat`".into(),
        ));
    }
    let opts = common.apply(session.default_options());
    let initial: Vec<ChatMessage> = system.into_iter().map(ChatMessage::system).collect();
    let mut messages = initial.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    eprintln!("onestep chat: type a message; /reset forgets the conversation, /quit leaves.");
    loop {
        eprint!("> ");
        std::io::stderr().flush().ok();
        let Some(line) = lines.next() else {
            break;
        };
        let line = line.map_err(io_err("<stdin>"))?;
        let text = line.trim();
        match text {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                messages = initial.clone();
                session.reset();
                eprintln!("[conversation reset]");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::user(text));
        match session.chat(&messages, &opts, printer()) {
            Ok(c) => {
                println!();
                eprintln!("{}", summary(&c));
                if c.stop_reason == onestep::generate::StopReason::ContextFull {
                    eprintln!("[the context is full; /reset to start over]");
                }
                messages.push(ChatMessage::assistant(c.text));
            }
            Err(e @ Error::InvalidArgument(_)) => {
                messages.pop();
                eprintln!("onestep: {e}; /reset to start over");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_run(
    model: &Path,
    prompt: &str,
    chat: bool,
    no_chat: bool,
    system: Option<String>,
    stop: Vec<String>,
    json: bool,
    common: &Common,
) -> Result<()> {
    let (_model, mut session) = open(model, common)?;
    let has_template = session.chat_template().is_some();
    if chat && !has_template {
        return Err(Error::Template(
            "--chat: the model carries no chat template".into(),
        ));
    }
    let use_chat = !no_chat && has_template;
    let mut opts = common.apply(session.default_options());
    opts.stop_strings = stop;
    let on_piece = |p: &Piece| {
        if json {
            ControlFlow::Continue(())
        } else {
            printer()(p)
        }
    };
    let completion = if use_chat {
        let mut messages: Vec<ChatMessage> = system.into_iter().map(ChatMessage::system).collect();
        messages.push(ChatMessage::user(prompt));
        session.chat(&messages, &opts, on_piece)?
    } else {
        if system.is_some() {
            return Err(Error::InvalidArgument(
                "--system needs the chat template".into(),
            ));
        }
        session.generate(prompt, &opts, on_piece)?
    };
    if json {
        let s = serde_json::to_string(&completion)
            .map_err(|e| Error::InvalidArgument(format!("cannot write JSON: {e}")))?;
        println!("{s}");
    } else {
        println!();
        eprintln!("{}", summary(&completion));
    }
    Ok(())
}

/// Peak resident set size in bytes (`VmHWM`), where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `n` prompt ids made from repeated English text.
fn bench_prompt(session: &Session, n: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "The quick brown fox jumps over the lazy dog while the five boxing wizards \
                        jump quickly, and a journey of a thousand miles begins with a single step. ";
    let mut text = String::from(TEXT);
    loop {
        let ids = session.tokenizer().encode(&text)?;
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
        if text.len() > 64 * n + 1024 {
            return Err(Error::Tokenizer(format!(
                "cannot build a {n}-token prompt from repeated text"
            )));
        }
        text.push_str(TEXT);
    }
}

/// Decode held against the machine's memory read bandwidth.
struct Roofline {
    /// Measured read bandwidth (GB/s) of the kernels' threads.
    gbps: f64,
    /// Bytes one decode step reads at `context`.
    bytes: u64,
    /// The mean context of the measured decode steps.
    context: usize,
    /// `bytes × decode tok/s ÷ bandwidth`.
    fraction: f64,
}

impl Roofline {
    fn measure(model: &Model, context: usize, decode_tok_s: f64) -> Roofline {
        let gbps = onestep::system::read_gbps();
        let bytes = model.decode_read_bytes(context);
        Roofline {
            gbps,
            bytes,
            context,
            fraction: bytes as f64 * decode_tok_s / (gbps * 1e9),
        }
    }
}

/// Rows of (label, values) as an aligned table with median, min and max columns.
fn table(rows: &[(&str, Vec<f64>)]) -> String {
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
    let mut s = format!(
        "{:<w$}  {:>10}  {:>10}  {:>10}\n",
        "metric", "median", "min", "max"
    );
    for (label, vals) in rows {
        let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        s.push_str(&format!(
            "{label:<w$}  {:>10.1}  {min:>10.1}  {max:>10.1}\n",
            median(vals.clone())
        ));
    }
    s
}

/// The KV cache counters as JSON (`onestep bench` and `onestep score` print them).
fn kv_json(k: &onestep::kv::KvStats, common: &Common) -> serde_json::Value {
    serde_json::json!({
        "layers_resident": k.layers_resident, "layers_streamed": k.layers_streamed, "slots": k.slots,
        "gpu_bytes": k.gpu_bytes, "host_bytes": k.host_bytes, "page_rows": common.kv_page_rows,
        "budget": common.gpu_cache_budget,
        "last_step_bytes_up": k.step_bytes_up, "last_step_bytes_down": k.step_bytes_down,
        "last_step_stalls": k.step_stalls, "last_step_pack_ms": k.step_pack_ms,
        "session_steps": k.steps, "session_bytes_up": k.bytes_up, "session_bytes_down": k.bytes_down,
        "session_stalls": k.stalls,
    })
}

fn cmd_bench(
    model: &Path,
    prompt_tokens: usize,
    new_tokens: u32,
    repeat: usize,
    warmup: usize,
    json: bool,
    common: &Common,
) -> Result<()> {
    if repeat == 0 {
        return Err(Error::InvalidArgument("--repeat must be at least 1".into()));
    }
    let (model_arc, mut session) = open(model, common)?;
    // The integer kernels' instruction set: the one `--set cpu_isa=` forces, else this CPU's best.
    let fast_isa = common.load_options()?.cpu_isa;
    let fast_isa = fast_isa.as_deref().unwrap_or(onestep::system::fast_isa());
    let ids = bench_prompt(&session, prompt_tokens)?;
    let mut opts = common.apply(session.default_options());
    opts.max_new_tokens = common.max_tokens.unwrap_or(new_tokens);
    opts.ignore_stop_tokens = true;
    if common.temperature.is_none() {
        opts.temperature = 0.0;
    }
    let mut runs = Vec::with_capacity(repeat);
    for i in 0..warmup + repeat {
        let c = session.generate_ids(&ids, &opts, |_| ControlFlow::Continue(()))?;
        if i >= warmup {
            runs.push(c);
        }
    }
    let col = |f: &dyn Fn(&Completion) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let rss_mb = peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0));
    let mut rows = vec![
        ("prefill (tok/s)", col(&|c| c.stats.prefill_tokens_per_s)),
        ("decode (tok/s)", col(&|c| c.stats.decode_tokens_per_s)),
        (
            "time to first token (ms)",
            col(&|c| c.stats.time_to_first_token_ms),
        ),
        ("load (ms)", vec![model_arc.load_ms()]),
    ];
    if let Some(mb) = rss_mb {
        rows.push(("peak RSS (MiB)", vec![mb]));
    }
    let threads = rayon::current_num_threads();
    let gpu_json = gpu_json(&model_arc);
    let plan_json = plan_json(model_arc.plan_stats());
    let mut kv_json = kv_json(&session.kv_stats(), common);
    kv_json["last_step_context"] = session.cached_tokens().saturating_sub(1).into();
    let roof = (model_arc.device() == "cpu").then(|| {
        Roofline::measure(
            &model_arc,
            ids.len() + opts.max_new_tokens as usize / 2,
            median(col(&|c| c.stats.decode_tokens_per_s)),
        )
    });
    if json {
        let obj = serde_json::json!({
            "device": model_arc.device(),
            "precision": model_arc.precision().to_string(),
            "fast_isa": fast_isa,
            "plan": plan_json,
            "gpu": gpu_json,
            "kv": kv_json,
            "prefill": median(col(&|c| c.stats.prefill_tokens_per_s)),
            "decode": median(col(&|c| c.stats.decode_tokens_per_s)),
            "ttft_ms": median(col(&|c| c.stats.time_to_first_token_ms)),
            "load_ms": model_arc.load_ms(),
            "peak_rss_mb": rss_mb,
            "threads": threads,
            "read_gbps": roof.as_ref().map(|r| r.gbps),
            "decode_read_mb": roof.as_ref().map(|r| r.bytes as f64 / 1e6),
            "roofline": roof.as_ref().map(|r| r.fraction),
            "prompt_tokens": ids.len(),
            "new_tokens": opts.max_new_tokens,
        });
        println!("{obj}");
        return Ok(());
    }
    println!(
        "onestep bench: {}  prompt {} tokens, {} new tokens, {} runs (+{} warm-up), {} threads",
        model.display(),
        ids.len(),
        opts.max_new_tokens,
        repeat,
        warmup,
        threads
    );
    println!(
        "device: {}  precision: {} (fast on {})",
        model_arc.device(),
        model_arc.precision(),
        fast_isa
    );
    println!("plan: {plan_json}");
    if !gpu_json.is_null() {
        println!("gpu: {gpu_json}");
    }
    println!("kv cache: {kv_json}");
    print!("{}", table(&rows));
    if rss_mb.is_none() {
        println!("peak RSS: not available on this OS");
    }
    if let Some(r) = &roof {
        println!(
            "roofline: read bandwidth {:.1} GB/s ({threads} threads); a decode step reads ~{:.1} MB \
             (weights + cache at context {}); decode = {:.1} GB/s = {:.0}% of it",
            r.gbps,
            r.bytes as f64 / 1e6,
            r.context,
            r.gbps * r.fraction,
            100.0 * r.fraction
        );
    }
    print_profile(&model_arc);
    Ok(())
}

/// The GPU adapter and the last step's counters as JSON (`null` on the CPU).
fn gpu_json(model_arc: &Model) -> serde_json::Value {
    #[cfg(feature = "gpu")]
    let (gpu, gstats) = (model_arc.gpu_info(), model_arc.gpu_stats());
    #[cfg(not(feature = "gpu"))]
    let (gpu, gstats): (Option<()>, Option<()>) = {
        let _ = model_arc;
        (None, None)
    };
    match (&gpu, &gstats) {
        #[cfg(feature = "gpu")]
        (Some(g), Some(st)) => serde_json::json!({
            "adapter": g.name, "backend": g.backend, "type": g.device_type, "driver": g.driver,
            "init_ms": g.init_ms, "compile_ms": g.compile_ms, "pipeline_cache_hit": g.pipeline_cache_hit,
            "shader_f16": g.shader_f16, "subgroups": g.subgroups, "timestamps": g.timestamps,
            "dispatches_per_step": st.dispatches, "submits_per_step": st.submits, "waits_per_step": st.waits,
            "descriptions_per_step": st.described,
            "last_step_ahead": st.ahead, "steps_ahead": st.ahead_steps, "steps_ahead_missed": st.ahead_missed,
            "fused_linear_groups": st.linear_groups, "fused_norms": st.fused_norms,
            "subgroup_linears": st.subgroup_linears,
            "gpu_steps": st.gpu_steps, "cpu_steps": st.cpu_steps,
            "weight_bytes": st.weight_bytes, "scratch_bytes": st.scratch_bytes,
            "bytes_up_per_step": st.bytes_up, "bytes_down_per_step": st.bytes_down,
            "last_step_ms": st.step_ms, "last_step_gpu_wait_ms": st.wait_ms, "last_step_submit_ms": st.submit_ms,
        }),
        _ => serde_json::Value::Null,
    }
}

/// What the planner made of the graph, as JSON.
fn plan_json(ps: &onestep::PlanStats) -> serde_json::Value {
    serde_json::json!({
        "generic_steps": ps.generic, "linear": ps.linear, "cache_attention": ps.cache_attention,
        "silu_gate": ps.silu_gate, "gelu_gate": ps.gelu_gate, "embedding": ps.embedding, "embedding_tied": ps.embedding_tied,
        "token_choice": ps.token_choice,
        "linear_bias": ps.linear_bias, "residual": ps.residual, "folded": ps.folded, "removed": ps.removed,
        "transpose_rope": ps.transpose_rope, "round_trip": ps.round_trip,
        "linear_groups": ps.linear_groups, "group_norms": ps.group_norms, "group_gates": ps.group_gates,
        "attention_inputs": ps.attention_inputs, "norm_residual": ps.norm_residual,
    })
}

/// The per-op profile of `--profile` runs (nothing when the model was not profiled), on stdout.
fn print_profile(model_arc: &Model) {
    let _ = write_profile(model_arc, &mut std::io::stdout().lock());
}

/// The per-op profile of `--profile` runs (nothing when the model was not profiled), to `out`.
fn write_profile(model_arc: &Model, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let profile = model_arc.profile();
    if profile.is_empty() {
        return Ok(());
    }
    // "(span ...)" rows overlap the kernels' own rows: not part of the total.
    let total: f64 = profile
        .iter()
        .filter(|p| !p.0.starts_with('('))
        .map(|p| p.2)
        .sum();
    #[cfg(feature = "gpu")]
    let how = match model_arc.gpu_info() {
        Some(g) if g.timestamps => "GPU timestamps around each dispatch in the step",
        Some(_) => "each dispatch submitted and waited for alone",
        None => "CPU time per op",
    };
    #[cfg(not(feature = "gpu"))]
    let how = "CPU time per op";
    writeln!(out, "\nprofile (--profile: {how}), all runs incl. warm-up:")?;
    writeln!(
        out,
        "{:<24} {:>9} {:>10} {:>7}",
        "op", "calls", "ms", "share"
    )?;
    for (op, calls, secs) in profile {
        writeln!(
            out,
            "{op:<24} {calls:>9} {:>10.1} {:>6.1}%",
            secs * 1e3,
            100.0 * secs / total
        )?;
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct ScoreJob {
    ids: Vec<u32>,
    start: usize,
    #[serde(default)]
    generate: usize,
    /// A transcription model's audio: a WAV file whose window `window` (30 s each) is encoded first.
    #[serde(default)]
    audio: Option<PathBuf>,
    #[serde(default)]
    window: usize,
}

/// The `k` largest logits, largest first (ties: the lower id first), NaNs last.
fn top_entries(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| {
        let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
        key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(&b.0))
    };
    let k = k.min(all.len());
    if k < all.len() && k > 0 {
        all.select_nth_unstable_by(k - 1, order);
    }
    all.truncate(k);
    all.sort_by(order);
    all
}

fn cmd_score(model: &Path, jobs: &Path, top: usize, common: &Common) -> Result<()> {
    common.setup_threads()?;
    let text = if jobs.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| Error::Io {
            path: jobs.to_path_buf(),
            source: e,
        })?;
        s
    } else {
        std::fs::read_to_string(jobs).map_err(|e| Error::Io {
            path: jobs.to_path_buf(),
            source: e,
        })?
    };
    let jobs: Vec<ScoreJob> = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", jobs.display())))?;
    let model = Model::load_with(model, &common.load_options()?)?;
    let chunk = model.info().max_chunk;
    let greedy = onestep::StepSampling::GREEDY;
    let mut results = Vec::new();
    for job in &jobs {
        if job.start == 0 || job.start > job.ids.len() {
            return Err(Error::InvalidArgument(format!(
                "start {} must be in 1..={}",
                job.start,
                job.ids.len()
            )));
        }
        let mut state = model.new_state()?;
        encode_job(&model, &mut state, job)?;
        let mut last = None;
        for c in job.ids[..job.start].chunks(chunk) {
            last = Some(model.step(&mut state, c, &greedy)?);
        }
        let mut out = last.ok_or_else(|| Error::InvalidArgument("empty job".into()))?;
        let mut rows = vec![top_entries(&out.logits, top)];
        for &id in &job.ids[job.start..] {
            out = model.step(&mut state, &[id], &greedy)?;
            rows.push(top_entries(&out.logits, top));
        }
        let mut generated = Vec::new();
        let mut gen_rows = Vec::new();
        for _ in 0..job.generate {
            let tok = out.next_token;
            generated.push(tok);
            gen_rows.push(top_entries(&out.logits, top));
            if generated.len() == job.generate || state.len() >= model.info().max_cache {
                break;
            }
            out = model.step(&mut state, &[tok], &greedy)?;
        }
        let kv = kv_json(&model.kv_stats(&state), common);
        results.push(serde_json::json!({
            "rows": rows, "generated": generated, "gen_rows": gen_rows, "kv": kv,
        }));
    }
    println!("{}", serde_json::Value::Array(results));
    Ok(())
}

/// Encodes a score job's audio window into `state` (transcription models); nothing without audio.
fn encode_job(model: &Model, state: &mut onestep::StepState, job: &ScoreJob) -> Result<()> {
    let Some(path) = &job.audio else {
        return Ok(());
    };
    #[cfg(feature = "audio")]
    {
        let sp = model.speech().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "job audio {}: not a transcription model",
                path.display()
            ))
        })?;
        let a = onestep::audio::read_wav(path, sp.sample_rate)?;
        let w = sp.window_samples;
        let start = (job.window * w).min(a.samples.len());
        let end = (start + w).min(a.samples.len());
        model.encode(state, &a.samples[start..end])
    }
    #[cfg(not(feature = "audio"))]
    {
        let _ = (model, state);
        Err(Error::InvalidArgument(format!(
            "job audio {}: this build reads no audio files",
            path.display()
        )))
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score {
            model,
            jobs,
            top,
            common,
        } => cmd_score(&model, &jobs, top, &common),
        Command::Chat {
            model,
            system,
            common,
        } => cmd_chat(&model, system, &common),
        Command::Run {
            model,
            prompt,
            chat,
            no_chat,
            system,
            stop,
            json,
            common,
        } => cmd_run(&model, &prompt, chat, no_chat, system, stop, json, &common),
        Command::Transcribe {
            model,
            audio,
            language,
            translate,
            no_timestamps,
            json,
            common,
        } => transcribe::cmd_transcribe(
            &model,
            &audio,
            language,
            translate,
            !no_timestamps,
            json,
            &common,
        ),
        Command::Bench {
            model,
            prompt_tokens,
            new_tokens,
            repeat,
            warmup,
            json,
            common,
        } => cmd_bench(
            &model,
            prompt_tokens,
            new_tokens,
            repeat,
            warmup,
            json,
            &common,
        ),
    }
}

fn main() {
    quiet_wayland_probe();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("onestep: {e}");
        std::process::exit(1);
    }
}

/// Mesa's Vulkan drivers probe for a Wayland display when wgpu opens an instance, and libwayland prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` where the variable is missing (a
/// server, CI, ssh). An empty private folder answers the probe quietly (no display is found there, as
/// before). Set before any thread starts; an existing value is left alone.
fn quiet_wayland_probe() {
    #[cfg(all(feature = "gpu", target_os = "linux"))]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        use std::os::unix::fs::DirBuilderExt;
        // SAFETY of the environment write: `main` runs it first, while this is the only thread.
        let uid = std::fs::metadata("/proc/self").map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.uid()
        });
        let dir = std::env::temp_dir().join(format!("onestep-runtime-{uid}"));
        let made = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        if made.is_ok() || dir.is_dir() {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

/// The folder for the GPU pipeline cache: `ONESTEP_CACHE_DIR`, else `$XDG_CACHE_HOME/onestep`, else
/// `~/.cache/onestep`.
#[cfg(feature = "gpu")]
fn user_cache_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(d) = std::env::var_os("ONESTEP_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("onestep"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("onestep"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `score`'s top entries: largest first, ties by the lower id, NaN last, k clamped.
    #[test]
    fn top_entries_are_the_largest_in_order() {
        let l = [0.5, 2.0, f32::NAN, 2.0, -1.0, 3.0];
        assert_eq!(top_entries(&l, 3), vec![(5, 3.0), (1, 2.0), (3, 2.0)]);
        let all = top_entries(&l, 10);
        assert_eq!(all.len(), 6);
        assert_eq!(all[5].0, 2);
        assert!(top_entries(&l, 0).is_empty());
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands_and_common_flags() {
        let cli = Cli::try_parse_from([
            "onestep",
            "run",
            "m.onnx",
            "-p",
            "hi",
            "--json",
            "--stop",
            "\n\n",
            "--stop",
            "User:",
            "--temperature",
            "0.7",
            "--top-k",
            "40",
            "--seed",
            "9",
            "--threads",
            "2",
        ])
        .unwrap();
        match cli.command {
            Command::Run {
                prompt,
                json,
                stop,
                common,
                chat,
                no_chat,
                ..
            } => {
                assert_eq!(prompt, "hi");
                assert!(json && !chat && !no_chat);
                assert_eq!(stop, vec!["\n\n".to_string(), "User:".to_string()]);
                let o = common.apply(GenerateOptions::default());
                assert_eq!(o.temperature, 0.7);
                assert_eq!(o.top_k, 40);
                assert_eq!(o.seed, Some(9));
                assert_eq!(common.threads, Some(2));
                assert_eq!(o.max_new_tokens, GenerateOptions::default().max_new_tokens);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["onestep", "bench", "m.onnx"]).unwrap();
        match cli.command {
            Command::Bench {
                prompt_tokens,
                new_tokens,
                repeat,
                ..
            } => assert_eq!((prompt_tokens, new_tokens, repeat), (128, 128, 5)),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from([
            "onestep",
            "run",
            "m.onnx",
            "-p",
            "x",
            "--chat",
            "--no-chat"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["onestep", "run", "m.onnx"]).is_err());
        assert!(
            Cli::try_parse_from(["onestep", "chat", "m.onnx", "--system", "Be brief."]).is_ok()
        );
    }

    #[test]
    fn vm_hwm_and_median() {
        let status = "Name:\tonestep\nVmPeak:\t  300 kB\nVmHWM:\t   215040 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(215_040 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        assert!(peak_rss_bytes().unwrap_or(1) > 0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let t = table(&[("a", vec![1.0, 3.0, 2.0]), ("longer label", vec![5.0])]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{t}");
        assert!(lines[1].contains("2.0") && lines[1].contains("1.0") && lines[1].contains("3.0"));
    }
}
