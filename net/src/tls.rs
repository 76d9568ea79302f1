//! TLS for the QUIC transport: the server's certificate, and a client that trusts exactly one.
//!
//! The server uses a configured certificate and key, or a self-signed pair generated on the first
//! start at `<data-dir>/tls/cert.pem` and `key.pem` (the key with mode 0600). Clients pin the
//! certificate file: the server's leaf certificate must be byte-for-byte the pinned one, and the
//! handshake signature is checked against its key. Host names do not matter, so the same file
//! works for `127.0.0.1`, a DNS name, or a load balancer address. There is no mode that skips
//! verification.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The ALPN protocol id of protocol version 1.
pub const ALPN: &[u8] = b"tally/1";

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

/// A TLS set-up failure, naming the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads `cert` (PEM chain) and `key` (PEM private key).
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let certs = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError(format!("{}: no usable private key: {e}", key.display())))?;
    Ok(Identity { certs, key })
}

/// The certificates in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// The paths of the generated pair in `<data-dir>/tls/`.
pub fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// The generated self-signed identity in `<data-dir>/tls/`, made on first use. Returns it and
/// whether it was made now.
pub fn self_signed(data_dir: &Path) -> Result<(Identity, bool), TlsError> {
    let (cert_path, key_path) = generated_paths(data_dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((load_identity(&cert_path, &key_path)?, false));
    }
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError(format!("cannot generate a certificate: {e}")))?;
    let dir = cert_path.parent().expect("a joined path has a parent");
    fs::create_dir_all(dir).map_err(|e| TlsError(format!("{}: {e}", dir.display())))?;
    let write = |path: &Path, bytes: &[u8], mode: u32| -> Result<(), TlsError> {
        let tmp = path.with_extension("pem.tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| TlsError(format!("{}: {e}", tmp.display())))?;
        file.write_all(bytes)
            .and_then(|_| file.sync_all())
            .and_then(|_| fs::rename(&tmp, path))
            .map_err(|e| TlsError(format!("{}: {e}", path.display())))
    };
    // The key first: a crash between the two leaves no certificate, and the next start makes a
    // new pair instead of serving a certificate without its key.
    write(
        &key_path,
        made.signing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write(&cert_path, made.cert.pem().as_bytes(), 0o644)?;
    Ok((load_identity(&cert_path, &key_path)?, true))
}

/// The rustls server configuration: TLS 1.3, ALPN `tally/1`, no client certificates.
pub fn server_crypto(identity: Identity) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.certs, identity.key)
        .map_err(|e| TlsError(format!("the certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The rustls client configuration that trusts exactly `pinned` (the server's leaf certificate).
pub fn client_crypto(pinned: CertificateDer<'static>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert {
        pinned,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The quinn client configuration that trusts exactly `pinned` ([`client_crypto`] over QUIC).
pub fn quic_client_config(
    pinned: CertificateDer<'static>,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_crypto(pinned)?)
        .map_err(|e| TlsError(format!("the TLS configuration cannot serve QUIC: {e}")))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Trusts one certificate, byte for byte, and checks the handshake was signed by its key.
#[derive(Debug)]
struct PinnedCert {
    pinned: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.pinned.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
