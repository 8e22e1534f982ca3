//! The APIs the gateway relays, decided once per request from its path (the query string aside).
//! Each [`Api`] says how its request body names the model and asks for a stream, how its response
//! reports usage, and in which shape the gateway's own errors reach its clients. Owns only that
//! decision; the parsing lives with the phases that use it.

/// One API (a dialect of request, response and error) that backends serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `/v1/completions`.
    Completions,
    /// OpenAI `/v1/embeddings`.
    Embeddings,
    /// OpenAI Responses, `POST /v1/responses`.
    Responses,
    /// Anthropic Messages, `/v1/messages`.
    Messages,
    /// Anthropic `/v1/messages/count_tokens`: relayed, never billed.
    CountTokens,
    /// OpenAI `/v1/audio/transcriptions` and `/v1/audio/translations` (multipart forms).
    Audio,
    /// `/v1/rerank`, `/v2/rerank`, `/rerank` (Cohere/Jina shape, as vLLM serves it).
    Rerank,
    /// `/v1/score`, `/score` (vLLM).
    Score,
    /// Any other path the gateway relays: the rest of `/v1/*` and vLLM's own routes outside it
    /// (`/tokenize`, `/detokenize`, `/pooling`, `/classify`, `/invocations`).
    Other,
}

/// Paths outside `/v1/` that vLLM serves and the gateway relays.
const VLLM_ROUTES: [&[u8]; 5] = [
    b"/tokenize",
    b"/detokenize",
    b"/pooling",
    b"/classify",
    b"/invocations",
];

impl Api {
    /// Every value, in the order of [`Api::index`].
    pub const ALL: [Api; 10] = [
        Api::ChatCompletions,
        Api::Completions,
        Api::Embeddings,
        Api::Responses,
        Api::Messages,
        Api::CountTokens,
        Api::Audio,
        Api::Rerank,
        Api::Score,
        Api::Other,
    ];

    /// The API a request path is for; `None` for a path the gateway does not relay (a 404).
    pub fn of_path(path: &[u8]) -> Option<Api> {
        let path = crate::http::path_of(path);
        // The backend's server decodes %XX before it routes, so the gateway classifies what it
        // will serve: `/v1/chat/completion%73` is chat. Longer paths than any named here only
        // need their `/v1/` prefix, which a decoding cannot create beyond the first bytes.
        let mut decoded = [0u8; 64];
        let path = match memchr::memchr(b'%', path) {
            Some(_) => percent_decode(path, &mut decoded).unwrap_or(path),
            None => path,
        };
        let path = path.strip_suffix(b"/").unwrap_or(path);
        Some(match path {
            b"/v1/chat/completions" => Api::ChatCompletions,
            b"/v1/completions" => Api::Completions,
            b"/v1/embeddings" => Api::Embeddings,
            b"/v1/responses" => Api::Responses,
            b"/v1/messages" => Api::Messages,
            b"/v1/messages/count_tokens" => Api::CountTokens,
            b"/v1/audio/transcriptions" | b"/v1/audio/translations" => Api::Audio,
            b"/v1/rerank" | b"/v2/rerank" | b"/rerank" => Api::Rerank,
            b"/v1/score" | b"/score" => Api::Score,
            p if p.starts_with(b"/v1/") || VLLM_ROUTES.contains(&p) => Api::Other,
            _ => return None,
        })
    }

    /// Position in [`Api::ALL`]: a metrics label slot.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The record's `api` field and the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat_completions",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::CountTokens => "count_tokens",
            Api::Audio => "audio",
            Api::Rerank => "rerank",
            Api::Score => "score",
            Api::Other => "other",
        }
    }

    /// Whether the gateway's own errors take Anthropic's shape instead of OpenAI's.
    pub fn anthropic_errors(self) -> bool {
        matches!(self, Api::Messages | Api::CountTokens)
    }

    /// Whether a response is billed: counting tokens generates nothing.
    pub fn billed(self) -> bool {
        !matches!(self, Api::CountTokens)
    }
}

/// `path` with its `%XX` escapes decoded into `out`; `None` when it does not fit or an escape is
/// not two hex digits (the path is then classified as it is).
fn percent_decode<'a>(path: &[u8], out: &'a mut [u8; 64]) -> Option<&'a [u8]> {
    let (mut i, mut n) = (0, 0);
    while i < path.len() {
        let byte = match path[i] {
            b'%' => {
                let hex = path.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                i += 2;
                u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?
            }
            b => b,
        };
        *out.get_mut(n)? = byte;
        n += 1;
        i += 1;
    }
    Some(&out[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_api() {
        let cases: [(&[u8], Option<Api>); 18] = [
            // As the backend decodes them.
            (b"/v1/chat/completion%73", Some(Api::ChatCompletions)),
            (b"/v1/%72esponses?x=%ZZ", Some(Api::Responses)),
            (b"/v1/chat/completion%7", Some(Api::Other)),
            (b"/v1/chat/completion%+3", Some(Api::Other)),
            (b"/v1/chat/completions", Some(Api::ChatCompletions)),
            (b"/v1/chat/completions?x=1", Some(Api::ChatCompletions)),
            (b"/v1/completions/", Some(Api::Completions)),
            (b"/v1/responses", Some(Api::Responses)),
            (b"/v1/messages?beta=true", Some(Api::Messages)),
            (b"/v1/messages/count_tokens", Some(Api::CountTokens)),
            (b"/v1/audio/translations", Some(Api::Audio)),
            (b"/rerank", Some(Api::Rerank)),
            (b"/score", Some(Api::Score)),
            (b"/tokenize", Some(Api::Other)),
            (b"/v1/moderations", Some(Api::Other)),
            (b"/v1", None),
            (b"/tokenizer", None),
            (b"/", None),
        ];
        for (path, api) in cases {
            assert_eq!(Api::of_path(path), api, "{}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn all_is_in_index_order() {
        for (i, api) in Api::ALL.iter().enumerate() {
            assert_eq!(api.index(), i);
        }
    }
}
