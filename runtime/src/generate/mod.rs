//! Generation: tokenizer, chat template, chunked prefill, the step loop, stop conditions, streaming.
