//! The one way a client key or other credential is shown outside the process: in usage records,
//! log lines, `Debug` output of the config, and as the name of a key that has none.
//!
//! It must not reveal a key whole, however short, nor enough of it to guess the rest.

/// Keys shorter than this are hidden entirely: showing 8 characters of a 10-character key would
/// all but reveal it.
const SHORTEST_SHOWN: usize = 12;

/// `sk-test-key-001` -> `sk-te...001`: the first 5 and last 3 characters; `***` for a key shorter
/// than 12 characters.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < SHORTEST_SHOWN {
        return "***".to_string();
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("{head}...{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_the_ends_of_long_keys() {
        assert_eq!(mask_key("sk-test-key-001"), "sk-te...001");
        assert_eq!(mask_key("sk-llmproxy-dev-001"), "sk-ll...001");
        assert_eq!(mask_key("123456789012"), "12345...012");
        // Characters, not bytes.
        assert_eq!(mask_key("ключ-очень-длинный"), "ключ-...ный");
    }

    #[test]
    fn never_reveals_a_short_key() {
        for key in ["", "s", "short", "sk-short", "12345678901", "ключ-ключ"] {
            assert_eq!(mask_key(key), "***", "{key:?}");
        }
    }
}
