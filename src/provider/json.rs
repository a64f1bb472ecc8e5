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
    let mut found = None;
    let mut duplicate = false;
    for_each_member(body, |name, value| {
        if name == key {
            duplicate |= found.is_some();
            found = Some(value);
        }
    })?;
    if duplicate { None } else { found }
}

/// Calls `f(name, raw value)` for each member of the JSON object `body`, in order (names as
/// written, without their quotes). `None` when `body` is not an object whose members can be
/// delimited; values are delimited, not validated.
pub fn for_each_member<'a>(body: &'a [u8], mut f: impl FnMut(&'a [u8], &'a [u8])) -> Option<()> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(body, i + 1);
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
            f(name, &body[i..value_end]);
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
    (skip_ws(body, i) == body.len()).then_some(())
}

/// A raw value read as serde reads an `Option<u64>`: `Some(None)` for `null`, `Some(n)` for
/// a non-negative integer that fits, `None` (an error) for anything else.
pub fn optional_count(value: &[u8]) -> Option<Option<u64>> {
    if value == b"null" {
        return Some(None);
    }
    // JSON integers: no sign, no leading zero, no fraction or exponent. Accumulated digit by
    // digit (every usage count goes through here), `None` past u64.
    if value.is_empty() || (value.len() > 1 && value[0] == b'0') {
        return None;
    }
    value
        .iter()
        .try_fold(0u64, |n, &c| {
            let digit = c.checked_sub(b'0').filter(|d| *d <= 9)?;
            n.checked_mul(10)?.checked_add(u64::from(digit))
        })
        .map(Some)
}

/// Reads the JSON object `body` as a serde-derived struct with the fields `fields` would:
/// `read(index, raw value)` takes each member named in `fields` and returns whether its value
/// is acceptable; other members are skipped. `None` (an error) when `body` is not an object,
/// a value is refused, or a field appears twice. Names are compared as written (a field name
/// spelt with escapes counts as unknown). At most 64 fields.
pub fn read_fields<'a>(
    body: &'a [u8],
    fields: &[&[u8]],
    mut read: impl FnMut(usize, &'a [u8]) -> bool,
) -> Option<()> {
    let mut seen = 0u64;
    let mut ok = true;
    for_each_member(body, |name, value| {
        if let Some(i) = fields.iter().position(|f| *f == name)
            && ok
        {
            ok = seen & (1 << i) == 0 && read(i, value);
            seen |= 1 << i;
        }
    })?;
    ok.then_some(())
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
pub(crate) mod tests {
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
            "[ -~\\n\"\\\\{}\\[\\]é]{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z\"{}]{0,6}|usage", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// JSON text of objects like a provider's `usage`: members named from `names` (repeats
    /// possible) with counts, nulls, values of the wrong type or shape, and nested objects
    /// of the same kind; spacing varies.
    pub(crate) fn usage_like(names: &'static [&'static str]) -> impl Strategy<Value = String> {
        let scalar = prop_oneof![
            4 => any::<u64>().prop_map(|n| n.to_string()),
            2 => (0u64..100).prop_map(|n| n.to_string()),
            1 => Just("null".to_string()),
            1 => Just("-3".to_string()),
            1 => Just("1.5".to_string()),
            1 => Just("2e3".to_string()),
            1 => Just("18446744073709551616".to_string()),
            1 => Just("true".to_string()),
            1 => Just("\"7\"".to_string()),
            1 => Just("[1, {\"a\": \"}\"}]".to_string()),
        ];
        let value = scalar.prop_recursive(2, 16, 6, move |inner| {
            proptest::collection::vec((proptest::sample::select(names), inner), 0..6)
                .prop_map(|members| object(&members, " "))
        });
        (
            proptest::collection::vec((proptest::sample::select(names), value), 0..9),
            prop_oneof![Just(""), Just(" "), Just("\n  ")],
        )
            .prop_map(|(members, space)| object(&members, space))
    }

    fn object(members: &[(&str, String)], space: &str) -> String {
        let inner: Vec<String> = members
            .iter()
            .map(|(name, value)| format!("{space}\"{name}\"{space}:{space}{value}"))
            .collect();
        format!("{{{}{space}}}", inner.join(","))
    }

    #[test]
    fn counts_are_read_as_serde_reads_option_u64() {
        for (raw, expected) in [
            ("0", Some(Some(0))),
            ("42", Some(Some(42))),
            ("18446744073709551615", Some(Some(u64::MAX))),
            ("null", Some(None)),
            ("18446744073709551616", None),
            ("012", None),
            ("-1", None),
            ("1.0", None),
            ("1e2", None),
            ("\"1\"", None),
            ("", None),
        ] {
            assert_eq!(optional_count(raw.as_bytes()), expected, "{raw}");
            let serde = serde_json::from_str::<Option<u64>>(raw).ok();
            assert_eq!(serde, expected, "serde on {raw}");
        }
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
