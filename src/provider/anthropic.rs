//! The Anthropic Messages dialect.
//!
//! Usage: `input_tokens` excludes the prompt-cache parts (`cache_read_input_tokens`,
//! `cache_creation_input_tokens`), so tollgate adds them back to report the whole prompt.
//! Streams report input usage in `message_start` and the cumulative output count in each
//! `message_delta`; either may be missing when a stream breaks, and is then estimated.

use bytes::Bytes;
use serde::Deserialize;

use super::{ErrorKind, EventFacts, StreamUsage, TokenUsage, append_text, collect_text};

#[derive(Deserialize, Default)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// What `serde_json::from_slice::<Option<WireUsage>>(raw)` gives (`None` where serde
    /// fails), read by [`super::json::read_fields`] (see the OpenAI dialect's).
    fn read(raw: &[u8]) -> Option<Option<WireUsage>> {
        const FIELDS: [&[u8]; 4] = [
            b"input_tokens",
            b"output_tokens",
            b"cache_creation_input_tokens",
            b"cache_read_input_tokens",
        ];
        if raw == b"null" {
            return Some(None);
        }
        let mut counts = [None; 4];
        super::json::read_fields(raw, &FIELDS, |i, value| {
            super::json::optional_count(value)
                .map(|n| counts[i] = n)
                .is_some()
        })?;
        let [
            input_tokens,
            output_tokens,
            cache_creation_input_tokens,
            cache_read_input_tokens,
        ] = counts;
        Some(Some(WireUsage {
            input_tokens,
            output_tokens,
            cache_creation_input_tokens,
            cache_read_input_tokens,
        }))
    }

    fn input(&self) -> Option<(u64, u64, u64)> {
        let base = self.input_tokens?;
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let created = self.cache_creation_input_tokens.unwrap_or(0);
        // Saturating: the counts are the upstream's, and an absurd one must not wrap into a
        // small charge (or panic in a debug build).
        Some((
            base.saturating_add(read).saturating_add(created),
            read,
            created,
        ))
    }

    fn normalise(&self) -> TokenUsage {
        let (input, read, created) = self.input().unwrap_or((0, 0, 0));
        TokenUsage {
            input_tokens: input,
            output_tokens: self.output_tokens.unwrap_or(0),
            cached_input_tokens: read,
            cache_creation_input_tokens: created,
            reasoning_tokens: 0,
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct MessageStart {
    message: Option<WithUsage>,
}

/// Usage from a complete non-streaming response body.
pub fn usage_from_body(body: &[u8]) -> Option<TokenUsage> {
    // Only the `usage` member is read; the rest (mostly generated text) is skipped.
    let usage = WireUsage::read(super::json::top_level_member(body, b"usage")?)?;
    usage.map(|u| u.normalise())
}

/// Feeds one stream event to the usage state. Only `message_start`, `message_delta` and
/// `error` are parsed; text deltas pass untouched.
pub fn observe_event(event: &str, data: &[u8], state: &mut StreamUsage) -> EventFacts {
    let mut facts = EventFacts::default();
    match event {
        "message_start" => {
            if let Ok(MessageStart {
                message: Some(WithUsage { usage: Some(u) }),
            }) = serde_json::from_slice(data)
                && let Some((input, read, created)) = u.input()
            {
                state.usage.input_tokens = input;
                state.usage.cached_input_tokens = read;
                state.usage.cache_creation_input_tokens = created;
                state.input_known = true;
            }
        }
        "message_delta" => {
            if let Ok(WithUsage { usage: Some(u) }) = serde_json::from_slice(data) {
                if let Some(out) = u.output_tokens {
                    state.usage.output_tokens = out;
                    state.output_known = true;
                }
                // Newer API versions repeat cumulative input figures here.
                if let Some((input, read, created)) = u.input() {
                    state.usage.input_tokens = input;
                    state.usage.cached_input_tokens = read;
                    state.usage.cache_creation_input_tokens = created;
                    state.input_known = true;
                }
            }
        }
        "error" => facts.error = true,
        _ => {}
    }
    facts
}

/// Generated text carried by one stream event, for the tokenizer fallback.
pub fn delivered_text(event: &str, data: &[u8], out: &mut String) {
    if event != "content_block_delta" && event != "content_block_start" {
        return;
    }
    // Only the delta (or started block) is parsed, not the whole event.
    let Some(part) = super::json::top_level_member(data, b"delta")
        .or_else(|| super::json::top_level_member(data, b"content_block"))
    else {
        return;
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(part) {
        append_text(&v, out);
    }
}

/// Generated text of a complete non-streaming response.
pub fn response_text(body: &serde_json::Value, out: &mut String) {
    if let Some(content) = body.get("content") {
        collect_text(content, out);
    }
}

/// Prompt text of a request, and how many messages it holds.
pub fn prompt_text(request: &serde_json::Value, out: &mut String) -> u64 {
    let mut messages = 0;
    if let Some(system) = request.get("system") {
        collect_text(system, out);
        messages += 1;
    }
    if let Some(list) = request.get("messages") {
        messages += list.as_array().map_or(0, |l| l.len() as u64);
        collect_text(list, out);
    }
    if let Some(tools) = request.get("tools") {
        out.push('\n');
        out.push_str(&tools.to_string());
    }
    messages
}

fn kind_string(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest => "invalid_request_error",
        ErrorKind::Authentication => "authentication_error",
        ErrorKind::NotFound => "not_found_error",
        ErrorKind::RequestTooLarge => "request_too_large",
        ErrorKind::Upstream | ErrorKind::Internal => "api_error",
        ErrorKind::Timeout => "timeout_error",
        ErrorKind::Billing => "billing_error",
        ErrorKind::RateLimit => "rate_limit_error",
    }
}

/// `{"type":"error","error":{"type","message"}}`.
pub fn error_body(kind: ErrorKind, message: &str) -> Bytes {
    let v = serde_json::json!({
        "type": "error",
        "error": {"type": kind_string(kind), "message": message}
    });
    Bytes::from(v.to_string())
}

/// A final `event: error` in a stream, as Anthropic sends it.
pub fn error_event(kind: ErrorKind, message: &str) -> Bytes {
    let body = error_body(kind, message);
    let mut out = Vec::with_capacity(body.len() + 24);
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&body);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_usage_adds_cache_parts_to_input() {
        let u = usage_from_body(br#"{"type":"message","usage":{"input_tokens":6,"output_tokens":16,"cache_creation_input_tokens":2,"cache_read_input_tokens":5}}"#).unwrap();
        assert_eq!(
            u,
            TokenUsage {
                input_tokens: 13,
                output_tokens: 16,
                cached_input_tokens: 5,
                cache_creation_input_tokens: 2,
                reasoning_tokens: 0
            }
        );
    }

    #[test]
    fn stream_usage_in_two_halves() {
        let mut s = StreamUsage::default();
        observe_event(
            "message_start",
            br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":7,"output_tokens":1,"cache_read_input_tokens":3}}}"#,
            &mut s,
        );
        assert!(s.input_known && !s.output_known);
        assert_eq!((s.usage.input_tokens, s.usage.cached_input_tokens), (10, 3));
        observe_event(
            "message_delta",
            br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":12}}"#,
            &mut s,
        );
        assert!(s.output_known);
        assert_eq!(s.usage.output_tokens, 12);
        assert!(observe_event("error", br#"{"type":"error"}"#, &mut s).error);
    }
    #[test]
    fn absurd_input_counts_saturate_instead_of_wrapping() {
        let body = br#"{"type":"message","usage":{"input_tokens":15562871626093214339,
            "cache_creation_input_tokens":2883872447616337277,"output_tokens":1}}"#;
        let usage = usage_from_body(body).unwrap();
        assert_eq!(usage.input_tokens, u64::MAX);
        assert_eq!(usage.cache_creation_input_tokens, 2883872447616337277);
    }

    proptest::proptest! {
        /// The usage reader agrees with serde on usage-like objects: the same counts, and
        /// failing where serde fails (wrong types, duplicates, numbers out of range).
        #[test]
        fn usage_is_read_as_serde_reads_it(raw in super::super::json::tests::usage_like(&["input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "service_tier"])) {
            let ours = WireUsage::read(raw.as_bytes()).map(|u| u.map(|u| u.normalise()));
            let serde = serde_json::from_str::<Option<WireUsage>>(&raw)
                .ok()
                .map(|u| u.map(|u| u.normalise()));
            proptest::prop_assert_eq!(ours, serde, "{}", raw);
        }
    }
}
