//! Chat template renderer: the input is a template source; it is compiled and rendered in the sandbox
//! with a short conversation (and with none).
#![no_main]

use libfuzzer_sys::fuzz_target;
use onestep::generate::chat::{ChatMessage, ChatTemplate};

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = ChatTemplate::new(src, "<s>", "</s>") else {
        return;
    };
    let msgs = [
        ChatMessage::system("Be brief."),
        ChatMessage::user("Hi {{ there }} {% raw %}"),
        ChatMessage::assistant("Hello."),
        ChatMessage::user("What is 2+2?"),
    ];
    let _ = t.render(&msgs, true);
    let _ = t.render(&[], false);
});
