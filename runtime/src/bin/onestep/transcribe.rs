//! `onestep transcribe model.onnx audio.wav [--json] [--no-timestamps]`: a WAV file (any rate, mono or
//! stereo, 8–32-bit integer or 32-bit float) to text: one `[start → end] text` line a segment as each
//! is complete (without timestamps: the text streamed as it is decoded), or one JSON object with the
//! segments, the timing and where the decoder and the encoder ran (`device`, `encoder_device`).

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
    timestamps: bool,
    json: bool,
    common: &Common,
) -> Result<()> {
    common.setup_threads()?;
    let model = Model::load_with(model, &common.load_options()?)?;
    let mut t = Transcriber::new(model.clone())?;
    let rate = t.speech().sample_rate;
    let a = onestep::audio::read_wav(audio, rate)?;
    let opts = TranscribeOptions {
        language,
        translate,
        timestamps,
        ..TranscribeOptions::default()
    };
    let print = |text: &str| {
        let mut o = std::io::stdout().lock();
        match o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    };
    let out = t.transcribe_with(
        &a.samples,
        &opts,
        |piece| match json || timestamps {
            true => ControlFlow::Continue(()),
            false => print(piece),
        },
        |seg| match json || !timestamps {
            true => ControlFlow::Continue(()),
            false => print(&format!(
                "[{} → {}] {}\n",
                clock(seg.start),
                clock(seg.end),
                seg.text.trim()
            )),
        },
    )?;
    if json {
        let as_json = |e: serde_json::Error| {
            onestep::Error::InvalidArgument(format!("transcript as JSON: {e}"))
        };
        // The transcript, and where the decoder and the encoder ran.
        let mut v = serde_json::to_value(&out).map_err(as_json)?;
        v["device"] = model.device().into();
        v["encoder_device"] = model.encoder_device().into();
        println!("{}", serde_json::to_string_pretty(&v).map_err(as_json)?);
    } else {
        if !timestamps {
            println!();
        }
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
    // With --json the profile goes to stderr, so stdout stays one JSON object.
    let _ = match json {
        true => crate::write_profile(&model, &mut std::io::stderr().lock()),
        false => crate::write_profile(&model, &mut std::io::stdout().lock()),
    };
    Ok(())
}

/// `seconds` as `[h:]mm:ss.ss`.
fn clock(seconds: f32) -> String {
    let cs = (seconds.max(0.0) * 100.0).round() as u64;
    let (h, m, s) = (cs / 360_000, cs / 6000 % 60, cs % 6000);
    match h {
        0 => format!("{m:02}:{:05.2}", s as f64 / 100.0),
        _ => format!("{h}:{m:02}:{:05.2}", s as f64 / 100.0),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clock_reads_as_minutes_and_seconds() {
        assert_eq!(super::clock(0.0), "00:00.00");
        assert_eq!(super::clock(9.36), "00:09.36");
        assert_eq!(super::clock(75.5), "01:15.50");
        assert_eq!(super::clock(3725.25), "1:02:05.25");
    }
}
