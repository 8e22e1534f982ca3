//! The TLS sections: the listener's (`tls`: clients connect with https) and each https backend's
//! (`backends[].tls`). Paths only: the files are read where the rustls configs are built
//! ([`crate::tls`]), at start and on every reload, never here.

use std::path::PathBuf;

use serde::Deserialize;

/// The listener's TLS (key `tls`): certificate chain and key, and the CA that client
/// certificates must chain to when clients must present one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// PEM: the server certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key.
    pub key: PathBuf,
    /// PEM CA certificates; when set, every client must present a certificate they signed.
    pub client_ca: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawListenerTls {
    pub(super) cert: String,
    pub(super) key: String,
    pub(super) client_ca: Option<String>,
}

fn path(text: Option<String>) -> Option<PathBuf> {
    text.filter(|t| !t.trim().is_empty()).map(PathBuf::from)
}

/// The listener's TLS (`None`: neither `cert` nor `key` given, plain HTTP), or the problems
/// with it as `(key, message)`.
pub(super) fn build_listener(
    raw: RawListenerTls,
) -> Result<Option<ListenerTls>, Vec<(&'static str, String)>> {
    let cert = path(Some(raw.cert));
    let key = path(Some(raw.key));
    let client_ca = path(raw.client_ca);
    if cert.is_none() && key.is_none() && client_ca.is_none() {
        return Ok(None);
    }
    let mut problems = Vec::new();
    if cert.is_none() {
        problems.push((
            "tls.cert",
            "required: the PEM certificate chain file".to_string(),
        ));
    }
    if key.is_none() {
        problems.push(("tls.key", "required: the PEM private key file".to_string()));
    }
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(ListenerTls {
            cert,
            key,
            client_ca,
        })),
        _ => Err(problems),
    }
}

/// How the gateway talks TLS to one https backend (key `backends[].tls`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendTls {
    /// PEM CA certificates the backend's certificate must chain to; `None`: the Mozilla roots
    /// (webpki-roots) built into the binary.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain and key presented to the backend (mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name verified in the backend's certificate (and sent as SNI); `None`: the URL's host.
    pub server_name: Option<String>,
    /// Accept any certificate (signatures are still checked): testing only, logged as a warning.
    pub insecure_skip_verify: bool,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawBackendTls {
    pub(super) ca: String,
    pub(super) cert: String,
    pub(super) key: String,
    pub(super) server_name: String,
    pub(super) insecure_skip_verify: bool,
}

/// One backend's TLS: `Some` for an https URL (defaults when the section is absent), `None` for
/// http; or the problems as `(key under backends[i].tls, message)`.
pub(super) fn build_backend(
    raw: Option<RawBackendTls>,
    https: bool,
) -> Result<Option<BackendTls>, Vec<(&'static str, String)>> {
    let raw = raw.unwrap_or_default();
    let tls = BackendTls {
        ca: path(Some(raw.ca)),
        cert: path(Some(raw.cert)),
        key: path(Some(raw.key)),
        server_name: Some(raw.server_name.trim().to_string()).filter(|n| !n.is_empty()),
        insecure_skip_verify: raw.insecure_skip_verify,
    };
    if !https {
        return if tls == BackendTls::default() {
            Ok(None)
        } else {
            Err(vec![(
                "",
                "only applies to https:// backend URLs".to_string(),
            )])
        };
    }
    let mut problems = Vec::new();
    match (&tls.cert, &tls.key) {
        (Some(_), None) => problems.push(("key", "required with `cert`".to_string())),
        (None, Some(_)) => problems.push(("cert", "required with `key`".to_string())),
        _ => {}
    }
    if let Some(name) = &tls.server_name {
        if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
            problems.push((
                "server_name",
                format!("{name:?} is not a DNS name or IP address"),
            ));
        }
    }
    if problems.is_empty() {
        Ok(Some(tls))
    } else {
        Err(problems)
    }
}
