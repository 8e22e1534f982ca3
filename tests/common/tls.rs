//! Certificates made by the tests (rcgen): a root CA, an intermediate it signs, and server or
//! client certificates the intermediate signs, written as PEM files (chain files hold the
//! certificate then the intermediate, as a real deployment's do); and a blocking rustls client to
//! talk https to the gateway or the simulator.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::{unique_path, Client};

/// A test PKI in its own directory, removed when dropped.
pub struct Pki {
    pub dir: PathBuf,
    /// The root CA certificate (PEM): what clients and servers trust.
    pub ca: PathBuf,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = unique_path(name);
        std::fs::create_dir_all(&dir).expect("create the PKI directory");
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} root")),
            KeyPair::generate().expect("root key"),
        )
        .expect("root CA");
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} intermediate")),
            KeyPair::generate().expect("intermediate key"),
            &root,
        )
        .expect("intermediate CA");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, root.pem()).expect("write the CA");
        Pki {
            dir,
            ca,
            intermediate,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), for a server or a client:
    /// `(chain file, key file)` named after `file`.
    pub fn issue(&self, file: &str, names: &[&str], client: bool) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, file.to_string());
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.intermediate)
            .expect("sign the leaf");
        let chain = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&chain, cert.pem() + &self.intermediate.pem()).expect("write chain");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (chain, key_path)
    }

    /// A client config trusting this PKI's root, presenting `identity` (chain, key) if given.
    pub fn client_config(&self, identity: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
        client_config(&self.ca, identity)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client config trusting the CA file `ca`, ALPN `http/1.1`, TLS 1.3 or 1.2.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    versioned_client_config(ca, identity, rustls::DEFAULT_VERSIONS)
}

/// [`client_config`] limited to `versions`.
pub fn versioned_client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let certs = CertificateDer::pem_file_iter(chain)
                .expect("read chain")
                .collect::<Result<Vec<_>, _>>()
                .expect("chain certs");
            let key = PrivateKeyDer::from_pem_file(key).expect("read key");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client identity")
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connects to `addr` and completes the handshake, verifying the server as `name`.
pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>, name: &str) -> io::Result<TlsStream> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// A keep-alive [`Client`] over a fresh TLS connection; panics when the handshake fails.
pub fn client(addr: SocketAddr, config: Arc<ClientConfig>) -> Client<TlsStream> {
    let stream =
        connect(addr, config, "localhost").unwrap_or_else(|e| panic!("TLS to {addr}: {e}"));
    Client::over(stream)
}
