//! Request-body inspection: finds the few top-level fields of an OpenAI request the gateway acts on
//! (`model`, `stream`, `stream_options.include_usage`, `user`, and the prompt's [`PROMPT_FIELDS`]
//! for `cache_aware` routing) by scanning the JSON once, without
//! building a document or allocating. Also the byte-level edit that asks a backend for streaming
//! usage without re-serialising the client's JSON.

use std::borrow::Cow;
use std::ops::Range;

/// The top-level members that make up the prompt a backend caches, in the order it renders them:
/// Anthropic's `system`, Responses' `instructions`, `tools`, then the conversation (`messages`,
/// Responses' `input`, completions' `prompt`). A request has a few of them.
pub const PROMPT_FIELDS: [&[u8]; 6] = [
    b"system",
    b"instructions",
    b"tools",
    b"messages",
    b"input",
    b"prompt",
];

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// Raw bytes of the `model` string (between the quotes).
    pub model: Option<Range<usize>>,
    pub stream: bool,
    /// `stream_options` object value, braces included.
    pub stream_options: Option<Range<usize>>,
    /// `stream_options: null`, the literal's range.
    pub stream_options_null: Option<Range<usize>>,
    /// `stream_options.include_usage` (its last member): whether it reads as true, its value.
    pub include_usage: Option<(bool, Range<usize>)>,
    pub user: Option<Range<usize>>,
    /// Raw JSON value of `priority` (any type), which `engine_priority` replaces.
    pub priority: Option<Range<usize>>,
    /// Raw JSON value of each of [`PROMPT_FIELDS`], in its order; empty when absent.
    pub prompt: [Range<usize>; PROMPT_FIELDS.len()],
    /// Position of the closing brace of the top-level object.
    pub end: usize,
    /// The object has at least one member.
    pub has_members: bool,
    /// The body is a multipart form, not JSON: the model is a raw form value, with no escapes.
    pub form: bool,
}

impl RequestInfo {
    /// Decodes the `model` string, JSON escapes and all, into `out` (cleared first): the name the
    /// backend reads, so the one keys, policies, aliases and records must use. False when the
    /// body names no model or its string is not valid.
    pub fn decode_model(&self, body: &[u8], out: &mut String) -> bool {
        out.clear();
        let Some(at) = self.model.clone() else {
            return false;
        };
        let raw = &body[at.clone()];
        if self.form || !raw.contains(&b'\\') {
            return match std::str::from_utf8(raw) {
                Ok(text) => {
                    out.push_str(text);
                    true
                }
                Err(_) => false,
            };
        }
        match serde_json::from_slice::<String>(&body[at.start - 1..at.end + 1]) {
            Ok(text) => {
                *out = text;
                true
            }
            Err(_) => false,
        }
    }

    /// Replaces the model string's raw bytes with `served` (an alias's target), keeping every
    /// other range pointing at the same bytes.
    pub fn replace_model(&mut self, body: &mut Vec<u8>, served: &str) {
        let Some(at) = self.model.clone() else {
            return;
        };
        body.splice(at.clone(), served.bytes());
        let delta = served.len() as isize - at.len() as isize;
        self.shift(at.end, delta);
        self.model = Some(at.start..at.start + served.len());
    }

    /// Moves every position at or after `from` by `delta` bytes: the body changed before them.
    /// The gateway's edits never start where another range ends, so ends and starts move alike.
    fn shift(&mut self, from: usize, delta: isize) {
        let moved = |at: usize| {
            if at >= from {
                at.saturating_add_signed(delta)
            } else {
                at
            }
        };
        let shift_range = |r: &mut Range<usize>| {
            *r = moved(r.start)..moved(r.end);
        };
        for r in [
            &mut self.model,
            &mut self.stream_options,
            &mut self.stream_options_null,
            &mut self.user,
            &mut self.priority,
        ]
        .into_iter()
        .flatten()
        {
            shift_range(r);
        }
        if let Some((_, r)) = &mut self.include_usage {
            shift_range(r);
        }
        // A prompt value can end where an insertion starts (before the closing brace): it does
        // not take in what was inserted.
        for r in &mut self.prompt {
            let end = if r.end > from { moved(r.end) } else { r.end };
            *r = moved(r.start)..end;
        }
        self.end = moved(self.end);
    }
}

/// Scans a request body. `None` when it is not a JSON object (the backend will judge it).
pub fn inspect(body: &[u8]) -> Option<RequestInfo> {
    // A UTF-8 byte order mark, which Python's json.loads (vLLM, SGLang) skips too.
    let bom = usize::from(body.starts_with(b"\xef\xbb\xbf")) * 3;
    let mut s = Scanner { b: body, i: bom };
    let mut info = RequestInfo::default();
    s.ws();
    s.eat(b'{')?;
    loop {
        s.ws();
        if s.peek()? == b'}' {
            info.end = s.i;
            return Some(info);
        }
        if info.has_members {
            s.eat(b',')?;
            s.ws();
        }
        let key = s.string()?;
        s.ws();
        s.eat(b':')?;
        s.ws();
        let value = s.value()?;
        info.has_members = true;
        // A repeated member replaces the earlier one, as in the JSON parsers backends use.
        let string = (body[value.start] == b'"').then(|| value.start + 1..value.end - 1);
        match &*member_name(body, key) {
            b"model" => info.model = string,
            b"user" => info.user = string,
            b"priority" => info.priority = Some(value),
            b"stream" => info.stream = lax_bool(&body[value]) == Some(true),
            b"stream_options" => {
                let object = body[value.start] == b'{';
                info.include_usage = object
                    .then(|| last_flag(body, value.clone(), b"include_usage"))
                    .flatten();
                info.stream_options_null = (&body[value.clone()] == b"null").then(|| value.clone());
                info.stream_options = object.then_some(value);
            }
            key => {
                if let Some(at) = PROMPT_FIELDS.iter().position(|f| *f == key) {
                    info.prompt[at] = value;
                }
            }
        }
    }
}

/// Scans a `multipart/form-data` body (audio transcriptions and translations) for its `model`
/// and `stream` fields. `content_type` is the request's header, which names the boundary.
pub fn inspect_form(body: &[u8], content_type: &[u8]) -> Option<RequestInfo> {
    let boundary = form_boundary(content_type)?;
    let mut delimiter = Vec::with_capacity(boundary.len() + 4);
    delimiter.extend_from_slice(b"\r\n--");
    delimiter.extend_from_slice(boundary);
    let finder = memchr::memmem::Finder::new(&delimiter);
    // The first delimiter may open the body without the CRLF before it.
    let mut at = if body.starts_with(&delimiter[2..]) {
        delimiter.len() - 2
    } else {
        finder.find(body)? + delimiter.len()
    };
    let mut info = RequestInfo {
        form: true,
        ..RequestInfo::default()
    };
    loop {
        // After a delimiter: "--" ends the form, else CRLF and the part's headers.
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Some(info);
        }
        let headers_start = at + memchr::memmem::find(rest, b"\r\n")? + 2;
        let headers_end =
            headers_start + memchr::memmem::find(&body[headers_start..], b"\r\n\r\n")?;
        let value_start = headers_end + 4;
        let value_end = value_start + finder.find(&body[value_start..])?;
        match form_field_name(&body[headers_start..headers_end]) {
            Some(b"model") => info.model = Some(value_start..value_end),
            Some(b"stream") => {
                info.stream = lax_bool(body[value_start..value_end].trim_ascii()) == Some(true)
            }
            _ => {}
        }
        at = value_end + delimiter.len();
    }
}

/// The `boundary` parameter of a `multipart/form-data` content type, unquoted.
fn form_boundary(content_type: &[u8]) -> Option<&[u8]> {
    let mut params = content_type.split(|&b| b == b';');
    if !params
        .next()?
        .trim_ascii()
        .eq_ignore_ascii_case(b"multipart/form-data")
    {
        return None;
    }
    params
        .find_map(|p| {
            let (name, value) = p
                .trim_ascii()
                .split_at(p.trim_ascii().iter().position(|&b| b == b'=')?);
            name.eq_ignore_ascii_case(b"boundary").then(|| {
                let value = &value[1..];
                value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value)
            })
        })
        .filter(|b| !b.is_empty())
}

/// The `name` of a form part, from its `Content-Disposition` header.
fn form_field_name(headers: &[u8]) -> Option<&[u8]> {
    let line = headers
        .split(|&b| b == b'\n')
        .find(|l| l.len() > 20 && l[..20].eq_ignore_ascii_case(b"content-disposition:"))?;
    line.split(|&b| b == b';').skip(1).find_map(|p| {
        let p = p.trim_ascii();
        let value = p
            .strip_prefix(b"name=")
            .or_else(|| (p.len() > 5 && p[..5].eq_ignore_ascii_case(b"name=")).then(|| &p[5..]))?;
        Some(
            value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value),
        )
    })
}

/// The last member `name` of the object at `obj` (the one a backend reads): whether its value
/// reads as true, and the value's range.
fn last_flag(body: &[u8], obj: Range<usize>, name: &[u8]) -> Option<(bool, Range<usize>)> {
    let mut s = Scanner {
        b: &body[..obj.end],
        i: obj.start + 1,
    };
    let mut first = true;
    let mut found = None;
    loop {
        s.ws();
        if s.peek()? == b'}' {
            return found;
        }
        if !first {
            s.eat(b',')?;
            s.ws();
        }
        first = false;
        let key = s.string()?;
        s.ws();
        s.eat(b':')?;
        s.ws();
        let v = s.value()?;
        if *member_name(body, key) == *name {
            found = Some((lax_bool(&body[v.clone()]) == Some(true), v));
        }
    }
}

/// The name of the member whose key is at `key` (between the quotes), escapes decoded: a backend
/// reads `"mod\u0065l"` as `model`, so the gateway must too. Copies only a name with escapes.
fn member_name(body: &[u8], key: Range<usize>) -> Cow<'_, [u8]> {
    let raw = &body[key.clone()];
    if !raw.contains(&b'\\') {
        return Cow::Borrowed(raw);
    }
    match serde_json::from_slice::<String>(&body[key.start - 1..key.end + 1]) {
        Ok(name) => Cow::Owned(name.into_bytes()),
        Err(_) => Cow::Borrowed(raw),
    }
}

/// A boolean as vLLM's request models (pydantic, lax mode) read one: JSON booleans, 0 and 1,
/// and the strings "true"/"false", "1"/"0", "yes"/"no", "on"/"off", "t"/"f", "y"/"n" in any
/// case. A client sending `"stream": "true"` gets a stream, so the gateway must see one.
fn lax_bool(raw: &[u8]) -> Option<bool> {
    let text = match raw {
        [b'"', inner @ .., b'"'] => inner,
        b"true" | b"1" => return Some(true),
        b"false" | b"0" => return Some(false),
        _ => return None,
    };
    const TRUE: [&[u8]; 6] = [b"true", b"1", b"yes", b"on", b"t", b"y"];
    const FALSE: [&[u8]; 6] = [b"false", b"0", b"no", b"off", b"f", b"n"];
    if TRUE.iter().any(|t| text.eq_ignore_ascii_case(t)) {
        Some(true)
    } else if FALSE.iter().any(|f| text.eq_ignore_ascii_case(f)) {
        Some(false)
    } else {
        None
    }
}

/// Rewrites `body` in place so a streaming request asks for the final usage chunk
/// (`stream_options.include_usage = true`). Returns false when nothing needed changing.
pub fn request_stream_usage(body: &mut Vec<u8>, info: &mut RequestInfo) -> bool {
    let Some((at, insert)) = stream_usage_edit(body, info) else {
        return false;
    };
    body.splice(at.clone(), insert.iter().copied());
    info.shift(at.end, insert.len() as isize - at.len() as isize);
    // `info` now describes what the edit wrote: `include_usage: true`, inside a `stream_options`
    // object the edit wrote too when the insert holds one.
    if let Some(value) = memchr::memmem::find(insert, b"true") {
        let value = at.start + value;
        info.include_usage = Some((true, value..value + 4));
    }
    if let Some(object) = memchr::memchr(b'{', insert) {
        info.stream_options = Some(at.start + object..at.start + insert.len());
        info.stream_options_null = None;
    }
    info.has_members = true;
    true
}

/// The one edit that asks for streaming usage: the bytes at `.0` are replaced by `.1`.
fn stream_usage_edit(body: &[u8], info: &RequestInfo) -> Option<(Range<usize>, &'static [u8])> {
    if let Some(null) = &info.stream_options_null {
        // Replaced, not appended: a second `stream_options` key is read differently by
        // different JSON parsers.
        return Some((null.clone(), b"{\"include_usage\":true}"));
    }
    match (&info.stream_options, &info.include_usage) {
        (_, Some((true, _))) => None,
        (_, Some((false, at))) => Some((at.clone(), b"true")),
        (Some(obj), None) => {
            let inner_empty = body[obj.start + 1..obj.end - 1]
                .iter()
                .all(u8::is_ascii_whitespace);
            let insert: &[u8] = if inner_empty {
                b"\"include_usage\":true"
            } else {
                b"\"include_usage\":true,"
            };
            Some((obj.start + 1..obj.start + 1, insert))
        }
        (None, None) => {
            let insert: &[u8] = if info.has_members {
                b",\"stream_options\":{\"include_usage\":true}"
            } else {
                b"\"stream_options\":{\"include_usage\":true}"
            };
            Some((info.end..info.end, insert))
        }
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string; returns the range between the quotes.
    fn string(&mut self) -> Option<Range<usize>> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(start..self.i - 1);
                }
                b'\\' => self.i += 2,
                _ => self.i += 1,
            }
        }
    }

    /// Any value; returns its full range (quotes and brackets included).
    fn value(&mut self) -> Option<Range<usize>> {
        let start = self.i;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while !matches!(
                    self.peek()?,
                    b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'
                ) {
                    self.i += 1;
                }
            }
        }
        (self.i > start).then_some(start..self.i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(info: &RequestInfo, body: &[u8]) -> Option<String> {
        let mut out = String::new();
        info.decode_model(body, &mut out).then_some(out)
    }

    /// Applies the usage edit and checks that the ranges kept by the edited info are those a
    /// fresh scan of the edited body finds.
    fn edited(body: &str) -> String {
        let mut b = body.as_bytes().to_vec();
        let mut info = inspect(&b).unwrap();
        request_stream_usage(&mut b, &mut info);
        let s = String::from_utf8(b.clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).expect("edit keeps valid JSON");
        assert_eq!(v["stream_options"]["include_usage"], true, "{s}");
        assert_eq!(inspect(&b), Some(info), "{s}");
        s
    }

    #[test]
    fn the_clients_priority_is_found_whatever_its_type() {
        let body = br#"{"priority":1,"n":1,"priority":[1]}"#;
        let info = inspect(body).unwrap();
        assert_eq!(&body[info.priority.unwrap()], b"[1]");
        assert_eq!(inspect(b"{}").unwrap().priority, None);
        // Behind a byte order mark, as the backend's parser reads it.
        let body = b"\xef\xbb\xbf {\"priority\":7}";
        assert_eq!(&body[inspect(body).unwrap().priority.unwrap()], b"7");
    }

    #[test]
    fn member_names_are_read_as_the_backend_reads_them() {
        // Found by fuzz/fuzz_targets/inspect.rs: an escaped name hid the model from the gateway
        // (no alias, no model policy), and an earlier duplicate decided what a backend ignores.
        let body = br#"{"mod\u0065l":"secret","stream":true}"#;
        assert_eq!(
            model(&inspect(body).unwrap(), body).as_deref(),
            Some("secret")
        );
        let body = br#"{"model":"a","model":5,"user":"u","user":null}"#;
        let info = inspect(body).unwrap();
        assert_eq!((info.model, info.user), (None, None));
        for body in [
            r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
            r#"{"stream_options":{"include_usage":null}}"#,
            r#"{"stream_options":{"include_\u0075sage":false}}"#,
            r#"{"stream_options":null,"stream_options":{}}"#,
            r#"{"stream_options":{"include_usage":true},"stream_options":null}"#,
        ] {
            let edited = edited(body);
            let value: serde_json::Value = serde_json::from_str(&edited).unwrap();
            assert_eq!(value["stream_options"]["include_usage"], true, "{edited}");
        }
    }

    #[test]
    fn the_edited_info_describes_what_the_edit_wrote() {
        // Found by fuzz/fuzz_targets/inspect.rs: after the edit, the info still said the body had
        // no members and no `stream_options`.
        for body in [
            "{}",
            r#"{"stream":true}"#,
            r#"{"stream_options":null}"#,
            r#"{"stream_options":{}}"#,
            r#"{"stream_options":{"include_usage":false}}"#,
        ] {
            edited(body);
        }
    }

    #[test]
    fn the_model_is_read_with_its_escapes_decoded() {
        let body = br#"{"model":"gpt\u002d4\t\"x\""}"#;
        let info = inspect(body).unwrap();
        assert_eq!(model(&info, body).as_deref(), Some("gpt-4\t\"x\""));
        let plain = br#"{"model":"gpt-4"}"#;
        assert_eq!(
            model(&inspect(plain).unwrap(), plain).as_deref(),
            Some("gpt-4")
        );
        let broken = b"{\"model\":\"\xff\"}";
        assert_eq!(model(&inspect(broken).unwrap(), broken), None);
    }

    #[test]
    fn the_prompt_fields_are_found_in_render_order() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"model":"m","system":"be brief","tools":[{"name":"t"}],"max_tokens":9}"#;
        let info = inspect(body).unwrap();
        let found: Vec<&[u8]> = info.prompt.iter().map(|r| &body[r.clone()]).collect();
        let want: [&[u8]; 6] = [
            br#""be brief""#,
            b"",
            br#"[{"name":"t"}]"#,
            br#"[{"role":"user","content":"hi"}]"#,
            b"",
            b"",
        ];
        assert_eq!(found, want);
    }

    #[test]
    fn replacing_the_model_keeps_the_other_ranges() {
        for served in ["m", "a-much-longer-served-name"] {
            let mut b = br#"{"model":"public","user":"u-1","stream":true,"prompt":"p"}"#.to_vec();
            let mut info = inspect(&b).unwrap();
            info.replace_model(&mut b, served);
            let fresh = inspect(&b).unwrap();
            assert_eq!(info, fresh, "{}", String::from_utf8_lossy(&b));
            assert_eq!(model(&info, &b).as_deref(), Some(served));
            assert_eq!(edited(std::str::from_utf8(&b).unwrap()).len(), b.len() + 40);
        }
    }

    #[test]
    fn finds_fields_past_nested_values() {
        let body = br#"{"messages":[{"role":"user","content":"say \"model\": {x}"}],"model":"m-1","stream":true,"user":"u","n":1}"#;
        let info = inspect(body).unwrap();
        assert_eq!(model(&info, body).as_deref(), Some("m-1"));
        assert!(info.stream);
        assert_eq!(&body[info.user.clone().unwrap()], b"u");
        assert_eq!(info.include_usage, None);
        assert!(inspect(b"[1,2]").is_none());
        assert!(inspect(b"{\"model\":").is_none());
    }

    #[test]
    fn usage_request_edits_are_minimal_and_valid() {
        assert_eq!(
            edited(r#"{"model":"m","stream":true}"#),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            edited(r#"{"stream":true, "stream_options": {"continuous_usage_stats": true} }"#),
            r#"{"stream":true, "stream_options": {"include_usage":true,"continuous_usage_stats": true} }"#
        );
        assert_eq!(
            edited(r#"{"stream":true,"stream_options":{ }}"#),
            r#"{"stream":true,"stream_options":{"include_usage":true }}"#
        );
        assert_eq!(
            edited(r#"{"stream":true,"stream_options":{"include_usage":false}}"#),
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            edited(r#"{"stream":true,"stream_options":null,"n":1}"#),
            r#"{"stream":true,"stream_options":{"include_usage":true},"n":1}"#
        );
        assert_eq!(
            edited(r#"{"stream":true,"stream_options":{"include_usage":"no"}}"#),
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        for asked in ["true", "1", "\"yes\"", "\"True\""] {
            let raw = format!(r#"{{"stream":true,"stream_options":{{"include_usage":{asked}}}}}"#);
            let mut b = raw.clone().into_bytes();
            let mut info = inspect(&b).unwrap();
            assert!(!request_stream_usage(&mut b, &mut info), "{raw}");
            assert_eq!(b, raw.as_bytes());
        }
    }

    #[test]
    fn stream_is_read_as_leniently_as_vllm_reads_it() {
        for (value, stream) in [
            ("true", true),
            ("1", true),
            ("\"true\"", true),
            ("\"on\"", true),
            ("\"Y\"", true),
            ("false", false),
            ("0", false),
            ("\"no\"", false),
            ("null", false),
            ("2", false),
            ("\"maybe\"", false),
        ] {
            let body = format!(r#"{{"model":"m","stream":{value}}}"#);
            assert_eq!(inspect(body.as_bytes()).unwrap().stream, stream, "{body}");
        }
    }

    #[test]
    fn a_form_names_its_model_and_stream() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--X\r\n\r\n--XyZ\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper-large\r\n--XyZ\r\nContent-Disposition: form-data; name=stream\r\n\r\ntrue\r\n--XyZ--\r\n";
        let info = inspect_form(body, b"multipart/form-data; boundary=\"XyZ\"").unwrap();
        assert!(info.form && info.stream);
        assert_eq!(model(&info, body).as_deref(), Some("whisper-large"));
        let mut edited = body.to_vec();
        let mut info = info;
        info.replace_model(&mut edited, "served");
        assert_eq!(
            inspect_form(&edited, b"multipart/form-data; boundary=XyZ").unwrap(),
            info
        );
        assert!(inspect_form(body, b"application/json").is_none());
        assert!(inspect_form(body, b"multipart/form-data").is_none());
        // A form whose last part never ends names nothing more than it completed.
        let cut = &body[..body.len() - 30];
        assert_eq!(
            inspect_form(cut, b"multipart/form-data; boundary=XyZ"),
            None
        );
    }
}
