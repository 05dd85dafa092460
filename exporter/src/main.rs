//! `onestep-export` CLI: `onestep-export <INPUT> -o <OUT> [...]` and `onestep-export inspect <FILE>`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use onestep_export::{export, source, ExportOptions, Progress, Quantize};
use onestep_format::graph::DType;

#[derive(Parser)]
#[command(
    name = "onestep-export",
    version,
    about = "Export a decoder-only LLM (GGUF file or Hugging Face folder) or a Whisper model (CTranslate2 folder) into one ONNX file",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// GGUF file, Hugging Face model folder, or CTranslate2 Whisper folder (`model.bin`).
    input: Option<PathBuf>,
    /// Output `.onnx` file.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Re-encode the weights (default: keep the source encoding): f16; int8 (per row); q8 (8-bit
    /// blocks of 32, GGUF Q8_0's values: the CPU's fastest 8-bit form); int4 (4-bit blocks of 32).
    #[arg(long, value_enum)]
    quantize: Option<QuantArg>,
    /// Static KV cache slots (capped at the model's context length).
    #[arg(long, default_value_t = 2048)]
    max_cache: usize,
    /// Largest prefill chunk.
    #[arg(long, default_value_t = 128)]
    max_chunk: usize,
    /// KV cache element type.
    #[arg(long, value_enum, default_value_t = KvArg::F16)]
    kv_dtype: KvArg,
    /// No progress bars.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a step-graph file's inputs, outputs, metadata and op histogram.
    Inspect {
        /// The `.onnx` file.
        file: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    /// f16 (Cast + Gemm).
    F16,
    /// Per-row symmetric int8 (DequantizeLinear + Gemm).
    Int8,
    /// 8-bit blocks of 32, f16 scales, zero point 128 (MatMulNBits; GGUF Q8_0's values).
    Q8,
    /// 4-bit blocks of 32 with 4-bit zero points (MatMulNBits).
    Int4,
}

#[derive(Clone, Copy, ValueEnum)]
enum KvArg {
    F16,
    F32,
}

/// One indicatif bar per stage.
struct Bars {
    quiet: bool,
    bar: Option<ProgressBar>,
    name: String,
}

impl Progress for Bars {
    fn stage(&mut self, name: &str, total: u64) {
        self.name = name.to_string();
        if self.quiet {
            return;
        }
        let bytes = name == "write";
        let style = if bytes {
            "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {msg}"
        } else {
            "{prefix:>9} [{bar:30}] {pos}/{len} {msg}"
        };
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(style)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix(name.to_string());
        self.bar = Some(b);
    }
    fn tick(&mut self, done: u64, what: &str) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            b.set_message(what.to_string());
        }
    }
    fn finish_stage(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_with_message("done");
        }
    }
}

impl Bars {
    /// Ends the export that failed in the current stage: the bar abandoned, the error and the stage
    /// named.
    fn failed(&mut self, e: impl std::fmt::Display) -> ExitCode {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
        fail(format_args!("{e} (stage {})", self.name))
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("onestep-export: {msg}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Inspect { file }) = &cli.cmd {
        return match onestep_export::inspect::inspect(file) {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let (Some(input), Some(output)) = (&cli.input, &cli.output) else {
        return fail("usage: onestep-export <INPUT> -o <OUT> (or: onestep-export inspect <FILE>)");
    };
    let mut bars = Bars {
        quiet: cli.quiet,
        bar: None,
        name: String::new(),
    };
    let opts = ExportOptions {
        max_cache: cli.max_cache,
        max_chunk: cli.max_chunk,
        kv_dtype: match cli.kv_dtype {
            KvArg::F16 => DType::F16,
            KvArg::F32 => DType::F32,
        },
        quantize: match cli.quantize {
            None => Quantize::Keep,
            Some(QuantArg::F16) => Quantize::F16,
            Some(QuantArg::Int8) => Quantize::Int8,
            Some(QuantArg::Q8) => Quantize::Q8,
            Some(QuantArg::Int4) => Quantize::Int4,
        },
        generation: None,
    };
    if source::whisper::is_ct2(input) || source::whisper_hf::is_hf_whisper(input) {
        return export_whisper(input, output, &opts, &mut bars);
    }
    let t0 = Instant::now();
    let spinner = (!cli.quiet).then(|| {
        let s = ProgressBar::new_spinner();
        s.set_message(format!("reading {}", input.display()));
        s.enable_steady_tick(Duration::from_millis(100));
        s
    });
    let src = source::open(input);
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let src = match src {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let read_s = t0.elapsed().as_secs_f64();
    let s = match export(&src, output, &opts, &mut bars) {
        Ok(s) => s,
        Err(e) => return bars.failed(e),
    };
    let c = &src.config;
    println!("{}", s.path.display());
    println!(
        "  {:<18} {} ({} layers, hidden {}, {}/{} heads, vocab {})",
        "model",
        c.architecture,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.vocab_size
    );
    println!("  {:<18} {:.1} M", "parameters", s.parameters as f64 / 1e6);
    println!("  {:<18} {:.1} MB", "file", s.file_bytes as f64 / 1e6);
    println!("  {:<18} {:.3}", "bytes per weight", s.bytes_per_weight);
    let forms: Vec<String> = s.forms.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    println!("  {:<18} {}", "weight forms", forms.join(", "));
    println!(
        "  {:<18} {} slots, kv {}, chunk ≤ {}",
        "cache",
        s.max_cache,
        opts.kv_dtype,
        opts.max_chunk.min(s.max_cache)
    );
    print_tail(&s, read_s);
    ExitCode::SUCCESS
}

/// Times, ops and unused tensors of an export.
fn print_tail(s: &onestep_export::ExportSummary, read_s: f64) {
    let mut times = vec![format!("read {read_s:.2}s")];
    times.extend(s.timings.iter().map(|(k, v)| format!("{k} {v:.2}s")));
    println!("  {:<18} {}", "time", times.join(", "));
    let ops: Vec<String> = s
        .op_histogram
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("  {:<18} {}", "ops", ops.join(", "));
    if !s.unused_tensors.is_empty() {
        println!("  {:<18} {}", "unused tensors", s.unused_tensors.join(", "));
    }
}

/// Exports the CTranslate2 Whisper folder `input`.
fn export_whisper(
    input: &std::path::Path,
    output: &std::path::Path,
    opts: &ExportOptions,
    bars: &mut Bars,
) -> ExitCode {
    let t0 = Instant::now();
    let read = match source::whisper::is_ct2(input) {
        true => source::whisper::read_ct2(input),
        false => source::whisper_hf::read_hf(input),
    };
    let src = match read {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let read_s = t0.elapsed().as_secs_f64();
    let s = match onestep_export::export_speech::export_whisper(&src, output, opts, bars) {
        Ok(s) => s,
        Err(e) => return bars.failed(e),
    };
    let c = &src.config;
    println!("{}", s.path.display());
    println!(
        "  {:<18} whisper ({}+{} layers, width {}, {} heads, {} mels, vocab {})",
        "model",
        c.encoder_layers,
        c.decoder_layers,
        c.d_model,
        c.decoder_heads,
        c.mel_bins,
        c.vocab_size
    );
    println!("  {:<18} {:.1} M", "parameters", s.parameters as f64 / 1e6);
    println!("  {:<18} {:.1} MB", "file", s.file_bytes as f64 / 1e6);
    println!(
        "  {:<18} {} slots, kv {}",
        "cache", s.max_cache, opts.kv_dtype
    );
    print_tail(&s, read_s);
    ExitCode::SUCCESS
}
