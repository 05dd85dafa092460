//! `onestep-export` CLI.
fn main() {
    eprintln!("onestep-export: not built yet");
    std::process::exit(2);
}
