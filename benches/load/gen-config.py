#!/usr/bin/env python3
"""Writes the tollgate config for benches/load.sh: one OpenAI-dialect upstream (the mock),
NKEYS client keys `tg-bench-<i>` stored as SHA-256, journal at JOURNAL.

usage: gen-config.py OUT MOCK_ADDR JOURNAL NKEYS [dir|path]

The last argument names the `[journal]` key: `dir` (a segment directory, the default) or
`path` (a JSON-lines file, builds before the segment journal).
"""
import hashlib
import os
import sys

out, mock, journal, nkeys = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
journal_key = sys.argv[5] if len(sys.argv) > 5 else "dir"
with open(out, "w") as f:
    f.write(f'''[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 1000

[journal]
{journal_key} = "{journal}"
{os.environ.get("JOURNAL_EXTRA", "")}

[[upstreams]]
name = "mock-openai"
dialect = "openai"
base_url = "http://{mock}"
api_key_env = "BENCH_UPSTREAM_KEY"
timeout_ms = 30000
default = true
''')
    # Full metering: every request is priced, and its account has a hard cap, so admission
    # reserves and settlement settles (caps far above what a bench run spends).
    if journal_key == "dir":
        f.write('''
[[prices]]
model_prefix = "gpt-"
input_per_mtok = "2.50"
cached_input_per_mtok = "1.25"
output_per_mtok = "10.00"
''')
        for a in range(100):
            f.write(f'\n[[accounts]]\nid = "bench-acct-{a}"\nhard_cap = "1000000"\n')
    for i in range(nkeys):
        h = hashlib.sha256(f"tg-bench-{i}".encode()).hexdigest()
        f.write(f'\n[[keys]]\nid = "bench-{i}"\nsha256 = "{h}"\naccount = "bench-acct-{i % 100}"\n')
