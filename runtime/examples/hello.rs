//! The README's library example: `cargo run --release --example hello -- model.onnx "Hello!"`.
use std::ops::ControlFlow;

use onestep::generate::Session;
use onestep::Model;

fn main() -> onestep::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "cache/exports/smollm2.onnx".into());
    let prompt = args.next().unwrap_or_else(|| "Hello!".into());
    let model = Model::load(&path)?; // Arc<Model>: share it across threads
    let mut session = Session::new(model.clone())?;
    let opts = session.default_options();
    let reply = session.generate(&prompt, &opts, |piece| {
        print!("{}", piece.text); // UTF-8-safe pieces
        ControlFlow::Continue(())
    })?;
    println!(
        "\n{:?} {:.1} tok/s",
        reply.stop_reason, reply.stats.decode_tokens_per_s
    );
    Ok(())
}
