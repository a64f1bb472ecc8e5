//! API dialects. Everything tollgate must understand about a provider's wire format lives in
//! one file per dialect: where usage sits in a response or stream, how to ask a stream for its
//! usage, what text was generated (for the tokenizer fallback), and how errors are shaped.

pub mod anthropic;
pub mod json;
pub mod openai;

pub use crate::config::Dialect;

/// The metered endpoints, and `Other` for everything passed through uninterpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Messages,
    /// `POST /v1/outcomes`: an application reporting a business outcome (tollgate's own).
    Outcomes,
    Other,
}

impl Endpoint {
    /// Classifies a request by method and path.
    pub fn classify(method: &http::Method, path: &str) -> Endpoint {
        if method != http::Method::POST {
            return Endpoint::Other;
        }
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            "/v1/messages" => Endpoint::Messages,
            "/v1/outcomes" => Endpoint::Outcomes,
            _ => Endpoint::Other,
        }
    }

    /// The dialect of a metered endpoint.
    pub fn dialect(self) -> Option<Dialect> {
        match self {
            Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::Responses => Some(Dialect::OpenAi),
            Endpoint::Messages => Some(Dialect::Anthropic),
            Endpoint::Outcomes | Endpoint::Other => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::Outcomes => "outcomes",
            Endpoint::Other => "other",
        }
    }
}

/// Token counts of one call, normalised across dialects.
///
/// `input_tokens` is always the whole prompt, cached parts included (OpenAI's
/// `prompt_tokens`; Anthropic's `input_tokens + cache_read_input_tokens +
/// cache_creation_input_tokens`). `cached_input_tokens` and `cache_creation_input_tokens` are
/// the parts of it read from and written to the provider's prompt cache.
/// `output_tokens` includes `reasoning_tokens`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub reasoning_tokens: u64,
}

/// What a stream reported so far: the input side and output side can arrive separately
/// (Anthropic's `message_start` and `message_delta`), so each is tracked on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamUsage {
    pub usage: TokenUsage,
    pub input_known: bool,
    pub output_known: bool,
}

/// What one stream event means to the meter.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventFacts {
    /// The event is the usage-only chunk tollgate asked for (OpenAI `choices: []` + usage).
    pub usage_only: bool,
    /// The event is the provider reporting an error inside the stream.
    pub error: bool,
}

/// The fields of a request body tollgate needs, read without materialising the rest.
#[derive(Debug, Default)]
pub struct RequestFacts {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub include_usage: Option<bool>,
    /// The body has a `stream_options` member at all.
    pub has_stream_options: bool,
    /// The client's output limit (`max_tokens`, `max_completion_tokens`, `max_output_tokens`).
    pub max_output_tokens: Option<u64>,
}

#[derive(serde::Deserialize)]
struct RequestProbe<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptionsProbe>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
}

#[derive(serde::Deserialize)]
struct StreamOptionsProbe {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl RequestFacts {
    /// Reads the facts from a JSON object body. Fails on malformed JSON or a non-object.
    pub fn parse(body: &[u8]) -> Result<RequestFacts, serde_json::Error> {
        let probe: RequestProbe<'_> = serde_json::from_slice(body)?;
        Ok(RequestFacts {
            model: probe.model.map(|m| m.into_owned()),
            stream: probe.stream.unwrap_or(false),
            has_stream_options: probe.stream_options.is_some(),
            include_usage: probe.stream_options.and_then(|o| o.include_usage),
            max_output_tokens: probe
                .max_tokens
                .or(probe.max_completion_tokens)
                .or(probe.max_output_tokens),
        })
    }
}

/// The error kinds tollgate reports, mapped to each dialect's `type` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    NotFound,
    RequestTooLarge,
    Upstream,
    Timeout,
    /// The account cannot pay (cap, balance, top-up): 402.
    Billing,
    /// A rate limit: 429.
    RateLimit,
    Internal,
}

/// Renders an error body in the caller's dialect.
pub fn error_body(dialect: Dialect, kind: ErrorKind, message: &str) -> bytes::Bytes {
    match dialect {
        Dialect::OpenAi => openai::error_body(kind, message),
        Dialect::Anthropic => anthropic::error_body(kind, message),
    }
}

/// Collects the text of JSON string values found under `value` into `out`, separated by
/// newlines: message content may be a string, an array of parts with `text`, or nested
/// objects; the fallback counter only needs the words.
pub(crate) fn collect_text(value: &serde_json::Value, out: &mut String) {
    walk_text(value, out, "\n");
}

/// Like [`collect_text`] but with no separator: stream deltas are fragments of one text.
pub(crate) fn append_text(value: &serde_json::Value, out: &mut String) {
    walk_text(value, out, "");
}

fn walk_text(value: &serde_json::Value, out: &mut String, sep: &str) {
    match value {
        serde_json::Value::String(s) => {
            if !out.is_empty() {
                out.push_str(sep);
            }
            out.push_str(s);
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| walk_text(v, out, sep)),
        serde_json::Value::Object(map) => {
            for key in [
                "text",
                "content",
                "input",
                "arguments",
                "thinking",
                "partial_json",
            ] {
                if let Some(v) = map.get(key) {
                    walk_text(v, out, sep);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_facts_read_only_what_is_needed() {
        let f = RequestFacts::parse(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":false},"max_tokens":7}"#,
        )
        .unwrap();
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
        assert!(f.stream && f.has_stream_options);
        assert_eq!(f.include_usage, Some(false));
        assert_eq!(f.max_output_tokens, Some(7));
        assert!(RequestFacts::parse(b"{\"model\":").is_err());
        assert!(RequestFacts::parse(b"[1,2]").is_err());
    }

    #[test]
    fn endpoints_classify_by_method_and_path() {
        let post = http::Method::POST;
        assert_eq!(
            Endpoint::classify(&post, "/v1/chat/completions"),
            Endpoint::ChatCompletions
        );
        assert_eq!(
            Endpoint::classify(&post, "/v1/messages"),
            Endpoint::Messages
        );
        assert_eq!(
            Endpoint::classify(&http::Method::GET, "/v1/messages"),
            Endpoint::Other
        );
        assert_eq!(Endpoint::classify(&post, "/v1/models"), Endpoint::Other);
    }
}
