//! Generation: tokenizer, chat template, chunked prefill, the step loop, stop conditions, streaming.
//!
//! [`Session`] is the entry point: it owns one sequence's [`crate::StepState`] over a shared
//! [`crate::Model`], tokenizes ([`Tokenizer`]), renders chat templates ([`ChatTemplate`]), prefills the
//! prompt in chunks of at most `max_chunk` tokens, then steps one token at a time, streaming UTF-8-safe
//! text pieces ([`StreamDecoder`]) until a stop condition ([`StopReason`]).
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use onestep::generate::{ChatMessage, Session};
//! # fn main() -> onestep::Result<()> {
//! let model = onestep::Model::load("model.onnx")?;
//! let mut session = Session::new(model)?;
//! let opts = session.default_options();
//! let reply = session.chat(&[ChatMessage::user("Hi!")], &opts, |piece| {
//!     print!("{}", piece.text);
//!     ControlFlow::Continue(())
//! })?;
//! println!("\n[{}; {:.1} tok/s]", reply.stop_reason, reply.stats.decode_tokens_per_s);
//! # Ok(()) }
//! ```

pub mod chat;
pub mod sampling;
pub mod session;
pub mod stats;
pub mod stop;
pub mod stream;
mod timestamps;
pub mod tokenizer;
mod tokenizer_json;
pub mod transcribe;

pub use chat::{ChatMessage, ChatTemplate};
pub use sampling::{GenerateOptions, SamplingRng};
pub use session::{plan_chunks, template_for, Completion, OwnedStream, Piece, Session, Stream};
pub use stats::GenerateStats;
pub use stop::{stop_strings_from_bytes, StopMatcher, StopReason, StopStep};
pub use stream::StreamDecoder;
pub use tokenizer::Tokenizer;
pub use transcribe::{Segment, TranscribeOptions, Transcriber, Transcript};
