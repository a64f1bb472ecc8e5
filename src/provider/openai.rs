//! The OpenAI dialect: Chat Completions, legacy Completions, Embeddings and the Responses API.
//!
//! Usage lives in `usage` (`prompt_tokens`/`completion_tokens` with `*_details`, or the
//! Responses API's `input_tokens`/`output_tokens`). Chat and Completions streams only carry it
//! when the request asks (`stream_options.include_usage`), in a final chunk with `choices: []`;
//! tollgate asks on the client's behalf and hides that chunk again when the client did not.

use std::borrow::Cow;
use std::sync::LazyLock;

use bytes::Bytes;
use memchr::memmem::Finder;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{Endpoint, ErrorKind, EventFacts, StreamUsage, TokenUsage, append_text, collect_text};

#[derive(Deserialize, Default)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<WireDetails>,
    completion_tokens_details: Option<WireDetails>,
    input_tokens_details: Option<WireDetails>,
    output_tokens_details: Option<WireDetails>,
}

#[derive(Deserialize, Default)]
struct WireDetails {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl WireDetails {
    /// As serde reads an `Option<WireDetails>` (see [`WireUsage::read`]).
    fn read(raw: &[u8]) -> Option<Option<WireDetails>> {
        if raw == b"null" {
            return Some(None);
        }
        let mut counts = [None; 2];
        super::json::read_fields(raw, &[b"cached_tokens", b"reasoning_tokens"], |i, value| {
            super::json::optional_count(value)
                .map(|n| counts[i] = n)
                .is_some()
        })?;
        let [cached_tokens, reasoning_tokens] = counts;
        Some(Some(WireDetails {
            cached_tokens,
            reasoning_tokens,
        }))
    }
}

impl WireUsage {
    /// What `serde_json::from_slice::<Option<WireUsage>>(raw)` gives (`None` where serde
    /// fails), read by [`super::json::read_fields`] instead: on every non-streaming response,
    /// serde's generic walk over the usage object cost as much as finding it.
    fn read(raw: &[u8]) -> Option<Option<WireUsage>> {
        const FIELDS: [&[u8]; 8] = [
            b"prompt_tokens",
            b"completion_tokens",
            b"input_tokens",
            b"output_tokens",
            b"prompt_tokens_details",
            b"completion_tokens_details",
            b"input_tokens_details",
            b"output_tokens_details",
        ];
        if raw == b"null" {
            return Some(None);
        }
        let mut counts = [None; 4];
        let mut details: [Option<WireDetails>; 4] = Default::default();
        super::json::read_fields(raw, &FIELDS, |i, value| match i {
            0..4 => super::json::optional_count(value)
                .map(|n| counts[i] = n)
                .is_some(),
            _ => WireDetails::read(value)
                .map(|d| details[i - 4] = d)
                .is_some(),
        })?;
        let [
            prompt_tokens,
            completion_tokens,
            input_tokens,
            output_tokens,
        ] = counts;
        let [
            prompt_tokens_details,
            completion_tokens_details,
            input_tokens_details,
            output_tokens_details,
        ] = details;
        Some(Some(WireUsage {
            prompt_tokens,
            completion_tokens,
            input_tokens,
            output_tokens,
            prompt_tokens_details,
            completion_tokens_details,
            input_tokens_details,
            output_tokens_details,
        }))
    }

    fn normalise(&self) -> TokenUsage {
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .or(self.input_tokens_details.as_ref())
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        let reasoning = self
            .completion_tokens_details
            .as_ref()
            .or(self.output_tokens_details.as_ref())
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0);
        TokenUsage {
            input_tokens: self.prompt_tokens.or(self.input_tokens).unwrap_or(0),
            output_tokens: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
            cached_input_tokens: cached,
            cache_creation_input_tokens: 0,
            reasoning_tokens: reasoning,
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ChunkWithUsage {
    usage: Option<WireUsage>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize)]
struct ResponseEvent {
    response: Option<WithUsage>,
}

#[derive(Deserialize)]
struct MaybeError {
    error: Option<IgnoredAny>,
}

/// Usage from a complete non-streaming response body.
pub fn usage_from_body(body: &[u8]) -> Option<TokenUsage> {
    // Only the `usage` member is read; the rest (mostly generated text) is skipped.
    let usage = WireUsage::read(super::json::top_level_member(body, b"usage")?)?;
    usage.map(|u| u.normalise())
}

/// Feeds one stream event to the usage state; cheap for the common chunk without usage.
pub fn observe_event(
    endpoint: Endpoint,
    event: &str,
    data: &[u8],
    state: &mut StreamUsage,
) -> EventFacts {
    let mut facts = EventFacts::default();
    match endpoint {
        Endpoint::Responses => {
            let kind = if event.is_empty() {
                response_event_type(data)
            } else {
                event
            };
            match kind {
                "response.completed" | "response.incomplete" | "response.failed" => {
                    if let Ok(ResponseEvent {
                        response: Some(WithUsage { usage: Some(u) }),
                    }) = serde_json::from_slice(data)
                    {
                        set_all(state, u.normalise());
                    }
                }
                "error" => facts.error = true,
                _ => {}
            }
        }
        _ => {
            if data == b"[DONE]" {
                return facts;
            }
            if has_object_member(data, &USAGE_KEY)
                && let Ok(chunk) = serde_json::from_slice::<ChunkWithUsage>(data)
                && let Some(u) = chunk.usage
            {
                set_all(state, u.normalise());
                facts.usage_only = chunk.choices.is_some_and(|c| c.is_empty());
            }
            if ERROR_KEY.find(data).is_some()
                && let Ok(MaybeError { error: Some(_) }) = serde_json::from_slice(data)
            {
                facts.error = true;
            }
        }
    }
    facts
}

fn set_all(state: &mut StreamUsage, usage: TokenUsage) {
    state.usage = usage;
    state.input_known = true;
    state.output_known = true;
}

/// Searchers for the keys every stream event is checked for, built once (building one costs
/// more than searching a chunk).
static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static ERROR_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));

/// True when `key` appears followed by `:` and an object (`{`), i.e. a non-null member.
fn has_object_member(data: &[u8], key: &Finder<'_>) -> bool {
    let mut from = 0;
    while let Some(i) = key.find(&data[from..]) {
        let needle = key.needle().len();
        let rest = &data[from + i + needle..];
        let mut it = rest.iter().skip_while(|b| b.is_ascii_whitespace());
        if it.next() == Some(&b':') && it.find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            return true;
        }
        from += i + needle;
    }
    false
}

fn response_event_type(data: &[u8]) -> &'static str {
    for kind in [
        "response.completed",
        "response.incomplete",
        "response.failed",
    ] {
        if memchr::memmem::find(data, kind.as_bytes()).is_some() {
            return kind;
        }
    }
    ""
}

/// The text-bearing parts of a chat or completions chunk's `choices`, borrowed from the
/// event (budgeted streams read every event: building a `serde_json::Value` of each one cost
/// more than everything else on the stream path together).
#[derive(Deserialize)]
struct ChoiceText<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<DeltaText<'a>>,
}

#[derive(Deserialize)]
struct DeltaText<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCallText<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallText<'a> {
    #[serde(borrow, default)]
    function: Option<FunctionText<'a>>,
}

#[derive(Deserialize)]
struct FunctionText<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

/// Appends the text of a chunk's `choices` (raw JSON) read through [`ChoiceText`]; false
/// when they do not have that shape (the caller then walks them generically).
fn append_choices_text(choices: &[u8], out: &mut String) -> bool {
    let Ok(choices) = serde_json::from_slice::<Vec<ChoiceText<'_>>>(choices) else {
        return false;
    };
    for choice in &choices {
        out.extend(choice.text.as_deref());
        if let Some(d) = &choice.delta {
            for text in [&d.content, &d.refusal, &d.reasoning_content] {
                out.extend(text.as_deref());
            }
            for f in d
                .tool_calls
                .iter()
                .flatten()
                .filter_map(|c| c.function.as_ref())
            {
                out.extend(f.name.as_deref());
                out.extend(f.arguments.as_deref());
            }
        }
    }
    true
}

/// Generated text carried by one stream event, for the tokenizer fallback.
pub fn delivered_text(endpoint: Endpoint, event: &str, data: &[u8], out: &mut String) {
    if endpoint != Endpoint::Responses
        && let Some(choices) = super::json::top_level_member(data, b"choices")
        && append_choices_text(choices, out)
    {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        delivered_text_of_value(endpoint, event, &v, out);
    }
}

/// [`delivered_text`] for any shape of event, walking a parsed value.
fn delivered_text_of_value(
    endpoint: Endpoint,
    event: &str,
    v: &serde_json::Value,
    out: &mut String,
) {
    match endpoint {
        Endpoint::Responses => {
            let kind = if event.is_empty() {
                v.get("type").and_then(|t| t.as_str()).unwrap_or("")
            } else {
                event
            };
            if kind.ends_with(".delta")
                && let Some(d) = v.get("delta")
            {
                append_text(d, out);
            }
        }
        _ => {
            for choice in v
                .get("choices")
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(t) = choice.get("text") {
                    append_text(t, out);
                }
                if let Some(delta) = choice.get("delta") {
                    for key in ["content", "refusal", "reasoning_content"] {
                        if let Some(t) = delta.get(key) {
                            append_text(t, out);
                        }
                    }
                    for call in delta
                        .get("tool_calls")
                        .and_then(|c| c.as_array())
                        .into_iter()
                        .flatten()
                    {
                        if let Some(f) = call.get("function") {
                            for key in ["name", "arguments"] {
                                if let Some(t) = f.get(key) {
                                    append_text(t, out);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Generated text of a complete non-streaming response, for the tokenizer fallback.
pub fn response_text(endpoint: Endpoint, body: &serde_json::Value, out: &mut String) {
    match endpoint {
        Endpoint::Responses => {
            if let Some(output) = body.get("output") {
                collect_text(output, out);
            }
        }
        Endpoint::Embeddings => {}
        _ => {
            for choice in body
                .get("choices")
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(t) = choice.get("text") {
                    collect_text(t, out);
                }
                if let Some(m) = choice.get("message") {
                    for key in ["content", "refusal"] {
                        if let Some(t) = m.get(key) {
                            collect_text(t, out);
                        }
                    }
                    if let Some(calls) = m.get("tool_calls") {
                        collect_text(calls, out);
                    }
                }
            }
        }
    }
}

/// Prompt text of a request, and how many messages it holds (each costs a few framing tokens).
pub fn prompt_text(request: &serde_json::Value, out: &mut String) -> u64 {
    let mut messages = 0;
    for key in ["messages", "prompt", "input", "instructions"] {
        if let Some(v) = request.get(key) {
            if let Some(list) = v.as_array().filter(|_| key != "prompt") {
                messages += list.len() as u64;
            }
            collect_text(v, out);
        }
    }
    messages
}

/// Whether tollgate must ask this stream for usage: Chat and Completions streams carry usage
/// only on request.
pub fn needs_usage_request(endpoint: Endpoint) -> bool {
    matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
}

/// Returns the request body with `stream_options.include_usage = true`. The common case (no
/// `stream_options` member) is a byte splice after the opening brace, not a re-serialisation.
pub fn with_include_usage(body: &Bytes, has_stream_options: bool) -> Option<Bytes> {
    if !has_stream_options {
        let open = body.iter().position(|b| *b == b'{')?;
        let rest = &body[open + 1..];
        let empty = rest
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'}');
        let member: &[u8] = if empty {
            br#""stream_options":{"include_usage":true}"#
        } else {
            br#""stream_options":{"include_usage":true},"#
        };
        let mut out = Vec::with_capacity(body.len() + member.len());
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(member);
        out.extend_from_slice(rest);
        return Some(Bytes::from(out));
    }
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object_mut()?;
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if !opts.is_object() {
        *opts = serde_json::json!({});
    }
    opts.as_object_mut()?
        .insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

fn kind_strings(kind: ErrorKind) -> (&'static str, Option<&'static str>) {
    match kind {
        ErrorKind::InvalidRequest => ("invalid_request_error", None),
        ErrorKind::Authentication => ("invalid_request_error", Some("invalid_api_key")),
        ErrorKind::NotFound => ("invalid_request_error", Some("model_not_found")),
        ErrorKind::RequestTooLarge => ("invalid_request_error", Some("request_too_large")),
        ErrorKind::Upstream => ("server_error", Some("upstream_unavailable")),
        ErrorKind::Timeout => ("server_error", Some("upstream_timeout")),
        ErrorKind::Billing => ("insufficient_quota", Some("insufficient_quota")),
        ErrorKind::RateLimit => ("requests", Some("rate_limit_exceeded")),
        ErrorKind::Internal => ("server_error", None),
    }
}

/// `{"error":{"message","type","param","code"}}`.
pub fn error_body(kind: ErrorKind, message: &str) -> Bytes {
    let (kind, code) = kind_strings(kind);
    let v = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    Bytes::from(v.to_string())
}

/// A final stream event reporting an error, as OpenAI sends it inside an SSE stream.
pub fn error_event(kind: ErrorKind, message: &str) -> Bytes {
    let body = error_body(kind, message);
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&body);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_usage_with_details() {
        let u = usage_from_body(br#"{"id":"x","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":8}}}"#).unwrap();
        assert_eq!(
            u,
            TokenUsage {
                input_tokens: 10,
                output_tokens: 20,
                cached_input_tokens: 4,
                cache_creation_input_tokens: 0,
                reasoning_tokens: 8
            }
        );
        let e = usage_from_body(br#"{"usage":{"prompt_tokens":3,"total_tokens":3}}"#).unwrap();
        assert_eq!((e.input_tokens, e.output_tokens), (3, 0));
        assert_eq!(usage_from_body(br#"{"choices":[]}"#), None);
    }

    #[test]
    fn responses_usage() {
        let u = usage_from_body(br#"{"object":"response","usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":2},"output_tokens":9,"output_tokens_details":{"reasoning_tokens":3},"total_tokens":14}}"#).unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.output_tokens,
                u.reasoning_tokens
            ),
            (5, 2, 9, 3)
        );
        let mut s = StreamUsage::default();
        observe_event(
            Endpoint::Responses,
            "response.completed",
            br#"{"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":9}}}"#,
            &mut s,
        );
        assert!(s.input_known && s.output_known);
        assert_eq!(s.usage.output_tokens, 9);
    }

    #[test]
    fn stream_chunks_usage_only_and_null_usage() {
        let mut s = StreamUsage::default();
        let f = observe_event(
            Endpoint::ChatCompletions,
            "",
            br#"{"choices":[{"delta":{"content":"\"usage\": {"}}],"usage":null}"#,
            &mut s,
        );
        assert_eq!(f, EventFacts::default());
        assert!(!s.output_known);
        let f = observe_event(
            Endpoint::ChatCompletions,
            "",
            br#"{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            &mut s,
        );
        assert!(f.usage_only);
        assert_eq!(s.usage.output_tokens, 2);
        let f = observe_event(
            Endpoint::ChatCompletions,
            "",
            br#"{"error":{"message":"boom"}}"#,
            &mut s,
        );
        assert!(f.error);
    }

    #[test]
    fn include_usage_is_spliced_or_rewritten() {
        let b = Bytes::from_static(br#" {"model":"m","stream":true}"#);
        let out = with_include_usage(&b, false).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let b = Bytes::from_static(br#"{"model":"m","stream_options":{"include_usage":false}}"#);
        let v: serde_json::Value =
            serde_json::from_slice(&with_include_usage(&b, true).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let b = Bytes::from_static(b"{ }");
        let v: serde_json::Value =
            serde_json::from_slice(&with_include_usage(&b, false).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn delivered_text_from_chunks() {
        let mut out = String::new();
        delivered_text(
            Endpoint::ChatCompletions,
            "",
            br#"{"choices":[{"delta":{"content":"hello"}}]}"#,
            &mut out,
        );
        delivered_text(
            Endpoint::Responses,
            "response.output_text.delta",
            br#"{"delta":"world"}"#,
            &mut out,
        );
        assert_eq!(out, "helloworld");
    }

    #[test]
    fn borrowed_chunk_reading_matches_the_generic_walk() {
        for chunk in [
            &br#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":"a \"q\" \u00e9\n"},"logprobs":null}],"usage":null}"#[..],
            br#"{"choices":[{"delta":{"refusal":"no"}},{"delta":{"reasoning_content":"hm","content":"x"}}]}"#,
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}},{"index":1}]}}]}"#,
            br#"{"choices":[{"text":"legacy","index":0}]}"#,
            br#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
            br#"{"choices":[{"delta":{"content":[{"type":"text","text":"parts"}]}}]}"#,
            br#"{"choices":[{"delta":{"content":null}}]}"#,
            br#"{"error":{"message":"boom"}}"#,
        ] {
            let mut fast = String::new();
            delivered_text(Endpoint::ChatCompletions, "", chunk, &mut fast);
            let mut generic = String::new();
            let v: serde_json::Value = serde_json::from_slice(chunk).unwrap();
            delivered_text_of_value(Endpoint::ChatCompletions, "", &v, &mut generic);
            assert_eq!(fast, generic, "{}", String::from_utf8_lossy(chunk));
        }
    }
    proptest::proptest! {
        /// The usage reader agrees with serde on usage-like objects: the same counts, and
        /// failing where serde fails (wrong types, duplicates, numbers out of range).
        #[test]
        fn usage_is_read_as_serde_reads_it(raw in super::super::json::tests::usage_like(&["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "prompt_tokens_details", "completion_tokens_details", "input_tokens_details", "output_tokens_details", "cached_tokens", "reasoning_tokens", "total_tokens"])) {
            let ours = WireUsage::read(raw.as_bytes()).map(|u| u.map(|u| u.normalise()));
            let serde = serde_json::from_str::<Option<WireUsage>>(&raw)
                .ok()
                .map(|u| u.map(|u| u.normalise()));
            proptest::prop_assert_eq!(ours, serde, "{}", raw);
        }
    }
}
