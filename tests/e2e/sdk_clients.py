#!/usr/bin/env python3
"""Drives a running tollgate with the official `openai` and `anthropic` SDKs, used exactly as an
application would (api_key = a tollgate key, base_url = tollgate), against tollgate's mock
upstream (`tollgate::mock`).

    python sdk_clients.py --openai-base http://127.0.0.1:PORT/v1 \
        --anthropic-base http://127.0.0.1:PORT --key KEY

Every call checks that the SDK parsed the reply (text is the mock's `tok tok ...`, usage
follows the mock's deterministic rules wherever the client sees usage) and notes the
`x-tollgate-record-id` response header. On success it prints ONE JSON line: a list of
`{"call", "record_id", "expect": {...}}`, where `expect` is what the journal record with that
id must hold. On any mismatch it prints every failure to stderr and exits 1.

The mock's rules (see src/mock.rs): input tokens P = words of all request text; output N =
max_tokens / max_completion_tokens / max_output_tokens; model containing `cached` gives
C = P // 2 cached input tokens (Anthropic reports input_tokens = P - C plus
cache_read_input_tokens = C); `reasoning` gives N // 2 reasoning tokens; `no-usage` never
reports usage (tollgate then estimates with its tokenizer, which the Rust test recomputes).
"""

import argparse
import json
import sys
import traceback

import anthropic
import openai

RECORD_ID_HEADER = "x-tollgate-record-id"


class Mismatch(Exception):
    pass


def mock_text(n):
    return " ".join(["tok"] * n)


def words(*texts):
    return max(1, sum(len(t.split()) for t in texts))


def check(what, got, want):
    if got != want:
        raise Mismatch(f"{what}: got {got!r}, expected {want!r}")


def record_id(headers):
    rid = headers.get(RECORD_ID_HEADER)
    if not rid:
        raise Mismatch(f"no {RECORD_ID_HEADER} response header (headers: {dict(headers)})")
    return rid


def expect(endpoint, model, streamed, input_tokens, output_tokens, cached=0, reasoning=0,
           estimated=False, dims=None, estimate=None):
    dims = dims or {}
    e = {
        "endpoint": endpoint,
        "model": model,
        "streamed": streamed,
        "estimated": estimated,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": cached,
        "reasoning_tokens": reasoning,
        "feature": dims.get("x-tollgate-feature"),
        "workflow": dims.get("x-tollgate-workflow"),
        "end_user": dims.get("x-tollgate-end-user"),
    }
    if estimate is not None:
        e["estimate"] = estimate
    return e


SYSTEM = "be brief"
USER = "hello there general kenobi"
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
CHAT_P = words(SYSTEM, USER)  # 6


def check_chat_usage(usage, p, n, cached=0, reasoning=0):
    check("usage.prompt_tokens", usage.prompt_tokens, p)
    check("usage.completion_tokens", usage.completion_tokens, n)
    check("usage.total_tokens", usage.total_tokens, p + n)
    check("usage.prompt_tokens_details.cached_tokens",
          usage.prompt_tokens_details.cached_tokens, cached)
    check("usage.completion_tokens_details.reasoning_tokens",
          usage.completion_tokens_details.reasoning_tokens, reasoning)


def check_unmodified_chunks(chunks):
    """What a client that did not ask for usage must see: no usage chunk (empty `choices`)
    and no usage anywhere, though tollgate asked the upstream for it."""
    if not chunks:
        raise Mismatch("stream delivered no chunks")
    for i, c in enumerate(chunks):
        if not c.choices:
            raise Mismatch(f"chunk {i} has empty choices (leaked usage chunk): {c.to_json()}")
        if c.usage is not None:
            raise Mismatch(f"chunk {i} carries usage the client never asked for: {c.to_json()}")


# --------------------------------------------------------------------------- the calls


def chat_completion(oa):
    dims = {"x-tollgate-feature": "search", "x-tollgate-workflow": "triage",
            "x-tollgate-end-user": "user-42"}
    model, n = "gpt-4o-cached-reasoning", 8
    raw = oa.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=n, extra_headers=dims)
    rid = record_id(raw.headers)
    r = raw.parse()
    check("message.content", r.choices[0].message.content, mock_text(n))
    check("finish_reason", r.choices[0].finish_reason, "length")
    c, reas = CHAT_P // 2, n // 2
    check_chat_usage(r.usage, CHAT_P, n, c, reas)
    return rid, expect("chat_completions", model, False, CHAT_P, n, c, reas, dims=dims)


def chat_completion_stream(oa):
    dims = {"x-tollgate-feature": "chat-stream"}
    model, n = "gpt-4o-mini", 7
    stream = oa.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=n, stream=True, extra_headers=dims)
    rid = record_id(stream.response.headers)
    with stream:
        chunks = list(stream)
    check_unmodified_chunks(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    check("streamed text", text, mock_text(n))
    check("last finish_reason", chunks[-1].choices[0].finish_reason, "length")
    return rid, expect("chat_completions", model, True, CHAT_P, n, dims=dims)


def chat_completion_stream_with_usage(oa):
    dims = {"x-tollgate-workflow": "usage-aware", "x-tollgate-end-user": "user-7"}
    model, n = "gpt-4o-cached", 5
    stream = oa.chat.completions.create(
        model=model, messages=CHAT, max_tokens=n, stream=True,
        stream_options={"include_usage": True}, extra_headers=dims)
    rid = record_id(stream.response.headers)
    with stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check("streamed text", text, mock_text(n))
    with_usage = [c for c in chunks if c.usage is not None]
    check("chunks carrying usage", len(with_usage), 1)
    check("the usage chunk is the last", with_usage[0] is chunks[-1], True)
    check("usage chunk choices", chunks[-1].choices, [])
    c = CHAT_P // 2
    check_chat_usage(with_usage[0].usage, CHAT_P, n, c)
    return rid, expect("chat_completions", model, True, CHAT_P, n, c, dims=dims)


def completion(oa):
    dims = {"x-tollgate-feature": "legacy"}
    model, prompt, n = "gpt-3.5-turbo-instruct", "one two three", 4
    raw = oa.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=n, extra_headers=dims)
    rid = record_id(raw.headers)
    r = raw.parse()
    check("choices[0].text", r.choices[0].text, mock_text(n))
    p = words(prompt)
    check("usage.prompt_tokens", r.usage.prompt_tokens, p)
    check("usage.completion_tokens", r.usage.completion_tokens, n)
    check("usage.total_tokens", r.usage.total_tokens, p + n)
    return rid, expect("completions", model, False, p, n, dims=dims)


def completion_stream(oa):
    model, prompt, n = "gpt-3.5-turbo-instruct", "alpha beta gamma delta epsilon", 6
    stream = oa.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True)
    rid = record_id(stream.response.headers)
    with stream:
        chunks = list(stream)
    check_unmodified_chunks(chunks)
    check("streamed text", "".join(c.choices[0].text for c in chunks), mock_text(n))
    return rid, expect("completions", model, True, words(prompt), n)


def embeddings(oa):
    dims = {"x-tollgate-feature": "embed"}
    model, inputs = "text-embedding-3-small", ["a b", "c d e"]
    # The SDK asks for base64 by default and decodes it.
    raw = oa.embeddings.with_raw_response.create(model=model, input=inputs, extra_headers=dims)
    rid = record_id(raw.headers)
    r = raw.parse()
    check("len(data)", len(r.data), len(inputs))
    check("embedding is a float list",
          all(isinstance(x, float) for x in r.data[1].embedding) and len(r.data[1].embedding) > 0,
          True)
    p = words(*inputs)
    check("usage.prompt_tokens", r.usage.prompt_tokens, p)
    check("usage.total_tokens", r.usage.total_tokens, p)
    return rid, expect("embeddings", model, False, p, 0, dims=dims)


def response(oa):
    dims = {"x-tollgate-feature": "agent", "x-tollgate-workflow": "plan"}
    model, text, n = "gpt-4.1-cached-reasoning", "four words of input", 10
    raw = oa.responses.with_raw_response.create(
        model=model, input=text, max_output_tokens=n, extra_headers=dims)
    rid = record_id(raw.headers)
    r = raw.parse()
    check("output_text", r.output_text, mock_text(n))
    p, c, reas = words(text), words(text) // 2, n // 2
    check("usage.input_tokens", r.usage.input_tokens, p)
    check("usage.output_tokens", r.usage.output_tokens, n)
    check("usage.total_tokens", r.usage.total_tokens, p + n)
    check("usage.input_tokens_details.cached_tokens", r.usage.input_tokens_details.cached_tokens, c)
    check("usage.output_tokens_details.reasoning_tokens",
          r.usage.output_tokens_details.reasoning_tokens, reas)
    return rid, expect("responses", model, False, p, n, c, reas, dims=dims)


def response_stream(oa):
    dims = {"x-tollgate-feature": "agent", "x-tollgate-end-user": "user-9"}
    model, text, n = "gpt-4.1", "two words", 6
    stream = oa.responses.create(
        model=model, input=[{"role": "user", "content": [{"type": "input_text", "text": text}]}],
        max_output_tokens=n, stream=True, extra_headers=dims)
    rid = record_id(stream.response.headers)
    with stream:
        events = list(stream)
    types = [e.type for e in events]
    check("first event", types[0], "response.created")
    check("last event", types[-1], "response.completed")
    check("sequence numbers", [e.sequence_number for e in events], list(range(len(events))))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    check("streamed text", deltas, mock_text(n))
    final = events[-1].response
    check("completed output_text", final.output_text, mock_text(n))
    p = words(text)
    check("completed usage.input_tokens", final.usage.input_tokens, p)
    check("completed usage.output_tokens", final.usage.output_tokens, n)
    return rid, expect("responses", model, True, p, n, dims=dims)


def message(an):
    dims = {"x-tollgate-feature": "support", "x-tollgate-end-user": "user-42"}
    model, n = "claude-sonnet-4-cached", 6
    raw = an.messages.with_raw_response.create(
        model=model, max_tokens=n, system=SYSTEM,
        messages=[{"role": "user", "content": [{"type": "text", "text": USER}]}],
        extra_headers=dims)
    rid = record_id(raw.headers)
    m = raw.parse()
    check("content[0].text", m.content[0].text, mock_text(n))
    check("stop_reason", m.stop_reason, "max_tokens")
    p, c = CHAT_P, CHAT_P // 2
    # Anthropic reports the uncached part as input_tokens; tollgate records the whole prompt.
    check("usage.input_tokens", m.usage.input_tokens, p - c)
    check("usage.cache_read_input_tokens", m.usage.cache_read_input_tokens, c)
    check("usage.cache_creation_input_tokens", m.usage.cache_creation_input_tokens, 0)
    check("usage.output_tokens", m.usage.output_tokens, n)
    return rid, expect("messages", model, False, p, n, c, dims=dims)


def message_stream(an):
    dims = {"x-tollgate-feature": "support", "x-tollgate-workflow": "escalate"}
    model, n = "claude-haiku-4", 9
    with an.messages.stream(model=model, max_tokens=n,
                            messages=[{"role": "user", "content": USER}],
                            extra_headers=dims) as s:
        rid = record_id(s.response.headers)
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check("text_stream", text, mock_text(n))
    check("final content[0].text", final.content[0].text, mock_text(n))
    check("final stop_reason", final.stop_reason, "max_tokens")
    p = words(USER)
    check("final usage.input_tokens", final.usage.input_tokens, p)
    check("final usage.output_tokens", final.usage.output_tokens, n)
    check("final usage.cache_read_input_tokens", final.usage.cache_read_input_tokens or 0, 0)
    return rid, expect("messages", model, True, p, n, dims=dims)


def no_usage_stream(oa):
    dims = {"x-tollgate-feature": "unmetered-upstream"}
    model, prompt, n = "gpt-4o-no-usage", "count these words for me please", 12
    stream = oa.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n, stream=True,
        extra_headers=dims)
    rid = record_id(stream.response.headers)
    with stream:
        chunks = list(stream)
    check_unmodified_chunks(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    check("streamed text", text, mock_text(n))
    # The upstream reported nothing: tollgate counts with its tokenizer. The Rust side
    # recomputes those counts from what was sent and what was generated.
    return rid, expect("chat_completions", model, True, None, None, estimated=True, dims=dims,
                       estimate={"prompt_messages": [prompt], "output_words": n})


OPENAI_CALLS = [chat_completion, chat_completion_stream, chat_completion_stream_with_usage,
                completion, completion_stream, embeddings, response, response_stream,
                no_usage_stream]
ANTHROPIC_CALLS = [message, message_stream]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--openai-base", required=True, help="tollgate's OpenAI base URL (…/v1)")
    ap.add_argument("--anthropic-base", required=True, help="tollgate's Anthropic base URL")
    ap.add_argument("--key", required=True, help="a tollgate client key")
    args = ap.parse_args()

    # No retries: every request must map to exactly one journal record.
    oa = openai.OpenAI(api_key=args.key, base_url=args.openai_base, max_retries=0, timeout=30)
    an = anthropic.Anthropic(api_key=args.key, base_url=args.anthropic_base, max_retries=0,
                             timeout=30)

    results, failures = [], []
    for client, calls in ((oa, OPENAI_CALLS), (an, ANTHROPIC_CALLS)):
        for call in calls:
            try:
                rid, exp = call(client)
                results.append({"call": call.__name__, "record_id": rid, "expect": exp})
            except Mismatch as e:
                failures.append(f"{call.__name__}: {e}")
            except (openai.APIError, anthropic.APIError) as e:
                failures.append(f"{call.__name__}: {type(e).__name__}: {e}")
            except Exception as e:  # the SDK could not use tollgate's reply
                tb = traceback.format_exc().rstrip().replace("\n", "\n      ")
                failures.append(f"{call.__name__}: {type(e).__name__}: {e}\n      {tb}")
    if failures:
        print(f"sdk_clients.py: {len(failures)} of {len(results) + len(failures)} calls failed "
              f"(openai {openai.__version__}, anthropic {anthropic.__version__}):",
              file=sys.stderr)
        for f in failures:
            print(f"  FAIL {f}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
