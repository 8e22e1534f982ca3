//! `${NAME}` / `${NAME:-default}` substitution on the raw config text.
//!
//! Done before parsing so a variable can supply a number or a bool, not only a string.
//! Lines whose first non-blank character is `#` are comments in both YAML and TOML and are
//! left alone, so commented-out examples never demand a variable. `$$` is a literal `$`;
//! a `$` not followed by `{` or `$` is kept as is (passwords contain dollars).

/// A substitution failure on a 1-based line.
#[derive(Debug)]
pub(super) struct EnvError {
    pub line: usize,
    pub message: String,
}

/// Replaces variables using `lookup`; reports every failure, not just the first.
pub(super) fn substitute(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<EnvError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut error = |message: String| {
            errors.push(EnvError {
                line: index + 1,
                message,
            })
        };
        let mut rest = line;
        while let Some(dollar) = rest.find('$') {
            out.push_str(&rest[..dollar]);
            let after = &rest[dollar + 1..];
            if let Some(after) = after.strip_prefix('$') {
                out.push('$');
                rest = after;
                continue;
            }
            let Some(body_and_rest) = after.strip_prefix('{') else {
                out.push('$');
                rest = after;
                continue;
            };
            let Some(end) = body_and_rest.find('}') else {
                error("unterminated `${` (write `$$` for a literal `$`)".to_string());
                rest = "";
                break;
            };
            let body = &body_and_rest[..end];
            rest = &body_and_rest[end + 1..];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if !is_valid_name(name) {
                error(format!("invalid variable name in `${{{body}}}`"));
                continue;
            }
            match (lookup(name), default) {
                // Shell semantics: `:-` also replaces a variable that is set but empty.
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => error(format!(
                    "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"
                )),
            }
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("9000".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn replaces_variables_defaults_and_escapes() {
        let text = "a: ${PORT}\nb: ${NOPE:-x y}\nc: ${EMPTY:-d}\nd: '$$HOME pa$s'\n";
        assert_eq!(
            substitute(text, env).unwrap(),
            "a: 9000\nb: x y\nc: d\nd: '$HOME pa$s'\n"
        );
    }

    #[test]
    fn skips_comment_lines() {
        let text = "  # uses ${MISSING}\na: 1";
        assert_eq!(substitute(text, env).unwrap(), text);
    }

    #[test]
    fn reports_every_missing_variable_with_its_line() {
        let errors = substitute("a: ${A}\nb: 1\nc: ${C} ${1X}\nd: ${D", env).unwrap_err();
        let got: Vec<_> = errors
            .iter()
            .map(|e| (e.line, e.message.as_str()))
            .collect();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].0, 1);
        assert!(got[0].1.contains("`A` is not set"));
        assert_eq!((got[1].0, got[2].0, got[3].0), (3, 3, 4));
        assert!(got[2].1.contains("invalid variable name"));
        assert!(got[3].1.contains("unterminated"));
    }
}
