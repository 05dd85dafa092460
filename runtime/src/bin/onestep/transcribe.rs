//! `onestep transcribe model.onnx audio.wav [--json]`: a WAV file (any rate, mono or stereo, 8–32-bit
//! integer or 32-bit float) to text, streamed as it is decoded, or one JSON object with the segments
//! and the timing.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;

use onestep::generate::{TranscribeOptions, Transcriber};
use onestep::{Model, Result};

use crate::Common;

/// Runs the command.
pub fn cmd_transcribe(
    model: &Path,
    audio: &Path,
    language: Option<String>,
    translate: bool,
    json: bool,
    common: &Common,
) -> Result<()> {
    common.setup_threads()?;
    let model = Model::load_with(model, &common.load_options()?)?;
    let mut t = Transcriber::new(model)?;
    let rate = t.speech().sample_rate;
    let a = onestep::audio::read_wav(audio, rate)?;
    let opts = TranscribeOptions {
        language,
        translate,
        ..TranscribeOptions::default()
    };
    let out = t.transcribe(&a.samples, &opts, |piece| {
        if json {
            return ControlFlow::Continue(());
        }
        let mut o = std::io::stdout().lock();
        match o.write_all(piece.as_bytes()).and_then(|_| o.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    })?;
    if json {
        let v = serde_json::to_string_pretty(&out)
            .map_err(|e| onestep::Error::InvalidArgument(format!("transcript as JSON: {e}")))?;
        println!("{v}");
    } else {
        println!();
        let s = &out.stats;
        eprintln!(
            "[{:.1} s of audio in {:.2} s ({:.1}× real time): {} windows, encoder {:.2} s, decoder {:.2} s for {} tokens]",
            s.audio_s,
            s.encode_s + s.decode_s,
            s.real_time_factor,
            s.windows,
            s.encode_s,
            s.decode_s,
            s.tokens
        );
    }
    Ok(())
}
