//! Audio in: a WAV file (integer PCM of 8–32 bits or 32-bit float, any channel count and rate) read
//! into mono samples at the rate a transcription model takes — channels averaged, then resampled
//! (FFT resampling: `rubato`'s `FftFixedInOut`). Behind the `audio` feature (the CLI's); the
//! libraries take samples.
//!
//! Bad input is an error naming the file: not a WAV, truncated, no samples, absurd rates or channel
//! counts, non-finite samples, audio longer than [`MAX_SECONDS`].

use std::io::Read;
use std::path::Path;

use rubato::{FftFixedInOut, Resampler};

use crate::error::{Error, Result};

/// Longest audio read (4 hours): bounds memory (4 h of 16 kHz f32 is 0.9 GB).
pub const MAX_SECONDS: u64 = 4 * 3600;
/// Highest sample rate taken.
pub const MAX_RATE: u32 = 768_000;
/// Most channels taken.
pub const MAX_CHANNELS: u16 = 64;

/// Mono samples and their rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    /// Samples in `[-1, 1]`.
    pub samples: Vec<f32>,
    /// Samples per second.
    pub rate: u32,
}

fn bad(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{what}: {detail}"))
}

/// Reads the WAV file at `path` and returns it mono at `rate`.
pub fn read_wav(path: &Path, rate: u32) -> Result<Audio> {
    let name = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let a = decode_wav(std::io::BufReader::new(f), &name)?;
    resample(&a, rate, &name)
}

/// Decodes WAV bytes from `r` into mono samples at the file's rate; `name` names it in errors.
pub fn decode_wav<R: Read>(r: R, name: &str) -> Result<Audio> {
    let w = hound::WavReader::new(r).map_err(|e| bad(name, format!("not a WAV file ({e})")))?;
    let spec = w.spec();
    if spec.sample_rate == 0 || spec.sample_rate > MAX_RATE {
        return Err(bad(
            name,
            format!("sample rate {} Hz is not usable", spec.sample_rate),
        ));
    }
    if spec.channels == 0 || spec.channels > MAX_CHANNELS {
        return Err(bad(
            name,
            format!("{} channels is not usable", spec.channels),
        ));
    }
    let frames = w.duration() as u64;
    if frames == 0 {
        return Err(bad(name, "no samples"));
    }
    if frames / spec.sample_rate as u64 > MAX_SECONDS {
        return Err(bad(
            name,
            format!(
                "{} s of audio is over the limit of {MAX_SECONDS} s",
                frames / spec.sample_rate as u64
            ),
        ));
    }
    let ch = spec.channels as usize;
    let truncated =
        |e: hound::Error| bad(name, format!("unreadable or truncated sample data ({e})"));
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float if spec.bits_per_sample == 32 => w
            .into_samples::<f32>()
            .collect::<std::result::Result<_, _>>()
            .map_err(truncated)?,
        hound::SampleFormat::Int if (8..=32).contains(&spec.bits_per_sample) => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            w.into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<std::result::Result<_, _>>()
                .map_err(truncated)?
        }
        f => {
            return Err(bad(
                name,
                format!(
                    "{}-bit {f:?} samples are not supported",
                    spec.bits_per_sample
                ),
            ))
        }
    };
    if interleaved.len() < ch || !interleaved.len().is_multiple_of(ch) {
        return Err(bad(name, "truncated sample data (a partial frame)"));
    }
    if let Some(i) = interleaved.iter().position(|x| !x.is_finite()) {
        return Err(bad(name, format!("sample {} is not finite", i / ch)));
    }
    let samples = interleaved
        .chunks_exact(ch)
        .map(|f| f.iter().sum::<f32>() / ch as f32)
        .collect();
    Ok(Audio {
        samples,
        rate: spec.sample_rate,
    })
}

/// `a` at `rate` (unchanged when it is already at that rate); the output's length is the input's
/// duration at the new rate.
pub fn resample(a: &Audio, rate: u32, name: &str) -> Result<Audio> {
    if a.rate == rate {
        return Ok(a.clone());
    }
    let err =
        |e: &dyn std::fmt::Display| bad(name, format!("resampling {} Hz → {rate} Hz: {e}", a.rate));
    let mut r =
        FftFixedInOut::<f32>::new(a.rate as usize, rate as usize, 1024, 1).map_err(|e| err(&e))?;
    let want = (a.samples.len() as u64 * rate as u64 / a.rate as u64) as usize;
    let delay = r.output_delay();
    let mut out = Vec::with_capacity(want + delay + r.output_frames_max());
    let mut pos = 0;
    // Whole chunks, then zeros until the delayed tail is out.
    while out.len() < want + delay {
        let n = r.input_frames_next();
        let mut chunk = vec![0f32; n];
        let take = n.min(a.samples.len().saturating_sub(pos));
        chunk[..take].copy_from_slice(&a.samples[pos..pos + take]);
        pos += take;
        let y = r.process(&[chunk], None).map_err(|e| err(&e))?;
        out.extend_from_slice(&y[0]);
    }
    let samples = out[delay..delay + want].to_vec();
    Ok(Audio { samples, rate })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_bytes(
        spec: hound::WavSpec,
        write: impl FnOnce(&mut hound::WavWriter<std::io::Cursor<&mut Vec<u8>>>),
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        {
            let mut w = hound::WavWriter::new(std::io::Cursor::new(&mut buf), spec).unwrap();
            write(&mut w);
            w.finalize().unwrap();
        }
        buf
    }

    fn spec(rate: u32, channels: u16, bits: u16, float: bool) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: if float {
                hound::SampleFormat::Float
            } else {
                hound::SampleFormat::Int
            },
        }
    }

    /// 16-bit stereo is averaged to mono and scaled to [-1, 1).
    #[test]
    fn stereo_int16_is_mixed_down() {
        let b = wav_bytes(spec(16000, 2, 16, false), |w| {
            for (l, r) in [(16384i16, 0i16), (-32768, -32768), (100, 300)] {
                w.write_sample(l).unwrap();
                w.write_sample(r).unwrap();
            }
        });
        let a = decode_wav(&b[..], "t.wav").unwrap();
        assert_eq!(a.rate, 16000);
        assert_eq!(a.samples, vec![0.25, -1.0, 200.0 / 32768.0]);
    }

    /// A 440 Hz tone at 44.1 kHz resampled to 16 kHz keeps its length and level, and lines up with the
    /// tone at the new rate (the resampler's delay is taken out to within a fraction of a sample).
    #[test]
    fn resampled_tone_matches_the_tone_at_the_new_rate() {
        let f = 440.0f64;
        let src: Vec<f32> = (0..44100)
            .map(|i| (2.0 * std::f64::consts::PI * f * i as f64 / 44100.0).sin() as f32 * 0.5)
            .collect();
        let a = resample(
            &Audio {
                samples: src,
                rate: 44100,
            },
            16000,
            "t",
        )
        .unwrap();
        assert_eq!(a.samples.len(), 16000);
        let want: Vec<f64> = (0..16000)
            .map(|i| (2.0 * std::f64::consts::PI * f * i as f64 / 16000.0).sin() * 0.5)
            .collect();
        let inner = 400..15600;
        let dot = |x: &dyn Fn(usize) -> f64, y: &dyn Fn(usize) -> f64| {
            inner.clone().map(|i| x(i) * y(i)).sum::<f64>()
        };
        let got = |i: usize| a.samples[i] as f64;
        let ideal = |i: usize| want[i];
        let (gg, ww, gw) = (dot(&got, &got), dot(&ideal, &ideal), dot(&got, &ideal));
        let level = (gg / ww).sqrt();
        let corr = gw / (gg * ww).sqrt();
        assert!((level - 1.0).abs() < 0.01, "level {level}");
        assert!(corr > 0.999, "correlation {corr}");
    }

    /// Hostile or unusable files are errors naming the file, never panics.
    #[test]
    fn bad_files_are_errors() {
        let ok = wav_bytes(spec(16000, 1, 16, false), |w| {
            for i in 0..100 {
                w.write_sample(i as i16).unwrap();
            }
        });
        for cut in [0, 4, 12, 30, 43] {
            let e = decode_wav(&ok[..cut], "cut.wav").unwrap_err().to_string();
            assert!(e.contains("cut.wav"), "{e}");
        }
        assert!(decode_wav(&b"RIFF0000WAVEjunk"[..], "j.wav").is_err());
        let empty = wav_bytes(spec(16000, 1, 16, false), |_| {});
        assert!(decode_wav(&empty[..], "e.wav")
            .unwrap_err()
            .to_string()
            .contains("no samples"));
        let nan = wav_bytes(spec(16000, 1, 32, true), |w| {
            w.write_sample(0.5f32).unwrap();
            w.write_sample(f32::NAN).unwrap();
        });
        assert!(decode_wav(&nan[..], "n.wav")
            .unwrap_err()
            .to_string()
            .contains("not finite"));
        // An absurd rate in the header.
        let mut absurd = ok.clone();
        absurd[24..28].copy_from_slice(&4_000_000_000u32.to_le_bytes());
        assert!(decode_wav(&absurd[..], "r.wav").is_err());
    }
}
