//! Finding one member of a JSON object without parsing the rest: a non-streaming response is
//! mostly generated text, and its usage is one small object among many members. Strings are
//! skipped with `memchr`, nested values by bracket depth; only the member asked for is handed
//! to serde.

/// The raw bytes of the value of `key` at the top level of the JSON object `body`.
///
/// `None` when `body` is not an object whose members can be delimited (the value itself is
/// not validated: the caller parses it), when `key` is missing, or when it appears more than
/// once (serde refuses duplicate fields too). Keys are compared as written, so a key spelt
/// with escapes does not match.
pub fn top_level_member<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(body, i + 1);
    let mut found = None;
    if body.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if body.get(i) != Some(&b'"') {
                return None;
            }
            let name_end = skip_string(body, i)?;
            let name = &body[i + 1..name_end - 1];
            i = skip_ws(body, name_end);
            if body.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(body, i + 1);
            let value_end = skip_value(body, i)?;
            if name == key {
                if found.is_some() {
                    return None;
                }
                found = Some(&body[i..value_end]);
            }
            i = skip_ws(body, value_end);
            match body.get(i) {
                Some(b',') => i = skip_ws(body, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    if skip_ws(body, i) != body.len() {
        return None;
    }
    found
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\n' | b'\r' | b'\t') {
        i += 1;
    }
    i
}

/// `b[start]` is `"`; returns the index after the closing quote.
fn skip_string(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

/// Returns the index after the value starting at `b[start]`.
fn skip_value(b: &[u8], start: usize) -> Option<usize> {
    match *b.get(start)? {
        b'"' => skip_string(b, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            while i < b.len() {
                match b[i] {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let end = b[start..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t'))
                .map_or(b.len(), |n| start + n);
            (end > start).then_some(end)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_the_member_among_nested_values_and_tricky_strings() {
        let body = br#" { "choices": [{"message": {"content": "a \"usage\": {} } ] \\"}}],
            "usage" : {"prompt_tokens": 3, "x": [1, {"y": "}"}]} , "z": null } "#;
        assert_eq!(
            top_level_member(body, b"usage"),
            Some(&br#"{"prompt_tokens": 3, "x": [1, {"y": "}"}]}"#[..])
        );
        assert_eq!(top_level_member(body, b"z"), Some(&b"null"[..]));
        assert_eq!(top_level_member(body, b"content"), None, "not top level");
        assert_eq!(top_level_member(br#"{}"#, b"usage"), None);
    }

    #[test]
    fn malformed_or_ambiguous_bodies_give_nothing() {
        for body in [
            &br#"{"usage": {"a": 1}"#[..],
            br#"{"usage": {"a": 1}} trailing"#,
            br#"{"usage": {"a": 1}, "usage": {"a": 2}}"#,
            br#"{"usage" {"a": 1}}"#,
            br#"{"usage": "unterminated}"#,
            br#"{"usage": }"#,
            br#"["usage", {}]"#,
            b"",
            br#"{"a": "\"#,
        ] {
            assert_eq!(
                top_level_member(body, b"usage"),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[ -~\\n\"\\\\{}\\[\\]é]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z\"{}]{0,6}|usage", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// On any object serde_json writes (compact or pretty), the member found is the one
        /// serde_json sees.
        #[test]
        fn agrees_with_serde_json(
            members in proptest::collection::btree_map("[a-z\"{}]{0,6}|usage", json(), 0..8),
            pretty in any::<bool>(),
        ) {
            let object = serde_json::Value::Object(members.into_iter().collect());
            let body = if pretty {
                serde_json::to_vec_pretty(&object).unwrap()
            } else {
                serde_json::to_vec(&object).unwrap()
            };
            let found = top_level_member(&body, b"usage")
                .map(|raw| serde_json::from_slice::<serde_json::Value>(raw).unwrap());
            prop_assert_eq!(found.as_ref(), object.get("usage"));
        }
    }
}
