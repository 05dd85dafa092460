//! `onestep` demo CLI: chat, run, bench.
fn main() {
    eprintln!("onestep: not built yet");
    std::process::exit(2);
}
