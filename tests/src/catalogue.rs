//! The event catalogue, `docs/asyncapi.yaml`, held against what is really on the wire: each
//! message on a subject must validate against the payload schema of that subject's channel.
//!
//! The validator covers the JSON-schema subset the document uses (`$ref`, `allOf`, `oneOf`,
//! `anyOf`, `type`, `const`, `enum`, `required`, `properties`, `additionalProperties`, `items`,
//! `minItems`, `maxItems`, `minimum`, `maximum`, `minLength`, `maxLength`, `pattern`, `format`).
//! Any other validation keyword is reported as an error rather than skipped, so the document
//! cannot outgrow the check unnoticed.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::System;

/// The streams whose messages are checked: the three event streams and the commands.
pub const STREAMS: [&str; 4] = ["ORDERS", "INVENTORY", "PAYMENTS", "ORDER_COMMANDS"];

/// Validation keywords this validator applies.
const KEYWORDS: &[&str] = &[
    "$ref",
    "allOf",
    "oneOf",
    "anyOf",
    "type",
    "const",
    "enum",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
];

/// Values of `format` this validator checks.
const FORMATS: &[&str] = &["date-time", "uuid", "int64"];

/// Keywords that only describe; they never reject.
const ANNOTATIONS: &[&str] = &[
    "description",
    "title",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
];

/// `docs/asyncapi.yaml`, parsed.
#[derive(Debug, Clone)]
pub struct Catalogue {
    doc: Value,
}

impl Catalogue {
    /// Read the repository's `docs/asyncapi.yaml`.
    pub fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/asyncapi.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Self::from_yaml(&text)
    }

    /// Parse an AsyncAPI document.
    pub fn from_yaml(text: &str) -> Self {
        Self {
            doc: serde_yaml::from_str(text).expect("the catalogue is valid YAML"),
        }
    }

    /// Follow `value`'s `$ref`s (local ones, `#/a/b`) to what they point at.
    fn deref<'a>(&'a self, mut value: &'a Value) -> Result<&'a Value, String> {
        for _ in 0..32 {
            let Some(target) = value.get("$ref").and_then(Value::as_str) else {
                return Ok(value);
            };
            value = target
                .strip_prefix('#')
                .and_then(|p| self.doc.pointer(p))
                .ok_or_else(|| format!("unresolvable $ref {target:?}"))?;
        }
        Err("$ref chain too long".into())
    }

    /// The message objects of the channel at `subject`.
    fn messages(&self, subject: &str) -> Result<Vec<&Value>, String> {
        let channels = self.doc["channels"].as_object().ok_or("no channels")?;
        let channel = channels
            .values()
            .find(|c| c["address"].as_str() == Some(subject))
            .ok_or_else(|| format!("no channel at subject {subject:?}"))?;
        let messages = channel["messages"]
            .as_object()
            .ok_or_else(|| format!("channel {subject} has no messages"))?;
        messages.values().map(|m| self.deref(m)).collect()
    }

    /// The schema of `data` inside a message payload (the envelope's `allOf` branch naming it).
    fn data_schema<'a>(&'a self, payload: &'a Value) -> Result<&'a Value, String> {
        let payload = self.deref(payload)?;
        if let Some(data) = payload.get("properties").and_then(|p| p.get("data")) {
            if data.get("$ref").is_some() || data.get("type").is_some() {
                return Ok(data);
            }
        }
        let branches = ["allOf", "oneOf", "anyOf"]
            .iter()
            .flat_map(|k| payload[*k].as_array().into_iter().flatten());
        for branch in branches {
            if let Ok(found) = self.data_schema(branch) {
                return Ok(found);
            }
        }
        Err("the payload schema describes no data".into())
    }

    /// Check one message as published on `subject`. A structured CloudEvent (it has
    /// `specversion`) must match the channel's payload schema and its headers the message's
    /// traits; a bare JSON body, as people publish by hand, must match the schema of `data`.
    pub fn check(
        &self,
        subject: &str,
        headers: &BTreeMap<String, String>,
        body: &[u8],
    ) -> Result<(), Vec<String>> {
        let messages = self.messages(subject).map_err(|e| vec![e])?;
        let value: Value =
            serde_json::from_slice(body).map_err(|e| vec![format!("body is not JSON: {e}")])?;
        let structured = value.get("specversion").is_some();
        // A channel with several messages accepts any one of them.
        let mut failures = Vec::new();
        for message in messages {
            let mut errors = Vec::new();
            if structured {
                errors.extend(self.validate(&message["payload"], &value));
                let headers = Value::Object(
                    headers
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect(),
                );
                for t in message["traits"].as_array().into_iter().flatten() {
                    match self.deref(t) {
                        Ok(t) if t.get("headers").is_some() => {
                            errors.extend(
                                self.validate(&t["headers"], &headers)
                                    .into_iter()
                                    .map(|e| format!("headers: {e}")),
                            );
                        }
                        Ok(_) => {}
                        Err(e) => errors.push(e),
                    }
                }
            } else if !self.validate(&message["payload"], &value).is_empty() {
                // Commands describe their bare form in the payload; events only as `data`.
                match self.data_schema(&message["payload"]) {
                    Ok(schema) => errors.extend(self.validate(schema, &value)),
                    Err(e) => errors.push(e),
                }
            }
            if errors.is_empty() {
                return Ok(());
            }
            failures.extend(errors);
        }
        Err(failures)
    }

    /// Validate `value` against `schema`; one line per problem, each with its JSON pointer.
    pub fn validate(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.walk(schema, value, "", &mut errors);
        errors
    }

    fn walk<'a>(&'a self, schema: &'a Value, value: &'a Value, at: &str, errors: &mut Vec<String>) {
        let here = if at.is_empty() { "/" } else { at };
        let mut fail = |m: String| errors.push(format!("{here}: {m}"));
        let Some(schema) = schema.as_object() else {
            match schema {
                Value::Bool(true) => {}
                Value::Bool(false) => fail("nothing is allowed here".into()),
                other => fail(format!("schema is not an object: {other}")),
            }
            return;
        };
        let mut nested: Vec<(String, &Value, &Value)> = Vec::new();
        for (keyword, arg) in schema {
            if !KEYWORDS.contains(&keyword.as_str()) {
                if !ANNOTATIONS.contains(&keyword.as_str()) {
                    fail(format!(
                        "schema keyword {keyword:?} is not supported by this validator"
                    ));
                }
                continue;
            }
            match keyword.as_str() {
                "$ref" => match arg
                    .as_str()
                    .and_then(|t| t.strip_prefix('#'))
                    .and_then(|p| self.doc.pointer(p))
                {
                    Some(target) => nested.push((at.to_owned(), target, value)),
                    None => fail(format!("unresolvable $ref {arg}")),
                },
                "allOf" => {
                    for s in arg.as_array().into_iter().flatten() {
                        nested.push((at.to_owned(), s, value));
                    }
                }
                "oneOf" | "anyOf" => {
                    let branches: Vec<Vec<String>> = arg
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| {
                            let mut e = Vec::new();
                            self.walk(s, value, at, &mut e);
                            e
                        })
                        .collect();
                    let passing = branches.iter().filter(|e| e.is_empty()).count();
                    let ok = if keyword == "oneOf" {
                        passing == 1
                    } else {
                        passing >= 1
                    };
                    if !ok {
                        fail(format!(
                            "matches {passing} of the {} {keyword} branches: [{}]",
                            branches.len(),
                            branches
                                .iter()
                                .map(|e| e.join("; "))
                                .collect::<Vec<_>>()
                                .join("] or [")
                        ));
                    }
                }
                "type" => {
                    let types: Vec<&str> = match arg {
                        Value::String(t) => vec![t.as_str()],
                        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                        _ => vec![],
                    };
                    if !types.iter().any(|t| has_type(value, t)) {
                        fail(format!(
                            "expected {}, got {}",
                            types.join(" or "),
                            kind(value)
                        ));
                    }
                }
                "const" => {
                    if value != arg {
                        fail(format!("expected {arg}, got {value}"));
                    }
                }
                "enum" => {
                    if !arg.as_array().is_some_and(|a| a.contains(value)) {
                        fail(format!("{value} is not one of {arg}"));
                    }
                }
                "required" => {
                    if let Some(obj) = value.as_object() {
                        for name in arg
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                        {
                            if !obj.contains_key(name) {
                                fail(format!("missing required {name:?}"));
                            }
                        }
                    }
                }
                "properties" => {
                    if let (Some(obj), Some(props)) = (value.as_object(), arg.as_object()) {
                        for (name, s) in props {
                            if let Some(v) = obj.get(name) {
                                nested.push((format!("{at}/{name}"), s, v));
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    if let Some(obj) = value.as_object() {
                        let known =
                            |k: &str| schema.get("properties").is_some_and(|p| p.get(k).is_some());
                        for (name, v) in obj.iter().filter(|(k, _)| !known(k)) {
                            match arg {
                                Value::Bool(false) => fail(format!("unexpected property {name:?}")),
                                Value::Bool(true) => {}
                                s => nested.push((format!("{at}/{name}"), s, v)),
                            }
                        }
                    }
                }
                "items" => {
                    for (i, v) in value.as_array().into_iter().flatten().enumerate() {
                        nested.push((format!("{at}/{i}"), arg, v));
                    }
                }
                "minItems" | "maxItems" => {
                    if let (Some(a), Some(n)) = (value.as_array(), arg.as_u64()) {
                        let len = a.len() as u64;
                        if (keyword == "minItems" && len < n) || (keyword == "maxItems" && len > n)
                        {
                            fail(format!("{len} items, {keyword} is {n}"));
                        }
                    }
                }
                "minimum" | "maximum" => {
                    if let (Some(v), Some(n)) = (value.as_f64(), arg.as_f64()) {
                        if (keyword == "minimum" && v < n) || (keyword == "maximum" && v > n) {
                            fail(format!("{value} breaks {keyword} {arg}"));
                        }
                    }
                }
                "minLength" | "maxLength" => {
                    if let (Some(s), Some(n)) = (value.as_str(), arg.as_u64()) {
                        let len = s.chars().count() as u64;
                        if (keyword == "minLength" && len < n)
                            || (keyword == "maxLength" && len > n)
                        {
                            fail(format!("length {len}, {keyword} is {n}"));
                        }
                    }
                }
                "pattern" => {
                    if let (Some(s), Some(p)) = (value.as_str(), arg.as_str()) {
                        match pattern_matches(p, s) {
                            Ok(true) => {}
                            Ok(false) => fail(format!("{s:?} does not match {p:?}")),
                            Err(e) => fail(e),
                        }
                    }
                }
                "format" => {
                    if let Some(problem) = format_problem(arg.as_str().unwrap_or_default(), value) {
                        fail(problem);
                    }
                }
                _ => unreachable!("every keyword of KEYWORDS has an arm"),
            }
        }
        for (path, s, v) in nested {
            self.walk(s, v, &path, errors);
        }
    }
}

fn has_type(value: &Value, ty: &str) -> bool {
    match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// What is wrong with `value` for `format`, if anything. Formats only constrain their own type.
fn format_problem(format: &str, value: &Value) -> Option<String> {
    match (format, value) {
        ("date-time", Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .err()
            .map(|e| format!("{s:?} is not an RFC 3339 date-time: {e}")),
        ("uuid", Value::String(s)) => uuid::Uuid::try_parse(s)
            .err()
            .map(|e| format!("{s:?} is not a UUID: {e}")),
        ("int64", Value::Number(n)) => (!n.is_i64()).then(|| format!("{n} is not an int64")),
        (f, _) if FORMATS.contains(&f) => None,
        (other, _) => Some(format!(
            "format {other:?} is not supported by this validator"
        )),
    }
}

/// One position of a pattern: a set of characters and how many times it may repeat.
#[derive(Debug)]
struct Atom {
    ranges: Vec<(char, char)>,
    any: bool,
    min: usize,
    max: usize,
}

impl Atom {
    fn accepts(&self, c: char) -> bool {
        self.any || self.ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c))
    }
}

/// Compile the regular-expression subset the catalogue uses: literals, `.`, bracket classes
/// with ranges, `\` escapes, the quantifiers `? * + {n} {n,} {n,m}`, and the anchors `^ $`.
fn compile(pattern: &str) -> Result<(bool, Vec<Atom>, bool), String> {
    let unsupported = |what: &str| Err(format!("pattern {pattern:?}: {what} is not supported"));
    let mut chars = pattern.chars().peekable();
    let anchored_start = chars.next_if_eq(&'^').is_some();
    let mut atoms = Vec::new();
    let mut anchored_end = false;
    while let Some(c) = chars.next() {
        if anchored_end {
            return unsupported("text after `$`");
        }
        let mut atom = Atom {
            ranges: Vec::new(),
            any: false,
            min: 1,
            max: 1,
        };
        match c {
            '$' => {
                anchored_end = true;
                continue;
            }
            '.' => atom.any = true,
            '\\' => {
                let e = chars.next().ok_or("pattern ends in `\\`")?;
                if e.is_ascii_alphanumeric() {
                    return unsupported(&format!("escape \\{e}"));
                }
                atom.ranges.push((e, e));
            }
            '[' => {
                let mut members: Vec<char> = Vec::new();
                loop {
                    match chars.next() {
                        None => return unsupported("an unclosed `[`"),
                        Some(']') => break,
                        Some('^') if members.is_empty() => return unsupported("a negated class"),
                        Some('\\') => members.push(chars.next().ok_or("pattern ends in `\\`")?),
                        Some(m) => members.push(m),
                    }
                }
                let mut i = 0;
                while i < members.len() {
                    if i + 2 < members.len() && members[i + 1] == '-' {
                        atom.ranges.push((members[i], members[i + 2]));
                        i += 3;
                    } else {
                        atom.ranges.push((members[i], members[i]));
                        i += 1;
                    }
                }
            }
            '(' | ')' | '|' | '*' | '+' | '?' | '{' | '}' | ']' => {
                return unsupported(&format!("`{c}` here"));
            }
            lit => atom.ranges.push((lit, lit)),
        }
        match chars.peek() {
            Some('?') => (atom.min, atom.max) = (0, 1),
            Some('*') => (atom.min, atom.max) = (0, usize::MAX),
            Some('+') => (atom.min, atom.max) = (1, usize::MAX),
            Some('{') => {
                chars.next();
                let mut spec = String::new();
                for d in chars.by_ref() {
                    if d == '}' {
                        break;
                    }
                    spec.push(d);
                }
                let number = |s: &str| {
                    s.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("pattern {pattern:?}: bad repetition {{{spec}}}"))
                };
                (atom.min, atom.max) = match spec.split_once(',') {
                    None => (number(&spec)?, number(&spec)?),
                    Some((lo, "")) => (number(lo)?, usize::MAX),
                    Some((lo, hi)) => (number(lo)?, number(hi)?),
                };
                atoms.push(atom);
                continue;
            }
            _ => {
                atoms.push(atom);
                continue;
            }
        }
        chars.next();
        atoms.push(atom);
    }
    Ok((anchored_start, atoms, anchored_end))
}

/// Whether `text` matches `pattern` (JSON-schema semantics: unanchored means "contains").
pub fn pattern_matches(pattern: &str, text: &str) -> Result<bool, String> {
    let (start, atoms, end) = compile(pattern)?;
    let chars: Vec<char> = text.chars().collect();
    let starts = if start { 0..=0 } else { 0..=chars.len() };
    Ok(starts
        .into_iter()
        .any(|from| match_here(&atoms, &chars[from..], end)))
}

fn match_here(atoms: &[Atom], text: &[char], end: bool) -> bool {
    let Some((atom, rest)) = atoms.split_first() else {
        return !end || text.is_empty();
    };
    let mut taken = 0;
    while taken < atom.min {
        match text.get(taken) {
            Some(c) if atom.accepts(*c) => taken += 1,
            _ => return false,
        }
    }
    let mut longest = taken;
    while longest < atom.max && text.get(longest).is_some_and(|c| atom.accepts(*c)) {
        longest += 1;
    }
    (taken..=longest)
        .rev()
        .any(|n| match_here(rest, &text[n..], end))
}

/// Every message of a stream with its headers (first value of each): (sequence, subject,
/// headers, body).
pub async fn wire_messages(
    system: &System,
    stream: &str,
) -> Vec<(u64, String, BTreeMap<String, String>, Vec<u8>)> {
    let js = async_nats::jetstream::new(system.client.clone());
    let handle = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    let state = handle
        .get_info()
        .await
        .unwrap_or_else(|e| panic!("stream {stream} info: {e}"))
        .state;
    let mut out = Vec::new();
    for seq in state.first_sequence.max(1)..=state.last_sequence {
        let m = match handle.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                continue
            }
            Err(e) => panic!("{stream}#{seq}: {e}"),
        };
        let headers: BTreeMap<String, String> = m
            .headers
            .iter()
            .filter_map(|(k, vs)| Some((k.to_string(), vs.first()?.as_str().to_owned())))
            .collect();
        out.push((seq, m.subject.to_string(), headers, m.payload.to_vec()));
    }
    out
}

/// Check every message on the event streams (and the commands) against the catalogue; panics
/// listing each mismatch. Returns how many messages were checked.
pub async fn assert_wire_events_match_catalogue(system: &System) -> usize {
    let catalogue = Catalogue::load();
    let mut checked = 0;
    let mut problems = Vec::new();
    for stream in STREAMS {
        for (seq, subject, headers, body) in wire_messages(system, stream).await {
            checked += 1;
            if let Err(errors) = catalogue.check(&subject, &headers, &body) {
                problems.push(format!(
                    "{stream}#{seq} {subject}: {}\n    body: {}",
                    errors.join("; "),
                    String::from_utf8_lossy(&body)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} message(s) on the wire do not match docs/asyncapi.yaml:\n{}",
        problems.len(),
        problems.join("\n")
    );
    checked
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Map;

    use super::*;

    /// Every keyword (and `format:<value>`) used by the schemas under `value`.
    fn schema_keywords(value: &Value, out: &mut BTreeSet<String>) {
        if let Some(obj) = value.as_object() {
            for (k, v) in obj {
                out.insert(k.clone());
                match k.as_str() {
                    "format" => {
                        out.insert(format!("format:{}", v.as_str().unwrap_or_default()));
                    }
                    "properties" => {
                        for s in v.as_object().into_iter().flat_map(Map::values) {
                            schema_keywords(s, out);
                        }
                    }
                    "allOf" | "oneOf" | "anyOf" => {
                        for s in v.as_array().into_iter().flatten() {
                            schema_keywords(s, out);
                        }
                    }
                    "items" | "additionalProperties" => schema_keywords(v, out),
                    _ => {}
                }
            }
        }
    }

    fn catalogue() -> Catalogue {
        Catalogue::load()
    }

    fn event(ty: &str, data: Value) -> Value {
        serde_json::json!({
            "specversion": "1.0",
            "id": "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b",
            "source": "/payment-service",
            "type": ty,
            "subject": "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5c",
            "time": "2025-01-02T03:04:05.678Z",
            "datacontenttype": "application/json",
            "correlationid": "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5c",
            "data": data,
        })
    }

    fn succeeded() -> Value {
        event(
            "payments.succeeded.v1",
            serde_json::json!({
                "order_id": "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5c",
                "payment_id": "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5d",
                "customer_id": "alice",
                "amount_minor": 1750,
                "currency": "EUR",
            }),
        )
    }

    fn relay_headers() -> BTreeMap<String, String> {
        [
            ("Nats-Msg-Id".to_owned(), "x".to_owned()),
            (
                "Content-Type".to_owned(),
                "application/cloudevents+json".to_owned(),
            ),
        ]
        .into_iter()
        .collect()
    }

    fn check(subject: &str, body: &Value) -> Result<(), Vec<String>> {
        catalogue().check(subject, &relay_headers(), body.to_string().as_bytes())
    }

    #[test]
    fn a_well_formed_event_passes() {
        assert_eq!(check("payments.succeeded.v1", &succeeded()), Ok(()));
    }

    #[test]
    fn wrong_payloads_are_rejected_with_where_and_why() {
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Mutation, &str)> = vec![
            (
                "missing data field",
                Box::new(|e| {
                    e["data"].as_object_mut().unwrap().remove("payment_id");
                }),
                "/data: missing required \"payment_id\"",
            ),
            (
                "amount as a string",
                Box::new(|e| e["data"]["amount_minor"] = "1750".into()),
                "/data/amount_minor: expected integer, got string",
            ),
            (
                "negative amount",
                Box::new(|e| e["data"]["amount_minor"] = (-1).into()),
                "/data/amount_minor: -1 breaks minimum 0",
            ),
            (
                "currency not three capitals",
                Box::new(|e| e["data"]["currency"] = "euro".into()),
                "/data/currency: \"euro\" does not match",
            ),
            (
                "another type on this subject",
                Box::new(|e| e["type"] = "orders.placed.v1".into()),
                "/type: expected \"payments.succeeded.v1\"",
            ),
            (
                "no envelope time",
                Box::new(|e| {
                    e.as_object_mut().unwrap().remove("time");
                }),
                "/: missing required \"time\"",
            ),
            (
                "time not a date-time",
                Box::new(|e| e["time"] = "yesterday".into()),
                "/time: \"yesterday\" is not an RFC 3339 date-time",
            ),
            (
                "payment id not a UUID",
                Box::new(|e| e["data"]["payment_id"] = "p-1".into()),
                "/data/payment_id: \"p-1\" is not a UUID",
            ),
        ];
        for (name, mutate, expected) in cases {
            let mut body = succeeded();
            mutate(&mut body);
            let errors = check("payments.succeeded.v1", &body).expect_err(name);
            assert!(
                errors.iter().any(|e| e.starts_with(expected)),
                "{name}: expected an error starting {expected:?}, got {errors:#?}"
            );
        }
    }

    #[test]
    fn enums_nested_arrays_and_headers_are_checked() {
        let failed = event(
            "payments.failed.v1",
            serde_json::json!({ "order_id": "o-1", "reason": "bored" }),
        );
        let errors = check("payments.failed.v1", &failed).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("/data/reason: \"bored\" is not one of")),
            "{errors:?}"
        );

        let committed = event(
            "inventory.committed.v1",
            serde_json::json!({
                "order_id": "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5c",
                "items": [{ "sku": "WIDGET", "quantity": 0 }, { "sku": "GADGET" }],
            }),
        );
        let errors = check("inventory.committed.v1", &committed).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("/data/items/0/quantity: 0 breaks minimum 1")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("/data/items/1: missing required \"quantity\"")),
            "{errors:?}"
        );

        let mut headers = relay_headers();
        headers.insert("Content-Type".into(), "text/plain".into());
        let errors = catalogue()
            .check(
                "payments.succeeded.v1",
                &headers,
                succeeded().to_string().as_bytes(),
            )
            .unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("headers: /Content-Type")),
            "{errors:?}"
        );
    }

    #[test]
    fn bare_bodies_are_checked_against_data_and_unknown_subjects_fail() {
        let c = catalogue();
        let none = BTreeMap::new();
        let cancel = serde_json::json!({ "order_id": "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5c", "reason": "customer_cancelled" });
        assert_eq!(
            c.check("orders.cancelled.v1", &none, cancel.to_string().as_bytes()),
            Ok(())
        );
        let errors = c
            .check(
                "orders.cancelled.v1",
                &none,
                br#"{"order_id":"0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5c","reason":"whim"}"#,
            )
            .unwrap_err();
        assert!(
            errors.iter().any(|e| e.starts_with("/reason:")),
            "{errors:?}"
        );
        let errors = c
            .check(
                "cmd.orders.cancel.v1",
                &none,
                br#"{"order_id":"0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5c","extra":1}"#,
            )
            .unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("unexpected property \"extra\"")),
            "{errors:?}"
        );
        assert!(c.check("orders.lost.v1", &none, b"{}").is_err());
        assert!(c.check("orders.cancelled.v1", &none, b"not json").is_err());
    }

    #[test]
    fn unsupported_keywords_are_errors_not_silence() {
        let c = Catalogue::from_yaml("{}");
        let errors = c.validate(&serde_json::json!({ "oneOf": [] }), &Value::Null);
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    #[test]
    fn the_validator_knows_every_keyword_the_catalogue_uses() {
        let c = catalogue();
        let mut used = BTreeSet::new();
        for schema in c.doc["components"]["schemas"].as_object().unwrap().values() {
            schema_keywords(schema, &mut used);
        }
        for message in c.doc["components"]["messages"]
            .as_object()
            .unwrap()
            .values()
        {
            schema_keywords(&message["payload"], &mut used);
        }
        let unknown: Vec<&String> = used
            .iter()
            .filter(|k| match k.strip_prefix("format:") {
                Some(f) => !FORMATS.contains(&f),
                None => !KEYWORDS.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()),
            })
            .collect();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert!(used.contains("pattern") && used.contains("format:uuid"));
    }

    #[test]
    fn patterns_of_the_catalogue_match_as_a_regex_would() {
        let id = "^[A-Za-z0-9._:@-]{1,64}$";
        assert_eq!(pattern_matches(id, "alice@x.y:z_-1"), Ok(true));
        assert_eq!(pattern_matches(id, ""), Ok(false));
        assert_eq!(pattern_matches(id, "bad sku"), Ok(false));
        assert_eq!(pattern_matches(id, &"a".repeat(65)), Ok(false));
        assert_eq!(pattern_matches("^[A-Z]{3}$", "EUR"), Ok(true));
        assert_eq!(pattern_matches("^[A-Z]{3}$", "EURO"), Ok(false));
        let tp = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$";
        assert_eq!(
            pattern_matches(
                tp,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ),
            Ok(true)
        );
        assert_eq!(pattern_matches(tp, "00-xyz-00f067aa0ba902b7-01"), Ok(false));
        assert_eq!(pattern_matches("b+c?$", "aabbb"), Ok(true));
        assert_eq!(pattern_matches("a.c", "xxabcxx"), Ok(true));
        assert!(pattern_matches("(a|b)", "a").is_err());
    }
}
