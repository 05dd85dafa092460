//! Chat template rendering (Jinja, as in Hugging Face `tokenizer_config.json`), sandboxed.
//!
//! The environment follows what `transformers`' `apply_chat_template` provides: `trim_blocks` and
//! `lstrip_blocks` on, loop controls (`break`/`continue`), the context variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, the functions `raise_exception(msg)` and
//! `strftime_now(fmt)`, Python string/dict methods (`.strip()`, `.split()`, `.startswith()`, `.items()`,
//! ... via `minijinja-contrib`'s pycompat) and a `tojson` filter that writes what Python's
//! `json.dumps(x, ensure_ascii=False)` writes (`", "`/`": "` separators, insertion order kept,
//! `indent` and `sort_keys` arguments).
//!
//! Sandbox: a template gets a fuel budget ([`FUEL`] instructions), a recursion limit and an output size
//! limit, so a hostile template fails with [`Error::Template`] instead of hanging or eating memory.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Instructions one rendering may execute.
pub const FUEL: u64 = 20_000_000;
/// Nesting depth (macros, includes, nested blocks) one rendering may reach.
pub const RECURSION_LIMIT: usize = 64;
/// Largest rendered prompt, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 16 << 20;

const TEMPLATE_NAME: &str = "chat";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever roles the template knows).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

fn template_err(e: minijinja::Error) -> Error {
    // `{:#}` includes the template line and the source chain.
    let mut msg = e.to_string();
    if let Some(detail) = e.detail() {
        if !msg.contains(detail) {
            let _ = write!(msg, ": {detail}");
        }
    }
    if let Some(line) = e.line() {
        let _ = write!(msg, " (line {line})");
    }
    Error::Template(msg)
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings the template sees under those names
    /// (empty when the model has none).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(template_err)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the result ends where the assistant's reply
    /// begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, None)
    }

    /// Like [`ChatTemplate::render`], with extra context variables (an object, e.g. `tools`,
    /// `documents`, `enable_thinking`); they never override the four standard names.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: Option<&serde_json::Value>,
    ) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        let mut ctx = serde_json::Map::new();
        if let Some(extra) = extra {
            match extra {
                serde_json::Value::Object(m) => ctx.extend(m.clone()),
                _ => {
                    return Err(Error::InvalidArgument(
                        "extra chat template context must be a JSON object".into(),
                    ))
                }
            }
        }
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?,
        );
        ctx.insert(
            "add_generation_prompt".into(),
            serde_json::Value::Bool(add_generation_prompt),
        );
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        let mut out = CappedWriter::default();
        tmpl.render_captured_to(Value::from_serialize(&ctx), &mut out)
            .map_err(|e| {
                if out.overflow {
                    Error::Template(format!(
                        "rendered prompt is larger than {MAX_OUTPUT_BYTES} bytes"
                    ))
                } else {
                    template_err(e)
                }
            })?;
        String::from_utf8(out.buf)
            .map_err(|_| Error::Template("template produced invalid UTF-8".into()))
    }
}

#[derive(Default)]
struct CappedWriter {
    buf: Vec<u8>,
    overflow: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > MAX_OUTPUT_BYTES {
            self.overflow = true;
            return Err(std::io::Error::other("output too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised an exception: {msg}"),
    ))
}

/// `strftime_now(fmt)`: the current time (UTC; no time-zone database is carried) formatted with the
/// common C `strftime` directives (`%Y %y %m %d %e %B %b %h %A %a %H %I %M %S %p %j %%`, and `%-d`-style
/// no-padding variants). Unknown directives are copied as written.
fn strftime_now(fmt: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(&fmt, secs)))
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31) (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 4).rem_euclid(7) as usize;
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[month as usize - 1] + day + u32::from(is_leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match d {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&num(year.rem_euclid(100), 2)),
            'm' => out.push_str(&num(month.into(), 2)),
            'd' => out.push_str(&num(day.into(), 2)),
            'e' => out.push_str(&format!("{day:2}")),
            'B' => out.push_str(MONTHS[month as usize - 1]),
            'b' | 'h' => out.push_str(&MONTHS[month as usize - 1][..3]),
            'A' => out.push_str(DAYS[weekday]),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'H' => out.push_str(&num(hour, 2)),
            'I' => out.push_str(&num(hour12, 2)),
            'M' => out.push_str(&num(minute, 2)),
            'S' => out.push_str(&num(second, 2)),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'j' => out.push_str(&num(yday.into(), 3)),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    // `ensure_ascii` is accepted; only `False` (the transformers default) is implemented.
    if kwargs.get::<Option<bool>>("ensure_ascii")? == Some(true) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "tojson: ensure_ascii=True is not supported",
        ));
    }
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let fmt = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    fmt.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly what Python's json.dumps(ensure_ascii=False) escapes: `"`, `\`, and
    // control characters (as \n, \t, ..., \u00XX).
    out.push_str(&serde_json::Value::String(s.to_string()).to_string());
}

fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let a = f.abs();
    if a == 0.0 || (1e-4..1e16).contains(&a) {
        return format!("{f:?}");
    }
    // Python repr: exponent form with a sign and at least two digits (`1e+20`, `1.5e-07`).
    let s = format!("{f:e}");
    match s.split_once('e') {
        Some((mant, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mant}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

impl PyJson {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    }

    fn write(
        &self,
        out: &mut String,
        v: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        if depth > RECURSION_LIMIT {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: value nested too deeply",
            ));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    // `to_string` prints integers (including i128/u128) exactly.
                    out.push_str(&v.to_string());
                } else {
                    out.push_str(&py_float(f64::try_from(v.clone())?));
                }
            }
            ValueKind::String => json_str(out, v.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    match k.as_str() {
                        Some(s) => json_str(out, s),
                        None => json_str(out, &k.to_string()),
                    }
                    out.push_str(&self.key_sep);
                    self.write(out, &v.get_item(k)?, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a {} value", v.kind()),
                ))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::tokenizer::tests::CHAT_EXPECTED;

    const SMOLLM2_TEMPLATE: &str = include_str!("testdata/smollm2_chat_template.jinja");

    fn expected() -> serde_json::Value {
        serde_json::from_str(CHAT_EXPECTED).unwrap()
    }

    #[test]
    fn renders_like_transformers() {
        let exp = expected();
        let bos = exp["bos_token"].as_str().unwrap();
        let eos = exp["eos_token"].as_str().unwrap();
        let smol = ChatTemplate::new(SMOLLM2_TEMPLATE, bos, eos).unwrap();
        let rich = ChatTemplate::new(exp["rich_template"].as_str().unwrap(), bos, eos).unwrap();
        let renders = exp["renders"].as_array().unwrap();
        assert_eq!(renders.len(), 12);
        for r in renders {
            let msgs: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
            let agp = r["add_generation_prompt"].as_bool().unwrap();
            let t = if r["template"] == "smollm2" {
                &smol
            } else {
                &rich
            };
            let got = t.render(&msgs, agp).unwrap();
            assert_eq!(got, r["text"].as_str().unwrap(), "case {r}");
        }
    }

    #[test]
    fn default_system_prompt_text() {
        let t = ChatTemplate::new(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
        let s = t.render(&[ChatMessage::user("Hi")], true).unwrap();
        assert!(s.starts_with(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        ));
        assert!(s.ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[ChatMessage::user("x")], false).unwrap(), "ok");
        let e = t.render(&[ChatMessage::assistant("x")], false).unwrap_err();
        match e {
            Error::Template(m) => assert!(m.contains("first must be user"), "{m}"),
            other => panic!("wrong error {other}"),
        }
    }

    #[test]
    fn syntax_error_is_a_template_error() {
        let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(e, Error::Template(_)), "{e}");
    }

    #[test]
    fn hostile_templates_fail_fast() {
        let start = std::time::Instant::now();
        let spin = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(matches!(spin.render(&[], false), Err(Error::Template(_))));
        let recurse = ChatTemplate::new(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "",
            "",
        )
        .unwrap();
        assert!(matches!(
            recurse.render(&[], false),
            Err(Error::Template(_))
        ));
        let big = ChatTemplate::new(
            "{% for i in range(100) %}{{ 'x' * 10000000 }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        match big.render(&[], false) {
            Err(Error::Template(m)) => assert!(m.contains("larger than"), "{m}"),
            other => panic!("expected a size error, got {other:?}"),
        }
        // The list: a 1 GB string, a billion-element range, self-including templates.
        for src in [
            "{{ 'a' * 10**9 }}",
            "{% for i in range(10**9) %}x{% endfor %}",
            "{{ range(10**9) | length }}",
            "{% include 'chat' %}",
            "{% extends 'chat' %}",
        ] {
            let r = ChatTemplate::new(src, "", "").and_then(|t| t.render(&[], false));
            assert!(matches!(r, Err(Error::Template(_))), "{src}: {r:?}");
        }
        assert!(start.elapsed().as_secs() < 30);
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ {'b': 1, 'a': [1.5, none, true, 'é\"\\n'], 'c': {}} | tojson }}|\
             {{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|\
             {{ [1, {'k': []}] | tojson(indent=2) }}|{{ 1e20 | tojson }}|{{ 2.0 | tojson }}",
            "",
            "",
        )
        .unwrap();
        let got = t.render(&[], false).unwrap();
        // Strings produced with Python 3: json.dumps(..., ensure_ascii=False).
        let want = "{\"b\": 1, \"a\": [1.5, null, true, \"é\\\"\\n\"], \"c\": {}}|\
                    {\"a\": 2, \"b\": 1}|\
                    [\n  1,\n  {\n    \"k\": []\n  }\n]|1e+20|2.0";
        assert_eq!(got, want);
    }

    #[test]
    fn pycompat_methods_and_loop_controls() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
             {{ m.content.strip().lower().replace('a', 'o') }}{{ '|' if m.content.endswith(' ') }}\
             {% endfor %}{{ messages[0].content.split()|join(',') }}",
            "",
            "",
        )
        .unwrap();
        let got = t
            .render(
                &[
                    ChatMessage::user(" Alpha Beta "),
                    ChatMessage::assistant("GAMMA"),
                    ChatMessage::user("never"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(got, "olpho beto|gommoAlpha,Beta");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday (day 60 of a leap year).
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %-d %%", t),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM 29 %"
        );
        // 1969-12-31 23:59:59 (negative time) and 2000-03-01.
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", -1), "1969-12-31 23:59:59");
        assert_eq!(
            strftime("%d %b %Y %A", 951_868_800),
            "01 Mar 2000 Wednesday"
        );
        let now = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").unwrap();
        let year: i32 = now.render(&[], false).unwrap().parse().unwrap();
        assert!(year >= 2024);
    }

    #[test]
    fn extra_context_is_visible_but_cannot_override() {
        let t = ChatTemplate::new("{{ tools | length }}{{ bos_token }}", "<s>", "</s>").unwrap();
        let extra = serde_json::json!({"tools": [1, 2, 3], "bos_token": "EVIL"});
        assert_eq!(t.render_with(&[], false, Some(&extra)).unwrap(), "3<s>");
    }
}
