#!/usr/bin/env python3
"""Reads tollgate's journal for benches/load.sh, from a cursor on.

usage: journal.py JOURNAL CURSOR MAX_TOKENS

JOURNAL is either a JSON-lines file (`[journal] path`) or a segment directory
(`[journal] dir`: `*.seg` files, 8-byte magic `TGJRNL01`, then frames of u32 LE payload
length, u32 LE CRC32C, u64 LE sequence number, JSON payload). CURSOR is "" (the start) or
what a previous call printed. Prints one JSON object: the new cursor (after the last complete
entry), the number of usage entries read, their outcomes, how many completed ones have a
status other than 200 or an output token count other than MAX_TOKENS, and distinct key ids.
"""
import collections
import json
import os
import struct
import sys

MAGIC = b"TGJRNL01"


def entries_jsonl(path, cursor):
    offset = int(cursor or 0)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        if line.strip():
            yield json.loads(line)
    yield ("cursor", str(offset + end))


def entries_segments(path, cursor):
    segs = sorted(n for n in os.listdir(path) if n.endswith(".seg"))
    start_seg, start_off = (cursor.split(":") if cursor else ("", "0"))
    last = (start_seg, int(start_off))
    for name in segs:
        if name < start_seg:
            continue
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        if data[: len(MAGIC)] != MAGIC:
            continue
        pos = int(start_off) if name == start_seg else len(MAGIC)
        pos = max(pos, len(MAGIC))
        while pos + 16 <= len(data):
            length, _crc, _seq = struct.unpack_from("<IIQ", data, pos)
            if pos + 16 + length > len(data):
                break  # being written
            yield json.loads(data[pos + 16 : pos + 16 + length])
            pos += 16 + length
        last = (name, pos)
    yield ("cursor", f"{last[0]}:{last[1]}" if last[0] else "")


def main():
    path, cursor, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = {"cursor": cursor, "entries": 0, "outcomes": {}, "completed_wrong_tokens": 0,
           "distinct_keys": 0}
    if not os.path.exists(path):
        print(json.dumps(out))
        return
    reader = entries_segments if os.path.isdir(path) else entries_jsonl
    outcomes, keys, wrong, n = collections.Counter(), set(), 0, 0
    for e in reader(path, cursor):
        if isinstance(e, tuple):
            out["cursor"] = e[1]
            continue
        if e.get("type", "usage") != "usage":
            continue
        n += 1
        outcomes[e.get("outcome")] += 1
        keys.add(e.get("key_id"))
        if e.get("outcome") == "completed" and (
            e.get("status") != 200 or e.get("output_tokens") != want
        ):
            wrong += 1
    out.update(entries=n, outcomes=dict(outcomes), completed_wrong_tokens=wrong,
               distinct_keys=len(keys))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
