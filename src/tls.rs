//! TLS to upstreams: the rustls client settings of one upstream, built (files read and parsed)
//! when the configuration is built, and the words a failed handshake is logged with.
//!
//! A leaf (layer 1): it knows files and rustls, nothing of endpoints or requests. `dial.rs`
//! uses a [`ClientTls`] to connect; `config/` builds one per upstream, so a CA, certificate or
//! key file that is missing or does not parse refuses the configuration (at start-up and on
//! reload, where the old one keeps serving), naming the field, the file and the error.
//!
//! Crypto is `ring` (the provider reqwest already builds here; aws-lc-rs would need cmake and
//! NASM). Verification is on, always: against `tls_ca_file` when given, else against the
//! Mozilla root set that `webpki-roots` ships (the agent reads no system store, so it behaves
//! the same on every host).
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};

/// ALPN name of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN name of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// What an upstream's TLS is made from, as configured (`tls_*` keys of `[[upstream]]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// SNI and the name the certificate must carry (`tls_server_name`; default: the service).
    pub server_name: String,
    /// Trust only these roots (`tls_ca_file`, PEM); `None`: the webpki-roots set.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain for mTLS (`tls_cert_file`, PEM).
    pub cert_file: Option<PathBuf>,
    /// Its private key (`tls_key_file`, PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// ALPN protocols offered, in order of preference.
    pub alpn: Vec<Vec<u8>>,
}

/// Why an upstream's TLS settings cannot be used; names the field, the file and the error.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field} = {path:?}: {why}")]
    File {
        field: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("tls_server_name = {0:?}: not a DNS name or IP address")]
    ServerName(String),
    #[error("{0} is set without {1}: a client certificate needs both")]
    Half(&'static str, &'static str),
    #[error("tls_cert_file / tls_key_file: {0}")]
    Pair(String),
}

/// A built client TLS setup: the rustls configuration and the name to verify. Compares equal
/// when it was built from the same settings and the same file contents, so a reload that
/// changes a certificate file's contents replaces the upstream's settings.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    settings: TlsSettings,
    /// The bytes of the files read, for equality.
    read: Arc<[u8]>,
    /// Unique per build (not part of equality): pooled connections remember the setup they
    /// were made with, so a changed one never reuses them.
    id: u64,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("settings", &self.settings)
            .finish()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.read == other.read
    }
}

/// The crypto provider every upstream TLS configuration uses.
fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The webpki-roots set, built once.
fn default_roots() -> Arc<RootCertStore> {
    static R: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    R.get_or_init(|| {
        Arc::new(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    })
    .clone()
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        field,
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::File {
        field,
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

impl ClientTls {
    /// Reads the files and builds the rustls configuration.
    pub fn build(settings: &TlsSettings) -> Result<ClientTls, TlsError> {
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|_| TlsError::ServerName(settings.server_name.clone()))?;
        let mut read_bytes = Vec::new();
        let roots = match &settings.ca_file {
            None => default_roots(),
            Some(path) => {
                let pem = read("tls_ca_file", path)?;
                let mut store = RootCertStore::empty();
                for cert in certs("tls_ca_file", path, &pem)? {
                    store.add(cert).map_err(|e| TlsError::File {
                        field: "tls_ca_file",
                        path: path.clone(),
                        why: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                read_bytes.extend_from_slice(&pem);
                Arc::new(store)
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&settings.cert_file, &settings.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(TlsError::Half("tls_cert_file", "tls_key_file")),
            (None, Some(_)) => return Err(TlsError::Half("tls_key_file", "tls_cert_file")),
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read("tls_cert_file", cert_path)?;
                let chain = certs("tls_cert_file", cert_path, &cert_pem)?;
                let key_pem = read("tls_key_file", key_path)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
                    field: "tls_key_file",
                    path: key_path.clone(),
                    why: format!("no PEM private key in it: {e}"),
                })?;
                read_bytes.extend_from_slice(&cert_pem);
                read_bytes.extend_from_slice(&key_pem);
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Pair(e.to_string()))?
            }
        };
        config.alpn_protocols = settings.alpn.clone();
        static BUILT: AtomicU64 = AtomicU64::new(1);
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
            settings: settings.clone(),
            read: read_bytes.into(),
            id: BUILT.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Unique to this build (0 is never one: it stands for clear text).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }
}

/// Why a handshake failed, in the words an operator looks for (unknown CA, name mismatch,
/// expired), followed by rustls's own.
pub fn handshake_reason(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    let what = match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown CA",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "name mismatch"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate not yet valid"
            }
            CertificateError::Revoked => "certificate revoked",
            CertificateError::BadSignature => "bad certificate signature",
            _ => "invalid certificate",
        },
        rustls::Error::AlertReceived(_) => "refused by the upstream",
        rustls::Error::NoApplicationProtocol => "no common ALPN protocol",
        _ => "handshake failed",
    };
    format!("{what}: {tls}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TlsSettings {
        TlsSettings {
            server_name: "pay".into(),
            ..Default::default()
        }
    }

    #[test]
    fn default_roots_and_equality() {
        let a = ClientTls::build(&settings()).unwrap();
        assert_eq!(a, ClientTls::build(&settings()).unwrap());
        let mut other = settings();
        other.alpn = vec![ALPN_H2.to_vec()];
        assert_ne!(a, ClientTls::build(&other).unwrap());
        assert_eq!(
            ClientTls::build(&other).unwrap().config.alpn_protocols,
            [b"h2"]
        );
    }

    #[test]
    fn bad_files_and_names_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for (path, why) in [
            (&missing, "No such file"),
            (&garbage, "no PEM certificate"),
            (&broken, "not a PEM certificate file"),
        ] {
            let mut s = settings();
            s.ca_file = Some(path.clone());
            let msg = ClientTls::build(&s).unwrap_err().to_string();
            assert!(msg.starts_with("tls_ca_file = "), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(why), "{msg}");
        }
        let mut s = settings();
        s.cert_file = Some(garbage.clone());
        let msg = ClientTls::build(&s).unwrap_err().to_string();
        assert!(
            msg.contains("tls_cert_file") && msg.contains("tls_key_file"),
            "{msg}"
        );
        s.key_file = Some(missing.clone());
        s.cert_file = None;
        let msg = ClientTls::build(&s).unwrap_err().to_string();
        assert!(
            msg.starts_with("tls_key_file is set without tls_cert_file"),
            "{msg}"
        );
        let mut s = settings();
        s.server_name = "not a name!".into();
        let msg = ClientTls::build(&s).unwrap_err().to_string();
        assert!(
            msg.contains("tls_server_name") && msg.contains("not a name!"),
            "{msg}"
        );
    }
}
