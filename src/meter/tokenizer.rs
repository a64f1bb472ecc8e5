//! The tokenizer fallback: when a provider's usage figures are missing (provider omits them,
//! stream broken, client gone), tokens are counted with tiktoken-rs. Counting runs at roughly
//! 13 MB/s per core, so whole prompts and responses are counted on a blocking task after the
//! response is done. The one use on the request path is a stream on a budget (an account
//! with limits), which counts each event's few bytes of text as it passes; the encoder is
//! built at start (`warm_up`) so that never waits for initialisation in steady state.

use tiktoken_rs::CoreBPE;

/// Tokens OpenAI's chat format adds per message (role and framing) and once per reply
/// priming, per OpenAI's published counting recipe.
pub const TOKENS_PER_MESSAGE: u64 = 3;
pub const TOKENS_PER_REPLY: u64 = 3;

/// The encoder for `model`: the model's own for OpenAI names tiktoken knows, o200k_base for
/// everything else (newer OpenAI models and other providers, for which it is the closest
/// public approximation).
pub fn encoder_for(model: &str) -> &'static CoreBPE {
    tiktoken_rs::bpe_for_model(model).unwrap_or_else(|_| tiktoken_rs::o200k_base_singleton())
}

/// Tokens in `text` under `model`'s encoding.
pub fn count(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    encoder_for(model).count_ordinary(text) as u64
}

/// Set once the default encoder is built: the request path never waits for that.
static DEFAULT_READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Builds the default encoder ahead of the first fallback (about 150 ms, once).
pub fn warm_up() {
    let _ = tiktoken_rs::o200k_base_singleton();
    DEFAULT_READY.store(true, std::sync::atomic::Ordering::Release);
}

/// A count for the request path (streams on a budget): o200k_base when it is built, else a
/// conservative three bytes a token — never blocks on building an encoder.
pub fn count_on_request_path(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    if DEFAULT_READY.load(std::sync::atomic::Ordering::Acquire) {
        tiktoken_rs::o200k_base_singleton().count_ordinary(text) as u64
    } else {
        (text.len() as u64).div_ceil(3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_model_encoding_and_default() {
        assert_eq!(count("gpt-4o", ""), 0);
        assert_eq!(count("gpt-4o", "hello world"), 2);
        assert_eq!(count("claude-sonnet-4", "hello world"), 2);
        assert!(count("gpt-4", "tok tok tok tok") >= 4);
    }
}
