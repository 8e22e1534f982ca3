//! Address parsing for the config: listen addresses, backend URLs and the IP blocks of
//! `allowed_ips`.
//!
//! It must not resolve names: only `localhost` in a listen address is mapped, to 127.0.0.1,
//! without asking a resolver; backend hostnames are kept as written for the upstream module to
//! resolve at connect time.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Accepts ":8000", "127.0.0.1:8000", "[::1]:8000" and "localhost:8000".
pub(super) fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let invalid = |why: &str| {
        format!(
            "invalid address {text:?}: {why}; expected \":PORT\", \"IP:PORT\", \"[IPv6]:PORT\" or \"localhost:PORT\""
        )
    };
    let parse_port = |port: &str| {
        port.parse::<u16>()
            .map_err(|_| invalid(&format!("bad port {port:?}")))
    };
    if let Some(port) = text.strip_prefix(':') {
        return Ok(SocketAddr::from(([0, 0, 0, 0], parse_port(port)?)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match text.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
            Ok(SocketAddr::from(([127, 0, 0, 1], parse_port(port)?)))
        }
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            parse_port(port)?;
            Err(invalid(
                "hostnames other than localhost are not resolved; use an IP address",
            ))
        }
        _ => Err(invalid("not a host:port pair")),
    }
}

/// The connect target and request rewriting derived from a backend URL.
pub(super) struct Target {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) host_header: String,
    pub(super) path_prefix: String,
    pub(super) https: bool,
}

/// Parses `http[s]://host[:port][/prefix]`. Hand-rolled because the accepted form is this small
/// and a URL crate would accept (and need rejecting) much more.
pub(super) fn parse_backend_url(url: &str) -> Result<Target, String> {
    let expected =
        "expected a URL like \"http://host:port\", \"https://host\" or \"http://host:port/prefix\"";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("invalid URL {url:?}: {expected}"));
    };
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => {
            return Err(format!(
                "unsupported scheme {scheme:?} in {url:?}; {expected}"
            ))
        }
    };
    if url.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid URL {url:?}: contains whitespace"));
    }
    if rest.contains(['?', '#']) {
        return Err(format!(
            "invalid URL {url:?}: a backend URL cannot have a query or fragment"
        ));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(format!(
            "invalid URL {url:?}: credentials in backend URLs are not supported"
        ));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("invalid URL {url:?}: unclosed `[` in IPv6 address"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("invalid URL {url:?}: bad IPv6 address {ip:?}"))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| {
                format!("invalid URL {url:?}: unexpected {after:?} after the IPv6 address")
            })?),
        };
        (ip, port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            let hint = if port.is_some_and(|p| p.contains(':')) {
                " (put IPv6 addresses in brackets: http://[::1]:8000)"
            } else {
                ""
            };
            return Err(format!("invalid URL {url:?}: bad host{hint}"));
        }
        (host, port)
    };
    let port = match port {
        None if https => 443,
        None => 80,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("invalid URL {url:?}: bad port {port:?}"))?,
    };
    Ok(Target {
        host: host.to_string(),
        port,
        host_header: authority.to_string(),
        path_prefix: path.trim_end_matches('/').to_string(),
        https,
    })
}

/// A CIDR block, or a plain address as a single-host block.
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        let listen = |text: &str| parse_listen(text).map(|a| a.to_string());
        assert_eq!(listen(":8000").unwrap(), "0.0.0.0:8000");
        assert_eq!(listen("127.0.0.1:9000").unwrap(), "127.0.0.1:9000");
        assert_eq!(listen("[::1]:8000").unwrap(), "[::1]:8000");
        assert_eq!(listen("localhost:8000").unwrap(), "127.0.0.1:8000");
        assert!(listen("vllm:8000").unwrap_err().contains("not resolved"));
        for bad in ["8000", ":http", ":70000", "", "1.2.3.4"] {
            assert!(listen(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backend_urls() {
        let target = |url: &str| {
            parse_backend_url(url).map(|t| (t.host, t.port, t.host_header, t.path_prefix))
        };
        let owned = |h: &str, p: u16, hh: &str, pp: &str| {
            (h.to_string(), p, hh.to_string(), pp.to_string())
        };
        assert_eq!(
            target("http://vllm:8000"),
            Ok(owned("vllm", 8000, "vllm:8000", ""))
        );
        assert_eq!(target("http://vllm"), Ok(owned("vllm", 80, "vllm", "")));
        assert_eq!(
            target("http://10.1.2.3:9000/openai/"),
            Ok(owned("10.1.2.3", 9000, "10.1.2.3:9000", "/openai"))
        );
        assert_eq!(
            target("http://[::1]:8001"),
            Ok(owned("::1", 8001, "[::1]:8001", ""))
        );
        assert_eq!(target("HTTP://h/"), Ok(owned("h", 80, "h", "")));
        assert_eq!(
            target("https://api.openai.com/v1"),
            Ok(owned("api.openai.com", 443, "api.openai.com", "/v1"))
        );
        assert!(parse_backend_url("HTTPS://h:8443").unwrap().https);
        assert!(!parse_backend_url("http://h").unwrap().https);
        assert!(target("http://::1:8000").unwrap_err().contains("brackets"));
        for bad in [
            "vllm:8000",
            "ftp://h",
            "http://",
            "http://:80",
            "http://h:0",
            "http://h:99999",
            "http://h:",
            "http://u:p@h",
            "http://h/?q=1",
            "http://h h",
            "http://[::1",
            "http://[zz]:1",
            "http://[::1]x",
        ] {
            assert!(target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nets() {
        assert!(parse_net("10.0.0.0/8")
            .unwrap()
            .contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
        assert!(parse_net(" 192.168.1.7 ").is_some());
        assert!(parse_net("::1").is_some());
        assert!(parse_net("nope").is_none());
    }
}
