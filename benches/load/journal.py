#!/usr/bin/env python3
"""Reads tollgate's journal for benches/load.sh, from a cursor on.

usage: journal.py JOURNAL CURSOR MAX_TOKENS

JOURNAL is either a JSON-lines file (`[journal] path`) or a segment directory
(`[journal] dir`: `*.seg` files, 8-byte magic `TGJRNL01`, then frames of u32 LE payload
length, u32 LE CRC32C, u64 LE sequence number, JSON payload). CURSOR is "" (the start) or
what a previous call printed. Prints one JSON object: the new cursor (after the last complete
entry), the number of entries written since CURSOR ("entries"; for a segment directory from
the sequence numbers, since tollgate deletes checkpointed segments), how many of them were
still there to read ("read"), their outcomes, how many completed ones have a
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
    """Frames after CURSOR ("<segment>:<offset>:<seq>"). tollgate deletes segments once a
    checkpoint covers them, so the count comes from sequence numbers (strictly increasing),
    and only the entries still on disk are read for their outcomes."""
    segs = sorted(n for n in os.listdir(path) if n.endswith(".seg"))
    seg0, off0, seq0 = cursor.split(":") if cursor else ("", "0", "0")
    off0, seq0 = int(off0), int(seq0)
    last = (seg0, off0, seq0)
    for name in segs:
        if name < seg0:
            continue
        try:
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue  # checkpointed and deleted since the listing
        if data[: len(MAGIC)] != MAGIC:
            continue
        pos = max(off0 if name == seg0 else 0, len(MAGIC))
        while pos + 16 <= len(data):
            length, _crc, seq = struct.unpack_from("<IIQ", data, pos)
            if pos + 16 + length > len(data):
                break  # being written
            if seq > seq0:
                yield json.loads(data[pos + 16 : pos + 16 + length])
                last = (name, pos + 16 + length, seq)
            pos += 16 + length
    yield ("written", last[2] - seq0)
    yield ("cursor", ":".join(str(x) for x in last) if last[0] else "")


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
            out[e[0]] = e[1]
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
    # entries: written since the cursor (all entry types); read: those still on disk.
    out.update(entries=out.pop("written", n), read=n, outcomes=dict(outcomes),
               completed_wrong_tokens=wrong, distinct_keys=len(keys))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
