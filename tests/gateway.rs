//! The gateway end to end over loopback: real HTTP to tollgate, tollgate to the mock upstream,
//! and the journal read back. Each test asserts what was metered, not only status codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{Value, json};
use tollgate::ledger::Outcome;
use tollgate::provider::Endpoint;

fn chat(model: &str, max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there general kenobi"}
        ],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

#[tokio::test]
async fn openai_chat_non_streaming_is_metered_exactly() {
    let h = Harness::start().await;
    let resp = h
        .openai("/v1/chat/completions", ALICE, chat("gpt-4o", 5, false))
        .header("x-tollgate-feature", "search")
        .header("x-tollgate-workflow", "triage")
        .header("x-tollgate-end-user", "user-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = record_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], mock_text(5));
    assert_eq!(body["usage"]["prompt_tokens"], 6);

    let r = h.record(1, &id).await;
    assert_eq!(&*r.key_id, "alice-dev");
    assert_eq!(&*r.account, "acme");
    assert_eq!(&*r.upstream, "mock-openai");
    assert_eq!(r.model.as_deref(), Some("gpt-4o"));
    assert_eq!(r.endpoint, Endpoint::ChatCompletions);
    assert_eq!((r.status, r.outcome), (200, Outcome::Completed));
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (6, 5));
    assert!(!r.estimated && !r.streamed);
    assert!(r.upstream_ttfb_us.is_some() && r.upstream_total_us >= r.upstream_ttfb_us.unwrap());
    assert_eq!(r.dimensions.feature.as_deref(), Some("search"));
    assert_eq!(r.dimensions.workflow.as_deref(), Some("triage"));
    assert_eq!(r.dimensions.end_user.as_deref(), Some("user-42"));

    // The upstream saw tollgate's credential, never the client's key or tollgate's headers.
    let seen = h.mock.received();
    let headers = &seen.last().unwrap().headers;
    let auth = headers.iter().find(|(n, _)| n == "authorization").unwrap();
    assert_eq!(auth.1, format!("Bearer {OPENAI_CREDENTIAL}"));
    assert!(
        headers
            .iter()
            .all(|(n, v)| !v.contains(ALICE) && !n.starts_with("x-tollgate"))
    );
}

#[tokio::test]
async fn hop_by_hop_and_expect_headers_stay_at_the_gateway() {
    let h = Harness::start().await;
    let resp = h
        .openai("/v1/chat/completions", ALICE, chat("gpt-4o", 3, false))
        .header("expect", "100-continue")
        .header("proxy-connection", "keep-alive")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-request-tag", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = h.mock.received();
    let headers = &seen.last().unwrap().headers;
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    for dropped in ["expect", "proxy-connection", "keep-alive", "te"] {
        assert!(!names.contains(&dropped), "{dropped} forwarded: {names:?}");
    }
    // End-to-end headers go through as they are.
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "x-request-tag" && v == "kept"),
        "{names:?}"
    );
}

#[tokio::test]
async fn cached_and_reasoning_tokens_are_recorded() {
    let h = Harness::start().await;
    let resp = h
        .openai(
            "/v1/chat/completions",
            ALICE,
            chat("gpt-cached-reasoning", 8, false),
        )
        .send()
        .await
        .unwrap();
    let id = record_id(&resp);
    assert_eq!(resp.status(), 200);
    let r = h.record(1, &id).await;
    assert_eq!(r.usage.input_tokens, 6);
    assert_eq!(r.usage.cached_input_tokens, 3);
    assert_eq!(r.usage.output_tokens, 8);
    assert_eq!(r.usage.reasoning_tokens, 4);
}

#[tokio::test]
async fn openai_stream_gets_usage_and_hides_the_extra_chunk() {
    let h = Harness::start().await;
    let resp = h
        .openai("/v1/chat/completions", BOB, chat("gpt-4o-mini", 7, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none());
    let id = record_id(&resp);
    let body = resp.text().await.unwrap();
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    // What an unmodified client receives: no usage chunk, no chunk with empty choices.
    for (_, data) in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(
            !v["choices"].as_array().unwrap().is_empty(),
            "usage chunk leaked: {data}"
        );
        assert!(
            v.get("usage").is_none_or(Value::is_null),
            "usage leaked: {data}"
        );
    }
    // ...while tollgate asked the upstream for it.
    let sent: Value = serde_json::from_slice(&h.mock.received().last().unwrap().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);

    let r = h.record(1, &id).await;
    assert!(r.streamed && !r.estimated);
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (6, 7));
    assert_eq!(&*r.account, "globex");
}

#[tokio::test]
async fn openai_stream_keeps_usage_chunk_when_client_asked() {
    let h = Harness::start().await;
    let mut req = chat("gpt-4o", 3, true);
    req["stream_options"] = json!({"include_usage": true});
    let resp = h
        .openai("/v1/chat/completions", ALICE, req)
        .send()
        .await
        .unwrap();
    let id = record_id(&resp);
    let events = sse_events(&resp.text().await.unwrap());
    let usage_chunk = events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("the client asked for the usage chunk");
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 3);
    let r = h.record(1, &id).await;
    assert_eq!(
        (r.usage.input_tokens, r.usage.output_tokens, r.estimated),
        (6, 3, false)
    );
}

#[tokio::test]
async fn completions_embeddings_and_responses_are_metered() {
    let h = Harness::start().await;
    let c = h
        .openai(
            "/v1/completions",
            ALICE,
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "one two three", "max_tokens": 4, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let c_id = record_id(&c);
    let c_events = sse_events(&c.text().await.unwrap());
    assert!(c_events.iter().all(|(_, d)| !d.contains("\"usage\":{")));

    let e = h
        .openai(
            "/v1/embeddings",
            ALICE,
            json!({"model": "text-embedding-3-small", "input": ["a b", "c d e"]}),
        )
        .send()
        .await
        .unwrap();
    let e_id = record_id(&e);
    assert_eq!(
        e.json::<Value>().await.unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let r = h
        .openai(
            "/v1/responses",
            ALICE,
            json!({"model": "gpt-4.1-cached", "input": "four words of input", "max_output_tokens": 9}),
        )
        .send()
        .await
        .unwrap();
    let r_id = record_id(&r);
    r.bytes().await.unwrap();

    let rs = h
        .openai(
            "/v1/responses",
            ALICE,
            json!({"model": "gpt-4.1", "input": "two words", "max_output_tokens": 6, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let rs_id = record_id(&rs);
    let rs_events = sse_events(&rs.text().await.unwrap());
    assert_eq!(rs_events.last().unwrap().0, "response.completed");

    let records = h.records(4).await;
    let get = |id: &str| records.iter().find(|r| r.id.to_string() == id).unwrap();
    let c = get(&c_id);
    assert_eq!(
        (c.endpoint, c.usage.input_tokens, c.usage.output_tokens),
        (Endpoint::Completions, 3, 4)
    );
    let e = get(&e_id);
    assert_eq!(
        (e.endpoint, e.usage.input_tokens, e.usage.output_tokens),
        (Endpoint::Embeddings, 5, 0)
    );
    let r = get(&r_id);
    assert_eq!(
        (
            r.endpoint,
            r.usage.input_tokens,
            r.usage.cached_input_tokens,
            r.usage.output_tokens
        ),
        (Endpoint::Responses, 4, 2, 9)
    );
    let rs = get(&rs_id);
    assert!(rs.streamed && !rs.estimated);
    assert_eq!((rs.usage.input_tokens, rs.usage.output_tokens), (2, 6));
}

#[tokio::test]
async fn anthropic_messages_streaming_and_not() {
    let h = Harness::start().await;
    let body = json!({
        "model": "claude-sonnet-4-cached",
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there general kenobi"}]}],
        "max_tokens": 6,
    });
    let resp = h.anthropic(ALICE, body.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = record_id(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["input_tokens"], 3, "mock: P - P/2 uncached");

    let mut streaming = body;
    streaming["stream"] = json!(true);
    streaming["model"] = json!("claude-haiku-4");
    let resp = h.anthropic(ALICE, streaming).send().await.unwrap();
    let sid = record_id(&resp);
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.first().unwrap().0, "message_start");
    assert_eq!(events.last().unwrap().0, "message_stop");

    let records = h.records(2).await;
    let r = records.iter().find(|r| r.id.to_string() == id).unwrap();
    assert_eq!(&*r.upstream, "mock-anthropic");
    assert_eq!(r.endpoint, Endpoint::Messages);
    assert_eq!(
        (
            r.usage.input_tokens,
            r.usage.cached_input_tokens,
            r.usage.output_tokens
        ),
        (6, 3, 6),
        "input is normalised to the whole prompt"
    );
    let s = records.iter().find(|r| r.id.to_string() == sid).unwrap();
    assert!(s.streamed && !s.estimated);
    assert_eq!((s.usage.input_tokens, s.usage.output_tokens), (6, 6));
    // The Anthropic upstream got its own credential header.
    let seen = h.mock.received();
    let headers = &seen.last().unwrap().headers;
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "x-api-key" && v == ANTHROPIC_CREDENTIAL)
    );
}

#[tokio::test]
async fn missing_usage_is_counted_with_the_tokenizer() {
    let h = Harness::start().await;
    let stream = h
        .openai(
            "/v1/chat/completions",
            ALICE,
            chat("gpt-4o-no-usage", 12, true),
        )
        .send()
        .await
        .unwrap();
    let stream_id = record_id(&stream);
    stream.text().await.unwrap();
    let plain = h
        .openai(
            "/v1/chat/completions",
            ALICE,
            chat("gpt-4o-no-usage", 10, false),
        )
        .send()
        .await
        .unwrap();
    let plain_id = record_id(&plain);
    plain.text().await.unwrap();
    let anth = h
        .anthropic(
            ALICE,
            json!({"model": "claude-no-usage", "max_tokens": 9, "stream": true,
                   "messages": [{"role": "user", "content": "hello there general kenobi"}]}),
        )
        .send()
        .await
        .unwrap();
    let anth_id = record_id(&anth);
    anth.text().await.unwrap();

    let records = h.records(3).await;
    let get = |id: &str| records.iter().find(|r| r.id.to_string() == id).unwrap();
    // Prompt: the text of both messages plus 3 tokens a message and 3 for the reply.
    let prompt = tiktoken("gpt-4o", "be brief\nhello there general kenobi") + 2 * 3 + 3;
    let s = get(&stream_id);
    assert!(s.estimated);
    assert_eq!(s.usage.input_tokens, prompt);
    assert_eq!(s.usage.output_tokens, tiktoken("gpt-4o", &mock_text(12)));
    let p = get(&plain_id);
    assert!(p.estimated);
    assert_eq!(
        (p.usage.input_tokens, p.usage.output_tokens),
        (prompt, tiktoken("gpt-4o", &mock_text(10)))
    );
    let a = get(&anth_id);
    assert!(a.estimated);
    assert_eq!(
        a.usage.input_tokens,
        tiktoken("claude", "hello there general kenobi") + 3 + 3
    );
    assert_eq!(a.usage.output_tokens, tiktoken("claude", &mock_text(9)));
}

#[tokio::test]
async fn stream_broken_mid_way_ends_with_an_error_event_and_estimated_usage() {
    let h = Harness::start().await;
    let resp = h
        .openai(
            "/v1/chat/completions",
            ALICE,
            chat("gpt-4o-error-mid", 10, true),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = record_id(&resp);
    let body = resp
        .text()
        .await
        .expect("the client sees a clean end, not a reset");
    let events = sse_events(&body);
    let (_, last) = events.last().unwrap();
    let v: Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    let delivered: String = events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let r = h.record(1, &id).await;
    assert_eq!(r.outcome, Outcome::StreamError);
    assert!(r.estimated);
    assert_eq!(r.usage.output_tokens, tiktoken("gpt-4o", &delivered));
    assert!(r.usage.output_tokens > 0 && r.usage.output_tokens < 10);

    let resp = h
        .anthropic(
            ALICE,
            json!({"model": "claude-error-mid", "max_tokens": 10, "stream": true,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().0, "error");
    let records = h.records(2).await;
    let a = records
        .iter()
        .find(|r| r.model.as_deref() == Some("claude-error-mid"))
        .unwrap();
    assert_eq!(a.outcome, Outcome::StreamError);
    assert!(a.estimated);
    assert_eq!(
        a.usage.input_tokens, 1,
        "message_start's input figure is kept"
    );
}

#[tokio::test]
async fn client_disconnect_mid_stream_is_metered_once() {
    let h = Harness::start().await;
    let mut resp = h
        .openai(
            "/v1/chat/completions",
            ALICE,
            chat("gpt-4o-large-slow-10", 0, true),
        )
        .send()
        .await
        .unwrap();
    let id = record_id(&resp);
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(resp);
    let r = h.record(1, &id).await;
    assert_eq!(r.outcome, Outcome::ClientDisconnected);
    assert!(r.estimated);
    assert!(
        r.usage.output_tokens < 4000,
        "only what was delivered: {}",
        r.usage.output_tokens
    );
}

#[tokio::test]
async fn upstream_5xx_passes_through_and_is_recorded() {
    let h = Harness::start().await;
    let resp = h
        .openai(
            "/v1/chat/completions",
            ALICE,
            chat("gpt-4o-fail-5xx", 5, false),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let id = record_id(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    let r = h.record(1, &id).await;
    assert_eq!((r.status, r.outcome), (500, Outcome::UpstreamError));
    assert_eq!(
        (r.usage.input_tokens, r.usage.output_tokens, r.estimated),
        (0, 0, false)
    );
}

#[tokio::test]
async fn bad_keys_are_refused_before_the_upstream() {
    let h = Harness::start().await;
    let before = h.mock.request_count();
    for key in ["tg-nope", DISABLED] {
        let resp = h
            .openai("/v1/chat/completions", key, chat("gpt-4o", 5, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let resp = h
        .http
        .post(format!("{}/v1/chat/completions", h.base))
        .json(&chat("gpt-4o", 5, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = h
        .anthropic(
            "tg-nope",
            json!({"model": "claude-x", "max_tokens": 1, "messages": []}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("authentication_error"))
    );
    assert_eq!(
        h.mock.request_count(),
        before,
        "no byte reached the upstream"
    );
    h.gateway.ledger().sync().await;
    assert_eq!(h.gateway.ledger().submitted(), 0);
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_dialect_errors() {
    let h = Harness::start_with("max_request_body_bytes = 2048", "").await;
    let resp = h
        .http
        .post(format!("{}/v1/chat/completions", h.base))
        .bearer_auth(ALICE)
        .header("content-type", "application/json")
        .body("{\"model\": \"gpt-4o\", \"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    // Valid JSON, but not an object: said so, not as a type error deep in the probe.
    for body in ["[1]", "\"gpt-4o\"", " 42"] {
        let resp = h
            .http
            .post(format!("{}/v1/chat/completions", h.base))
            .bearer_auth(ALICE)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v["error"]["message"], "request body must be a JSON object",
            "{body}: {v}"
        );
    }

    let resp = h
        .http
        .post(format!("{}/v1/messages", h.base))
        .header("x-api-key", ALICE)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["type"], "error");

    let resp = h
        .openai("/v1/chat/completions", ALICE, json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let huge =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let resp = h
        .openai("/v1/chat/completions", ALICE, huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    // Chunked (no content-length) bodies are cut at the limit too.
    let chunks = futures::stream::iter((0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 100])));
    let resp = h
        .http
        .post(format!("{}/v1/chat/completions", h.base))
        .bearer_auth(ALICE)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(h.mock.request_count(), 0);
    h.gateway.ledger().sync().await;
    assert_eq!(h.gateway.ledger().submitted(), 0);
}

#[tokio::test]
async fn a_model_name_longer_than_1024_bytes_is_refused_before_the_upstream() {
    let h = Harness::start().await;
    let long = format!("gpt-{}", "x".repeat(1021));
    let resp = h
        .openai("/v1/chat/completions", ALICE, chat(&long, 3, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1025 bytes long; at most 1024"),
        "{message}"
    );
    // The name is not echoed back.
    assert!(!message.contains(&long[..100]), "{message}");

    let resp = h
        .anthropic(
            ALICE,
            json!({"model": long, "max_tokens": 5, "messages": []}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error"))
    );
    assert_eq!(h.mock.request_count(), 0);

    // At the limit, the request goes through and is recorded with its model.
    let at_limit = &long[..1024];
    let resp = h
        .openai("/v1/chat/completions", ALICE, chat(at_limit, 3, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = record_id(&resp);
    resp.text().await.unwrap();
    let r = h.record(1, &id).await;
    assert_eq!(r.model.as_deref(), Some(at_limit));
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_slow_upstream_is_504() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let extra = format!(
        r#"
[[upstreams]]
name = "dead"
dialect = "openai"
base_url = "http://{dead}"
connect_timeout_ms = 500

[[routes]]
model = "gpt-dead"
upstream = "dead"
"#
    );
    let h = Harness::start_with("", &extra).await;
    let resp = h
        .openai("/v1/chat/completions", ALICE, chat("gpt-dead", 5, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    assert!(v["error"]["message"].as_str().unwrap().contains("dead"));

    let resp = h
        .openai(
            "/v1/chat/completions",
            ALICE,
            chat("gpt-4o-slow-3000", 5, false),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");

    let records = h.records(2).await;
    assert!(records.iter().any(|r| r.status == 502
        && r.outcome == Outcome::UpstreamUnreachable
        && &*r.upstream == "dead"));
    assert!(
        records
            .iter()
            .any(|r| r.status == 504 && r.outcome == Outcome::UpstreamTimeout)
    );
}

#[tokio::test]
async fn other_paths_pass_through_and_count_as_calls() {
    let h = Harness::start().await;
    let resp = h
        .http
        .get(format!("{}/v1/models", h.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let r = h.records(1).await.remove(0);
    assert_eq!(r.endpoint, Endpoint::Other);
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (0, 0));
    assert_eq!(&*r.upstream, "mock-openai");
}

#[tokio::test]
async fn credentials_never_reach_responses_or_journal() {
    let h = Harness::start().await;
    for model in ["gpt-4o", "gpt-4o-fail-5xx", "gpt-4o-error-mid"] {
        let resp = h
            .openai("/v1/chat/completions", ALICE, chat(model, 4, true))
            .send()
            .await
            .unwrap();
        let headers = format!("{:?}", resp.headers());
        let body = resp.text().await.unwrap_or_default();
        assert!(!headers.contains("SECRET") && !body.contains("SECRET"));
    }
    h.records(3).await;
    let mut journal = String::new();
    for entry in std::fs::read_dir(&h.journal).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            journal.push_str(&String::from_utf8_lossy(&std::fs::read(path).unwrap()));
        }
    }
    assert!(journal.contains("alice-dev"), "the journal was read");
    assert!(!journal.contains("SECRET") && !journal.contains(ALICE));
}

/// Accepts one connection and reads one request from it (its head and `content-length` body).
async fn accept_request(listener: &tokio::net::TcpListener) -> tokio::net::TcpStream {
    use tokio::io::AsyncReadExt;
    let (mut conn, _) = listener.accept().await.unwrap();
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        request.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&request);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return conn;
            }
        }
        assert!(n > 0, "request cut short");
    }
}

/// An upstream speaking just enough HTTP/1.1 for one response on one connection: it reads
/// the request, writes `first` (head and the start of the body) in a single write, then
/// `rest` once `release` fires, again in one write; then it holds the connection until
/// tollgate lets it go, or with `close` closes it at once.
async fn raw_upstream(
    first: String,
    rest: String,
    release: tokio::sync::oneshot::Receiver<()>,
    close: bool,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut conn = accept_request(&listener).await;
        let mut buf = [0u8; 64];
        conn.write_all(first.as_bytes()).await.unwrap();
        let _ = release.await;
        conn.write_all(rest.as_bytes()).await.unwrap();
        if !close {
            let _ = conn.read(&mut buf).await;
        }
    });
    addr
}

/// [`raw_upstream`] for one chat stream: `first` and `rest` are its events, one HTTP chunk
/// each.
async fn burst_upstream(
    first: Vec<String>,
    rest: Vec<String>,
    release: tokio::sync::oneshot::Receiver<()>,
) -> std::net::SocketAddr {
    let chunks = |events: &[String]| -> String {
        events
            .iter()
            .map(|e| format!("{:x}\r\n{e}\r\n", e.len()))
            .collect()
    };
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    raw_upstream(
        format!("{head}{}", chunks(&first)),
        format!("{}0\r\n\r\n", chunks(&rest)),
        release,
        false,
    )
    .await
}

/// A chat completion whose body the upstream sends in two parts; returns (upstream, the
/// whole body, where the first part ends).
async fn split_json_upstream(
    release: tokio::sync::oneshot::Receiver<()>,
    close_after_first: bool,
) -> (std::net::SocketAddr, String, usize) {
    let body = json!({"id": "c1", "object": "chat.completion", "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x ".repeat(400)},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 400, "total_tokens": 407}})
    .to_string();
    let cut = body.len() / 2;
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let (first, rest) = if close_after_first {
        (format!("{head}{}", &body[..cut]), String::new())
    } else {
        (format!("{head}{}", &body[..cut]), body[cut..].to_string())
    };
    let upstream = raw_upstream(first, rest, release, close_after_first).await;
    (upstream, body, cut)
}

/// Sends a chat request with `body` over a raw connection; returns the reader after the
/// response head, and the head.
async fn raw_chat(
    gateway: std::net::SocketAddr,
    body: &str,
) -> (tokio::io::BufReader<tokio::net::TcpStream>, String) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut client = tokio::net::TcpStream::connect(gateway).await.unwrap();
    client
        .write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {ALICE}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes())
        .await
        .unwrap();
    let mut reader = tokio::io::BufReader::new(client);
    let mut head = String::new();
    loop {
        let before = head.len();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            reader.read_line(&mut head),
        )
        .await
        .expect("no response head")
        .unwrap();
        assert!(
            head.len() > before,
            "the connection closed before the response head ended: {head:?}"
        );
        if &head[before..] == "\r\n" {
            return (reader, head);
        }
    }
}

/// A non-streaming response is not held until the whole body arrived: the client has the
/// head and the first part while the upstream holds back the rest; then the whole body, with
/// the upstream's length, and the usage read from it.
#[tokio::test]
async fn a_json_body_arriving_in_parts_is_forwarded_as_it_comes_and_metered() {
    use tokio::io::AsyncReadExt;
    let (release, released) = tokio::sync::oneshot::channel();
    let (upstream, body, cut) = split_json_upstream(released, false).await;
    let (gateway, journal, _dir) = gateway_for(upstream).await;
    let (mut reader, head) =
        raw_chat(gateway.addr(), &chat("gpt-4o", 400, false).to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {}\r\n", body.len())),
        "{head}"
    );
    let mut got = vec![0; cut];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reader.read_exact(&mut got),
    )
    .await
    .expect("the first part was held back")
    .unwrap();
    release.send(()).unwrap();
    reader.read_to_end(&mut got).await.unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), body);

    let r = only_record(&gateway, &journal).await;
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (7, 400));
    assert_eq!((r.status, r.outcome), (200, Outcome::Completed));
    assert!(!r.estimated);
}

/// An upstream that closes in the middle of a non-streaming body: the client gets the part
/// that came and then a broken connection (never a complete-looking response), and the call
/// is recorded once, as a stream error, with estimated usage.
#[tokio::test]
async fn a_json_body_cut_short_upstream_breaks_the_response_and_is_recorded_once() {
    use tokio::io::AsyncReadExt;
    let (release, released) = tokio::sync::oneshot::channel();
    let (upstream, body, cut) = split_json_upstream(released, true).await;
    release.send(()).unwrap();
    let (gateway, journal, _dir) = gateway_for(upstream).await;
    let (mut reader, head) =
        raw_chat(gateway.addr(), &chat("gpt-4o", 400, false).to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reader.read_to_end(&mut got),
    )
    .await
    .expect("the response never ended");
    assert_eq!(
        got,
        body.as_bytes()[..cut],
        "shorter than its content-length"
    );

    let r = only_record(&gateway, &journal).await;
    assert_eq!(r.outcome, Outcome::StreamError);
    assert!(r.estimated);
}

/// Reads one HTTP chunk of a chunked body (None at the last one).
async fn read_chunk<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let size = usize::from_str_radix(line.trim(), 16).unwrap();
    let mut data = vec![0; size + 2];
    r.read_exact(&mut data).await.unwrap();
    data.truncate(size);
    (size > 0).then_some(data)
}

/// Reads chunks until their data adds up to `expected` (asserted); returns how many it took.
async fn read_events<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    expected: String,
) -> usize {
    let mut got = String::new();
    let mut chunks = 0;
    while got.len() < expected.len() {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), read_chunk(reader))
            .await
            .expect("tollgate held back events the upstream had sent")
            .expect("the stream ended early");
        got.push_str(std::str::from_utf8(&chunk).unwrap());
        chunks += 1;
    }
    assert_eq!(got, expected);
    chunks
}

/// Events an upstream has already sent reach the client in a few writes, not one per event
/// (tollgate coalesces what is waiting), yet nothing is held back waiting for more: the
/// first burst must arrive before the upstream sends the second.
#[tokio::test]
async fn buffered_stream_events_are_coalesced_without_waiting_for_more() {
    let event = |i: usize| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}}}}]}}\n\n"
        )
    };
    let first: Vec<String> = (0..30).map(event).collect();
    let mut rest: Vec<String> = (30..50).map(event).collect();
    rest.push("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":50,\"total_tokens\":59}}\n\n".into());
    rest.push("data: [DONE]\n\n".into());
    let (release, released) = tokio::sync::oneshot::channel();
    let upstream = burst_upstream(first.clone(), rest.clone(), released).await;

    let (gateway, journal, _dir) = gateway_for(upstream).await;

    let body = json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let (mut reader, head) = raw_chat(gateway.addr(), &body).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let first_chunks = read_events(&mut reader, first.concat()).await;
    release.send(()).unwrap();
    let rest_chunks = read_events(&mut reader, rest.concat()).await;
    assert!(
        read_chunk(&mut reader).await.is_none(),
        "the body ends after [DONE]"
    );
    assert!(
        first_chunks <= 3 && rest_chunks <= 3,
        "30 + 22 waiting events took {first_chunks} + {rest_chunks} writes"
    );

    let r = only_record(&gateway, &journal).await;
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (9, 50));
    assert!(r.streamed && !r.estimated);
}

/// Sequential requests share one pooled HTTP/1.1 connection to the upstream, streams and
/// non-streaming responses alike.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let h = Harness::start().await;
    for stream in [false, true, false, true, false] {
        let resp = h
            .openai("/v1/chat/completions", ALICE, chat("gpt-4o", 3, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    h.records(5).await;
    assert_eq!(h.mock.request_count(), 5);
    assert_eq!(h.mock.connection_count(), 1);
    assert!(
        h.mock
            .received()
            .iter()
            .all(|r| r.version == http::Version::HTTP_11 && r.path == "/v1/chat/completions")
    );
    // HTTP/1.1 requests name the upstream's authority as their Host.
    let authority = h.mock.addr().to_string();
    assert!(h.mock.received().iter().all(|r| {
        r.headers
            .iter()
            .any(|(k, v)| k == "host" && *v == authority)
    }));
}

/// An upstream that closes each connection after one response (without saying so, as when
/// its keep-alive timeout passes): the pooled connection is found closed and the next request
/// goes out on a new one instead of failing.
#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, accepted) = counting_upstream(|mut conn| async move {
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // The request body is small: its head and body come in together.
        while !String::from_utf8_lossy(&request).contains("}") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0);
            request.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"id":"x","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(response.as_bytes()).await.unwrap();
        // Then, once tollgate has pooled the connection, the upstream closes it.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    })
    .await;
    let (gateway, _journal, _dir) = gateway_for(upstream).await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let resp = http
            .post(format!("http://{}/v1/chat/completions", gateway.addr()))
            .bearer_auth(ALICE)
            .json(&chat("gpt-4o", 1, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        resp.bytes().await.unwrap();
        // Let the upstream close it, and tollgate see that.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert!(
        gateway
            .ledger()
            .wait_written(3, std::time::Duration::from_secs(5))
            .await
    );
}

/// Responses without a body (204) give their connection back too: three requests, one
/// upstream connection; and each is recorded as completed.
#[tokio::test]
async fn a_connection_is_reused_after_a_response_without_a_body() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, accepted) = counting_upstream(|mut conn| async move {
        // Body-less GETs: each request ends with its head.
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                pending.drain(..end + 4);
                conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
            }
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let (gateway, journal, _dir) = gateway_for(upstream).await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let resp = http
            .get(format!("http://{}/v1/models", gateway.addr()))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
        resp.bytes().await.unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Each is recorded as completed (not as a client that went away).
    let records = journaled_records(&gateway, &journal, 3).await;
    assert!(
        records
            .iter()
            .all(|r| (r.status, r.outcome) == (204, Outcome::Completed)),
        "{records:#?}"
    );
}

/// An upstream `base_url` with a path: requests go to that prefix plus the client's path and
/// query, on the upstream's origin.
#[tokio::test]
async fn an_upstream_path_prefix_and_the_query_reach_the_upstream() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("usage.jsonl");
    let plain = format!("base_url = \"http://{}\"", h.mock.addr());
    let text = config_text(h.mock.addr(), &journal, "", "").replace(
        &plain,
        &format!("base_url = \"http://{}/gw/openai\"", h.mock.addr()),
    );
    assert!(text.contains("/gw/openai"));
    let config = tollgate::config::Config::parse(&text, &test_env()).unwrap();
    let gateway = tollgate::GatewayBuilder::new(config).start().await.unwrap();
    let resp = h
        .http
        .get(format!(
            "http://{}/v1/models?limit=2&after=m",
            gateway.addr()
        ))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    resp.bytes().await.unwrap();
    let got = h.mock.received().last().unwrap().clone();
    assert_eq!(got.path, "/gw/openai/v1/models?limit=2&after=m");
    let authority = h.mock.addr().to_string();
    assert!(
        got.headers
            .iter()
            .any(|(k, v)| k == "host" && *v == authority)
    );
}

#[tokio::test]
async fn an_idle_client_connection_is_closed_after_the_configured_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start_with("client_idle_timeout_ms = 200", "").await;
    let mut conn = tokio::net::TcpStream::connect(h.gateway.addr())
        .await
        .unwrap();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Still open within the first period: a second request on it is answered.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 401"));
    // Then idle: closed after one to two periods (200-400 ms), long before hyper's 30 s.
    let idle = std::time::Instant::now();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "not closed: {read:?}");
    assert!(
        idle.elapsed() >= std::time::Duration::from_millis(150),
        "{:?}",
        idle.elapsed()
    );
}

#[tokio::test]
async fn a_request_body_sent_in_chunks_is_forwarded_whole() {
    use futures::StreamExt;
    let h = Harness::start().await;
    let body = serde_json::to_vec(&chat("gpt-4o", 5, false)).unwrap();
    let whole: Value = h
        .openai("/v1/chat/completions", ALICE, chat("gpt-4o", 5, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Three chunks, a little apart, so the gateway reads them as separate frames.
    let parts: Vec<Vec<u8>> = body
        .chunks(body.len() / 3 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(parts.len(), 3);
    let chunks = futures::stream::iter(parts).then(|part| async move {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        Ok::<_, std::io::Error>(part)
    });
    let resp = h
        .http
        .post(format!("{}/v1/chat/completions", h.base))
        .bearer_auth(ALICE)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let chunked: Value = resp.json().await.unwrap();
    assert_eq!(chunked["usage"], whole["usage"]);
    assert_eq!(h.mock.request_count(), 2);
}

#[tokio::test]
async fn a_response_over_the_metered_size_is_forwarded_whole_and_estimated() {
    // The mock's answer is ~600 bytes: over a 256-byte limit it is not held for `usage`.
    let h = Harness::start_with("max_metered_response_bytes = 256", "").await;
    let resp = h
        .openai("/v1/chat/completions", ALICE, chat("gpt-4o", 5, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = record_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], mock_text(5));
    let r = h.record(1, &id).await;
    assert!(r.estimated, "usage read from a body over the limit");
    assert_eq!(r.outcome, Outcome::Completed);
}

/// An upstream that answers one chat stream, an event every `gap`, then holds the
/// connection open without a byte for `stall` (or ends the stream when `stall` is zero).
async fn drip_upstream(
    events: Vec<String>,
    gap: std::time::Duration,
    stall: std::time::Duration,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut conn = accept_request(&listener).await;
        let mut buf = [0u8; 64];
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        conn.write_all(head.as_bytes()).await.unwrap();
        for e in &events {
            if conn
                .write_all(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes())
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(gap).await;
        }
        if stall.is_zero() {
            let _ = conn.write_all(b"0\r\n\r\n").await;
        } else {
            tokio::time::sleep(stall).await;
        }
        let _ = conn.read(&mut buf).await;
    });
    addr
}

/// Reads a chunked body to its end (each chunk within 5 s); its text.
async fn read_stream<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> String {
    let mut got = String::new();
    while let Some(chunk) =
        tokio::time::timeout(std::time::Duration::from_secs(5), read_chunk(reader))
            .await
            .expect("no chunk within 5 s")
    {
        got.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    got
}

fn word_event(i: usize) -> String {
    format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}}}}]}}\n\n"
    )
}

/// A gateway whose upstreams give up on a body after `read_timeout_ms` without bytes.
async fn gateway_with_read_timeout(
    upstream: std::net::SocketAddr,
    read_timeout_ms: u64,
) -> (
    tollgate::RunningGateway,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("usage.jsonl");
    let text = config_text(upstream, &journal, "", "").replace(
        "timeout_ms = 1500",
        &format!("timeout_ms = 1500\nread_timeout_ms = {read_timeout_ms}"),
    );
    let config = tollgate::config::Config::parse(&text, &test_env()).unwrap();
    let gateway = tollgate::GatewayBuilder::new(config).start().await.unwrap();
    (gateway, journal, dir)
}

/// An upstream stream that stops sending (connection open, no bytes) ends, after the
/// upstream's `read_timeout_ms`, with an OpenAI-shaped error event; the call is recorded as a
/// stream error with the delivered text estimated.
#[tokio::test]
async fn a_stream_the_upstream_stops_sending_ends_with_an_error_event() {
    let events: Vec<String> = (0..3).map(word_event).collect();
    let upstream = drip_upstream(
        events.clone(),
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(20),
    )
    .await;
    let (gateway, journal, _dir) = gateway_with_read_timeout(upstream, 200).await;
    let body = json!({"model": "gpt-4o", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let started = std::time::Instant::now();
    let (mut reader, head) = raw_chat(gateway.addr(), &body).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let got = read_stream(&mut reader).await;
    let waited = started.elapsed();
    assert!(got.starts_with(&events.concat()), "{got}");
    let last = got.trim_end().rsplit("\n\n").next().unwrap();
    let error: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("no bytes from the upstream"), "{message}");
    assert!(
        waited >= std::time::Duration::from_millis(200)
            && waited < std::time::Duration::from_secs(3),
        "ended after {waited:?}"
    );
    let r = only_record(&gateway, &journal).await;
    assert_eq!(r.outcome, Outcome::StreamError);
    assert!(r.estimated && r.streamed);
    assert_eq!(r.usage.output_tokens, tiktoken("gpt-4o", "w0 w1 w2 "));
}

/// A stream whose events come slowly (eight, 100 ms apart) but each within the read timeout
/// is not cut: only a whole timeout without bytes is.
#[tokio::test]
async fn a_slow_stream_within_the_read_timeout_is_not_cut() {
    let mut events: Vec<String> = (0..8).map(word_event).collect();
    events.push("data: [DONE]\n\n".into());
    let upstream = drip_upstream(
        events.clone(),
        std::time::Duration::from_millis(100),
        std::time::Duration::ZERO,
    )
    .await;
    let (gateway, journal, _dir) = gateway_with_read_timeout(upstream, 300).await;
    let body = json!({"model": "gpt-4o", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let (mut reader, head) = raw_chat(gateway.addr(), &body).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let got = read_stream(&mut reader).await;
    assert_eq!(got, events.concat());
    let r = only_record(&gateway, &journal).await;
    assert_eq!(r.outcome, Outcome::Completed);
}
