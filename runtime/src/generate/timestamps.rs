//! Whisper's timestamp tokens: the rules a timestamped decode chooses under ([`TimestampRules`], as
//! CTranslate2's `ApplyTimestampRules` applies them for faster-whisper) and the split of a window's
//! tokens into timed pieces with the window's advance ([`split`], faster-whisper's
//! `_split_segments_by_timestamps`).
//!
//! Token ids from `begin` (`<|0.00|>`) up are timestamps, one every `time_precision` seconds (0.02)
//! from the window's start; a piece of text is written between a pair of them.

/// What a timestamped decode may choose next, given what it chose so far in the window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimestampRules {
    /// `<|endoftext|>`.
    pub eot: u32,
    /// `<|notimestamps|>`.
    pub no_timestamps: u32,
    /// The first timestamp token, `<|0.00|>`.
    pub begin: u32,
    /// The latest timestamp the first token may be (`begin` + max initial timestamp / precision).
    pub max_initial: u32,
}

impl TimestampRules {
    /// Sets to −∞ what may not come after `generated` (the window's tokens so far) in `logits`
    /// (already suppressed as the model's lists say):
    /// - `<|notimestamps|>` never;
    /// - first, only a timestamp no later than `max_initial`;
    /// - after a timestamp pair (or the first timestamp), no timestamp; after a lone timestamp, no text
    ///   (a timestamp or the end);
    /// - no timestamp earlier than the last one;
    /// - where text may come, and the timestamps' summed probability is above every text token's, no
    ///   text (a timestamp or the end).
    pub fn apply(&self, logits: &mut [f32], generated: &[u32]) {
        let n = logits.len();
        let (begin, eot) = ((self.begin as usize).min(n), self.eot as usize);
        let is_ts = |t: u32| t >= self.begin;
        off(
            logits,
            self.no_timestamps as usize,
            self.no_timestamps as usize + 1,
        );
        let Some(&last) = generated.last() else {
            off(logits, 0, begin);
            off(logits, self.max_initial as usize + 1, n);
            return;
        };
        let mut check = true;
        if is_ts(last) {
            let penultimate = match generated.len() {
                1 => last,
                k => generated[k - 2],
            };
            if is_ts(penultimate) {
                off(logits, begin, n);
                check = false;
            } else {
                off(logits, 0, eot);
            }
        }
        if let Some(&t) = generated.iter().rev().find(|&&t| is_ts(t)) {
            off(logits, begin, t as usize);
        }
        if check && timestamp_more_likely(logits, begin) {
            off(logits, 0, begin);
        }
    }
}

/// Sets `logits[from..to]` (clamped to its length) to −∞.
fn off(logits: &mut [f32], from: usize, to: usize) {
    let to = to.min(logits.len());
    for x in &mut logits[from.min(to)..to] {
        *x = f32::NEG_INFINITY;
    }
}

/// Whether the summed probability of the timestamps (`logits[begin..]`) is above that of every
/// token before them (compared as log-probabilities; the shared normalizer cancels).
fn timestamp_more_likely(logits: &[f32], begin: usize) -> bool {
    let (text, ts) = logits.split_at(begin);
    let max_text = text.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let m = ts.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if m == f64::NEG_INFINITY {
        return false;
    }
    let lse = m + ts.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    lse > max_text
}

/// A timed piece of a window's tokens.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Piece {
    /// Start and end in timestamp steps from the window's start.
    pub start: u32,
    /// End, in timestamp steps.
    pub end: u32,
    /// The tokens, timestamps included.
    pub tokens: Vec<u32>,
}

/// How far the next window starts after this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Advance {
    /// The whole window: its text ended with a single timestamp (no speech after it), or had no pair.
    Window,
    /// To this timestamp step (the last one closing a pair): the unfinished text after it is
    /// decoded again in the next window.
    To(u32),
}

/// `tokens` (a window's, `begin` the first timestamp id) split at each timestamp pair into pieces
/// (a window without a pair is one piece, ending at its last timestamp, or at `window_steps` when
/// there is none after the start), and where the next window starts.
pub(crate) fn split(tokens: &[u32], begin: u32, window_steps: u32) -> (Vec<Piece>, Advance) {
    let is_ts = |t: u32| t >= begin;
    let n = tokens.len();
    let single_ending = n >= 2 && !is_ts(tokens[n - 2]) && is_ts(tokens[n - 1]);
    let mut cuts: Vec<usize> = (1..n)
        .filter(|&i| is_ts(tokens[i]) && is_ts(tokens[i - 1]))
        .collect();
    if cuts.is_empty() {
        let ts: Vec<u32> = tokens.iter().copied().filter(|&t| is_ts(t)).collect();
        let end = match ts.last() {
            Some(&t) if t != begin => t - begin,
            _ => window_steps,
        };
        let piece = Piece {
            start: 0,
            end,
            tokens: tokens.to_vec(),
        };
        return (vec![piece], Advance::Window);
    }
    if single_ending {
        cuts.push(n);
    }
    let mut pieces = Vec::with_capacity(cuts.len());
    let mut from = 0;
    for &cut in &cuts {
        let part = &tokens[from..cut];
        pieces.push(Piece {
            start: part[0].saturating_sub(begin),
            end: part[part.len() - 1].saturating_sub(begin),
            tokens: part.to_vec(),
        });
        from = cut;
    }
    let advance = if single_ending {
        Advance::Window
    } else {
        Advance::To(tokens[from - 1].saturating_sub(begin))
    };
    (pieces, advance)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOT: u32 = 10;
    const NO_TS: u32 = 12;
    const B: u32 = 13;

    fn rules() -> TimestampRules {
        TimestampRules {
            eot: EOT,
            no_timestamps: NO_TS,
            begin: B,
            max_initial: B + 3,
        }
    }

    /// Which ids are still allowed after the rules, for `n` ids: the text ones at logit 3 (e³ ≈ 20
    /// beats the ≤ 17 timestamps' summed e⁰), the timestamps at 0.
    fn allowed(generated: &[u32], n: usize) -> Vec<u32> {
        let mut l: Vec<f32> = (0..n as u32)
            .map(|i| if i < B { 3.0 } else { 0.0 })
            .collect();
        rules().apply(&mut l, generated);
        (0..n as u32)
            .filter(|&i| l[i as usize].is_finite())
            .collect()
    }

    #[test]
    fn the_first_token_is_an_early_timestamp() {
        assert_eq!(allowed(&[], 30), vec![13, 14, 15, 16]);
    }

    #[test]
    fn timestamps_come_in_pairs_and_never_go_back() {
        // After the first timestamp: text or the end, no timestamp (and never <|notimestamps|>).
        assert_eq!(allowed(&[B + 2], 20), (0..12).collect::<Vec<_>>());
        // After text: anything but earlier timestamps.
        let after_text = allowed(&[B + 2, 3], 20);
        assert_eq!(
            after_text,
            [(0..12).collect::<Vec<_>>(), vec![15, 16, 17, 18, 19]].concat()
        );
        // After a lone timestamp closing text: a timestamp (not earlier) or the end (ids between
        // the end and the timestamps, specials the model's suppress list covers, are not text).
        assert_eq!(allowed(&[B + 2, 3, B + 4], 20), vec![10, 11, 17, 18, 19]);
        // After a pair: text or the end.
        assert_eq!(
            allowed(&[B, 3, B + 4, B + 4], 20),
            (0..12).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_timestamp_is_forced_where_their_sum_beats_every_text_token() {
        // Five timestamps at logit 0 (sum e^0·5 = 5) against text at ln 4 (4 < 5): text goes.
        let mut l = vec![4f32.ln(); 13];
        l.extend([0.0; 5]);
        rules().apply(&mut l, &[B, 3]);
        assert!(l[..13].iter().all(|x| x.is_infinite()));
        assert!(l[13..].iter().all(|x| x.is_finite()));
        // At ln 6 a text token beats the sum: text stays.
        let mut l = vec![6f32.ln(); 13];
        l.extend([0.0; 5]);
        rules().apply(&mut l, &[B, 3]);
        assert!(l[..12].iter().all(|x| x.is_finite()));
    }

    #[test]
    fn pairs_split_the_window_and_set_its_advance() {
        // <0.00> a b <1.00><1.00> c <2.00>: a single timestamp at the end, two pieces, whole window.
        let t = [B, 1, 2, B + 50, B + 50, 3, B + 100];
        let (p, adv) = split(&t, B, 1500);
        assert_eq!(
            p,
            vec![
                Piece {
                    start: 0,
                    end: 50,
                    tokens: vec![B, 1, 2, B + 50]
                },
                Piece {
                    start: 50,
                    end: 100,
                    tokens: vec![B + 50, 3, B + 100]
                },
            ]
        );
        assert_eq!(adv, Advance::Window);
        // Unfinished text after the last pair: left for the next window, which starts there.
        let t = [B, 1, B + 50, B + 50, 3, 4];
        let (p, adv) = split(&t, B, 1500);
        assert_eq!(p.len(), 1);
        assert_eq!(adv, Advance::To(50));
        // No pair: one piece to the last timestamp, or to the window's end.
        let (p, adv) = split(&[B, 1, 2, B + 70], B, 1500);
        assert_eq!((p[0].start, p[0].end, adv), (0, 70, Advance::Window));
        let (p, _) = split(&[B, 1, 2], B, 1500);
        assert_eq!(p[0].end, 1500);
        let (p, _) = split(&[], B, 1500);
        assert_eq!((p.len(), p[0].end), (1, 1500));
    }
}
