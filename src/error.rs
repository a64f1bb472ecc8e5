//! Errors tollgate answers itself, and the one place that maps them to an HTTP status and a
//! body in the caller's dialect (OpenAI `{"error":{...}}`, Anthropic
//! `{"type":"error","error":{...}}`).

use bytes::Bytes;
use http::StatusCode;

use crate::config::Dialect;
use crate::provider::{self, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    MissingKey,
    #[error("invalid API key")]
    UnknownKey,
    #[error("this API key is disabled")]
    DisabledKey,
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("request body must include a string `model`")]
    MissingModel,
    #[error("`model` is {len} bytes long; at most {max} are accepted")]
    ModelTooLong { len: usize, max: usize },
    #[error("request body is larger than the {limit}-byte limit")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("no upstream serves model `{model}` on this endpoint")]
    NoRoute { model: String },
    #[error("no upstream is configured for {dialect} requests")]
    NoDefaultUpstream { dialect: &'static str },
    #[error("upstream `{upstream}` is unreachable: {reason}")]
    UpstreamUnreachable { upstream: String, reason: String },
    #[error("upstream `{upstream}` did not answer within {timeout_ms} ms")]
    UpstreamTimeout { upstream: String, timeout_ms: u128 },
    #[error("{0}")]
    Refused(#[from] crate::balance::Refusal),
    #[error("rate limit exceeded: {limit}; retry in {retry_after_ms} ms")]
    RateLimited { limit: String, retry_after_ms: u64 },
    #[error(
        "model `{model}` has no price, and account `{account}` has spend limits; ask the operator to price it"
    )]
    Unpriced { model: String, account: String },
    #[error("no price is configured for outcome `{0}`")]
    UnknownOutcome(String),
    #[error(
        "the usage journal is over its disk budget; new requests are refused until sinks catch up"
    )]
    JournalFull,
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// Status and dialect error kind; exhaustive so a new variant cannot go unmapped.
    pub fn classify(&self) -> (StatusCode, ErrorKind) {
        match self {
            GatewayError::MissingKey | GatewayError::UnknownKey | GatewayError::DisabledKey => {
                (StatusCode::UNAUTHORIZED, ErrorKind::Authentication)
            }
            GatewayError::MalformedJson(_)
            | GatewayError::NotAnObject
            | GatewayError::MissingModel
            | GatewayError::ModelTooLong { .. }
            | GatewayError::BodyRead(_) => (StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest),
            GatewayError::BodyTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::RequestTooLarge)
            }
            GatewayError::NoRoute { .. } | GatewayError::NoDefaultUpstream { .. } => {
                (StatusCode::NOT_FOUND, ErrorKind::NotFound)
            }
            GatewayError::UpstreamUnreachable { .. } => {
                (StatusCode::BAD_GATEWAY, ErrorKind::Upstream)
            }
            GatewayError::UpstreamTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, ErrorKind::Timeout)
            }
            GatewayError::Refused(_) | GatewayError::Unpriced { .. } => {
                (StatusCode::PAYMENT_REQUIRED, ErrorKind::Billing)
            }
            GatewayError::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorKind::RateLimit)
            }
            GatewayError::UnknownOutcome(_) => (StatusCode::NOT_FOUND, ErrorKind::NotFound),
            GatewayError::JournalFull => (StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Internal),
            GatewayError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Internal),
        }
    }

    /// Status and JSON body in the caller's dialect.
    pub fn render(&self, dialect: Dialect) -> (StatusCode, Bytes) {
        let (status, kind) = self.classify();
        (
            status,
            provider::error_body(dialect, kind, &self.to_string()),
        )
    }
}
