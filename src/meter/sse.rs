//! Incremental Server-Sent Events framing over response chunks, as the WHATWG spec defines it:
//! lines end in CRLF, LF or CR; a blank line ends a block; `:` starts a comment; `data` lines
//! join with `\n`. Chunk boundaries may fall anywhere (inside a line, between CR and LF).
//!
//! The parser hands each finished block to a callback with its `event` name, its joined `data`
//! and, when asked for, the block's raw bytes, so the metering body can drop one block (the
//! usage-only chunk tollgate asked for) and forward the rest byte for byte.

use memchr::memchr2;

/// One block of an event stream, ended by a blank line.
#[derive(Debug, Clone, Copy)]
pub struct SseBlock<'a> {
    /// The `event:` field; empty when absent (the spec's default type is `message`).
    pub event: &'a str,
    /// The joined `data:` lines, or `None` when the block had no data line (a comment, `retry:`
    /// or `id:` alone); the spec dispatches no event for those.
    pub data: Option<&'a [u8]>,
    /// The block's bytes as received, terminators included (empty unless `keep_raw`).
    pub raw: &'a [u8],
}

/// Incremental parser; feed it chunks in order.
#[derive(Debug, Default)]
pub struct SseParser {
    keep_raw: bool,
    /// The current incomplete line.
    line: Vec<u8>,
    /// The previous chunk ended with CR: a LF starting the next chunk belongs to it.
    after_cr: bool,
    event: String,
    data: Vec<u8>,
    has_data: bool,
    raw: Vec<u8>,
}

impl SseParser {
    pub fn new(keep_raw: bool) -> Self {
        Self {
            keep_raw,
            ..Self::default()
        }
    }

    /// Parses one chunk, calling `on_block` for every block it completes.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_block: impl FnMut(SseBlock<'_>)) {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                if self.keep_raw {
                    self.raw.push(b'\n');
                }
                chunk = rest;
            }
        }
        while !chunk.is_empty() {
            let Some(end) = memchr2(b'\n', b'\r', chunk) else {
                self.line.extend_from_slice(chunk);
                if self.keep_raw {
                    self.raw.extend_from_slice(chunk);
                }
                return;
            };
            let mut next = end + 1;
            if chunk[end] == b'\r' {
                if next == chunk.len() {
                    self.after_cr = true;
                } else if chunk[next] == b'\n' {
                    next += 1;
                }
            }
            if self.keep_raw {
                self.raw.extend_from_slice(&chunk[..next]);
            }
            if self.line.is_empty() {
                self.process_line(&chunk[..end], &mut on_block);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[..end]);
                self.process_line(&line, &mut on_block);
                line.clear();
                self.line = line;
            }
            chunk = &chunk[next..];
        }
    }

    /// Bytes of an unfinished block held at the end of the stream (only with `keep_raw`). The
    /// spec discards an unterminated block; a filtering body forwards these bytes unchanged so
    /// the client sees exactly what the upstream sent.
    pub fn take_unfinished_raw(&mut self) -> Vec<u8> {
        self.line.clear();
        self.event.clear();
        self.data.clear();
        self.has_data = false;
        std::mem::take(&mut self.raw)
    }

    fn process_line(&mut self, line: &[u8], on_block: &mut impl FnMut(SseBlock<'_>)) {
        if line.is_empty() {
            let data = if self.has_data {
                if self.data.last() == Some(&b'\n') {
                    self.data.pop();
                }
                Some(self.data.as_slice())
            } else {
                None
            };
            on_block(SseBlock {
                event: &self.event,
                data,
                raw: &self.raw,
            });
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            self.raw.clear();
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.push_str(&String::from_utf8_lossy(value));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Clone)]
    struct Owned {
        event: String,
        data: Option<Vec<u8>>,
        raw: Vec<u8>,
    }

    fn parse_chunks(chunks: &[&[u8]]) -> (Vec<Owned>, Vec<u8>) {
        let mut p = SseParser::new(true);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |b| {
                out.push(Owned {
                    event: b.event.to_string(),
                    data: b.data.map(<[u8]>::to_vec),
                    raw: b.raw.to_vec(),
                })
            });
        }
        let rest = p.take_unfinished_raw();
        (out, rest)
    }

    #[test]
    fn frames_events_comments_and_done() {
        let s = b": keep-alive\n\nevent: message_start\ndata: {\"a\":1}\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let (blocks, rest) = parse_chunks(&[s]);
        assert!(rest.is_empty());
        let events: Vec<_> = blocks.iter().filter(|b| b.data.is_some()).collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].event, "message_start");
        assert_eq!(events[0].data.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(events[1].data.as_deref(), Some(&b"x\ny"[..]));
        assert_eq!(events[2].data.as_deref(), Some(&b"[DONE]"[..]));
        assert_eq!(
            blocks[0].data, None,
            "comment-only block dispatches no data"
        );
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let (a, _) = parse_chunks(&[b"data: 1\r\n\r\ndata: 2\r\rdata:3\n\n"]);
        let data: Vec<_> = a.iter().filter_map(|b| b.data.clone()).collect();
        assert_eq!(data, vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
    }

    #[test]
    fn cr_lf_split_across_chunks_is_one_terminator() {
        let (a, _) = parse_chunks(&[b"data: 1\r", b"\n\r", b"\ndata: 2\n\n"]);
        let data: Vec<_> = a.iter().filter_map(|b| b.data.clone()).collect();
        assert_eq!(data, vec![b"1".to_vec(), b"2".to_vec()]);
    }

    #[test]
    fn unterminated_tail_is_returned_raw() {
        let (a, rest) = parse_chunks(&[b"data: 1\n\ndata: par"]);
        assert_eq!(a.len(), 1);
        assert_eq!(rest, b"data: par");
    }

    fn stream_strategy() -> impl Strategy<Value = Vec<u8>> {
        let line_end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        let line = prop_oneof![
            "[a-z{}\":, ]{0,20}".prop_map(|s| format!("data: {s}")),
            "[a-z_]{1,10}".prop_map(|s| format!("event: {s}")),
            "[a-z ]{0,10}".prop_map(|s| format!(":{s}")),
            Just("data".to_string()),
            Just("id: 7".to_string()),
            Just(String::new()),
        ];
        proptest::collection::vec((line, line_end), 0..40).prop_map(|lines| {
            let mut s = String::new();
            for (l, e) in lines {
                s.push_str(&l);
                s.push_str(e);
            }
            s.into_bytes()
        })
    }

    proptest! {
        #[test]
        fn chunk_boundaries_do_not_change_events(
            stream in stream_strategy(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            // A CR at the very end followed by nothing is ambiguous only at end of stream; the
            // whole-stream parse sees the same bytes, so results must still agree.
            let (whole, whole_rest) = parse_chunks(&[&stream]);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            points.dedup();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for p in points {
                chunks.push(&stream[start..p]);
                start = p;
            }
            chunks.push(&stream[start..]);
            let (split, split_rest) = parse_chunks(&chunks);
            // Events are identical; only which block a CR-LF's LF is attributed to in `raw` may
            // differ when the pair is split across chunks.
            let strip = |v: &[Owned]| v.iter().map(|b| (b.event.clone(), b.data.clone())).collect::<Vec<_>>();
            prop_assert_eq!(strip(&whole), strip(&split));
            let _ = whole_rest;
            // Raw blocks plus the unfinished tail reproduce the input byte for byte.
            let mut rebuilt: Vec<u8> = split.iter().flat_map(|b| b.raw.clone()).collect();
            rebuilt.extend_from_slice(&split_rest);
            prop_assert_eq!(rebuilt, stream);
        }
    }
}
