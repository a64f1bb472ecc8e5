//! Micro-benchmarks of the per-chunk metering work, each beside a baseline in the same run:
//! - SSE framing + usage detection over an OpenAI chat stream, beside a bare `memchr` scan
//!   for event terminators (the least any framing can do);
//! - usage extraction from a non-streaming body, beside a full `serde_json::Value` parse;
//! - the tokenizer fallback (tiktoken o200k), to show why it stays off the hot path.
//!
//! `cargo bench --bench metering`; throughput is reported in bytes/s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use tollgate::meter::sse::SseParser;
use tollgate::provider::{Endpoint, StreamUsage, openai};

fn chat_stream(chunks: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..chunks {
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
    }
    s.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":50,\"total_tokens\":62}}\n\ndata: [DONE]\n\n");
    s.into_bytes()
}

fn sse(c: &mut Criterion) {
    let stream = chat_stream(50);
    // Split into frames the size an upstream typically writes (one event each, roughly).
    let frames: Vec<&[u8]> = stream.chunks(200).collect();
    let mut g = c.benchmark_group("sse_stream_50_chunks");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("baseline_memchr_terminators", |b| {
        b.iter(|| {
            let mut n = 0;
            for f in &frames {
                n += memchr::memmem::find_iter(f, b"\n\n").count();
            }
            black_box(n)
        })
    });
    g.bench_function("tollgate_frame_and_meter", |b| {
        b.iter(|| {
            let mut parser = SseParser::new(false);
            let mut usage = StreamUsage::default();
            for f in &frames {
                parser.feed(f, |block| {
                    if let Some(data) = block.data {
                        openai::observe_event(
                            Endpoint::ChatCompletions,
                            block.event,
                            data,
                            &mut usage,
                        );
                    }
                });
            }
            black_box(usage)
        })
    });
    g.bench_function("tollgate_frame_meter_and_hide_usage_chunk", |b| {
        b.iter(|| {
            let mut parser = SseParser::new(true);
            let mut usage = StreamUsage::default();
            let mut out = Vec::with_capacity(stream.len());
            for f in &frames {
                parser.feed(f, |block| {
                    let facts = block.data.map(|data| {
                        openai::observe_event(
                            Endpoint::ChatCompletions,
                            block.event,
                            data,
                            &mut usage,
                        )
                    });
                    if !facts.is_some_and(|f| f.usage_only) {
                        out.extend_from_slice(block.raw);
                    }
                });
            }
            black_box((usage, out.len()))
        })
    });
    g.finish();
}

fn body_usage(c: &mut Criterion) {
    let content = "tok ".repeat(400);
    let body = format!(
        "{{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{content}\",\"refusal\":null}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":400,\"total_tokens\":412,\"prompt_tokens_details\":{{\"cached_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0}}}}}}"
    );
    let mut g = c.benchmark_group("non_streaming_usage");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(body.as_bytes()).unwrap()))
    });
    g.bench_function("tollgate_usage_probe", |b| {
        b.iter(|| black_box(openai::usage_from_body(body.as_bytes()).unwrap()))
    });
    g.finish();

    // A short answer, as the load bench's mock gives (16 tokens, 628 bytes): mostly member
    // names and small values rather than text.
    let short = br#"{"choices":[{"finish_reason":"length","index":0,"logprobs":null,"message":{"annotations":[],"content":"tok tok tok tok tok tok tok tok tok tok tok tok tok tok tok tok","refusal":null,"role":"assistant"}}],"created":1795705709,"id":"chatcmpl-mock0000000000000001","model":"gpt-4o-mini","object":"chat.completion","service_tier":"default","system_fingerprint":"fp_mock","usage":{"completion_tokens":16,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":1,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":17}}"#;
    let mut g = c.benchmark_group("non_streaming_usage_short");
    g.throughput(Throughput::Bytes(short.len() as u64));
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(short).unwrap()))
    });
    g.bench_function("tollgate_usage_probe", |b| {
        b.iter(|| black_box(openai::usage_from_body(short).unwrap()))
    });
    g.finish();
}

fn tokenizer(c: &mut Criterion) {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(200);
    tollgate::meter::tokenizer::warm_up();
    let mut g = c.benchmark_group("tokenizer_fallback");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("o200k_count", |b| {
        b.iter(|| black_box(tollgate::meter::tokenizer::count("gpt-4o", &text)))
    });
    g.finish();
}

criterion_group!(benches, sse, body_usage, tokenizer);
criterion_main!(benches);
