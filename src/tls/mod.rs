//! TLS: the rustls configs built from the PEM files the config names (the listener's, and each
//! https backend's), and TLS over monoio sockets ([`stream`]).
//!
//! Building reads files, so it runs at start and on the reloader thread (a SIGHUP re-reads the
//! certificates, and new handshakes use them), never on a worker. The crypto provider is ring,
//! TLS 1.3 and 1.2, ALPN `http/1.1` (the gateway speaks HTTP/1.1 on both sides).

pub mod stream;

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::{BackendTls, ListenerTls};

pub use stream::{Reader, Writer};

const ALPN_HTTP1: &[u8] = b"http/1.1";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file, in order; at least one.
pub fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{key}: cannot read certificates from {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("{key}: no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// The first private key of a PEM file.
pub fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "{key}: cannot read a private key from {}: {e}",
            path.display()
        )
    })
}

/// A root store of the CA certificates in a PEM file.
pub fn load_roots(key: &str, path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The listener's config: its certificate chain and key, and client certificates required
/// when `client_ca` is set.
pub fn server_config(tls: &ListenerTls) -> Result<Arc<ServerConfig>, String> {
    let certs = load_certs("tls.cert", &tls.cert)?;
    let key = load_key("tls.key", &tls.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = load_roots("tls.client_ca", path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls.client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.key: does not match tls.cert, or is unusable: {e}"))?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// How the gateway connects to one https backend: the client config and the name it verifies.
#[derive(Debug)]
pub struct Upstream {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// The client config for backend `index` (URL host `host`): its CA or the Mozilla roots, its
/// client certificate, its server name. Sessions are resumed from an in-memory cache, so a new
/// pooled connection to a backend mostly skips the full handshake.
pub fn upstream(index: usize, host: &str, tls: &BackendTls) -> Result<Upstream, String> {
    let at = |key: &str| format!("backends[{index}].tls.{key}");
    let name = tls.server_name.as_deref().unwrap_or(host).to_string();
    let name = ServerName::try_from(name).map_err(|e| format!("{}: {e}", at("server_name")))?;
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| format!("backends[{index}].tls: {e}"))?;
    let builder = if tls.insecure_skip_verify {
        tracing::warn!(
            backend = index,
            "backends[{index}].tls.insecure_skip_verify: the backend's certificate is not verified"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let roots = match &tls.ca {
            Some(path) => load_roots(&at("ca"), path)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        builder.with_root_certificates(roots)
    };
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(&at("cert"), cert)?, load_key(&at("key"), key)?)
            .map_err(|e| format!("{}: does not match the certificate: {e}", at("key")))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Upstream {
        config: Arc::new(config),
        name,
    })
}

/// `insecure_skip_verify`: any certificate is accepted; the handshake signatures are still
/// checked, so the peer holds the key of the certificate it sent.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
