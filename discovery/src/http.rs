//! What the HTTP adapters (Consul, Eureka) share: one way to build their client, with the same
//! TLS options for every one of them ([`TlsOptions`]), and classifying a failed call.
//!
//! Each adapter decides where its options come from (Consul from its environment variables,
//! Eureka from URL query keys) and names them by that origin, so an error says which setting to
//! fix: `CONSUL_CACERT="/etc/ca.pem": No such file or directory`, `ca_file="/etc/ca.pem": …`.
use std::error::Error as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::ErrorKind;

/// What an adapter calls each TLS option (environment variables for Consul, URL query keys for
/// Eureka), so messages name the setting to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsNames {
    pub ca_file: &'static str,
    pub client_cert: &'static str,
    pub client_key: &'static str,
}

/// The TLS options every HTTP adapter accepts, applied when it speaks HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub names: TlsNames,
    /// A PEM bundle whose certificates are trusted besides the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM certificate (chain) for client authentication; needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// The PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Accept any server certificate (tests only).
    pub insecure: bool,
}

impl TlsOptions {
    /// No options set, named by `names`.
    pub fn new(names: TlsNames) -> Self {
        TlsOptions {
            names,
            ca_file: None,
            client_cert: None,
            client_key: None,
            insecure: false,
        }
    }
}

/// How an HTTP adapter's client behaves besides TLS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientOptions {
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on a whole call, where the adapter wants one for every call.
    pub timeout: Option<Duration>,
}

/// Why an HTTP client could not be built. The messages name the setting and its value.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{setting}={path:?}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{setting}={path:?}: {source}")]
    Pem {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("{cert}={cert_path:?} with {key}={key_path:?}: {source}")]
    Identity {
        cert: &'static str,
        cert_path: PathBuf,
        key: &'static str,
        key_path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("{cert} and {key} go together")]
    Pair {
        cert: &'static str,
        key: &'static str,
    },
    #[error("cannot build the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// Reads the file of the option `setting`.
fn read(setting: &'static str, path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        setting,
        path: path.clone(),
        source,
    })
}

/// The client of an HTTP adapter: no proxy, Nagle off, the agent's user agent, and, when `tls`
/// is given (the adapter speaks HTTPS), its options. Files are read here, so a bad path fails
/// when the URL is parsed rather than on the first call.
pub(crate) fn client(
    opts: ClientOptions,
    tls: Option<&TlsOptions>,
) -> Result<reqwest::Client, ClientError> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .user_agent(concat!("edge-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(t) = opts.timeout {
        builder = builder.timeout(t);
    }
    if let Some(tls) = tls {
        let names = tls.names;
        if let Some(path) = &tls.ca_file {
            let pem = read(names.ca_file, path)?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| ClientError::Pem {
                    setting: names.ca_file,
                    path: path.clone(),
                    source,
                })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        match (&tls.client_cert, &tls.client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = read(names.client_cert, cert)?;
                pem.push(b'\n');
                pem.extend(read(names.client_key, key)?);
                let id =
                    reqwest::Identity::from_pem(&pem).map_err(|source| ClientError::Identity {
                        cert: names.client_cert,
                        cert_path: cert.clone(),
                        key: names.client_key,
                        key_path: key.clone(),
                        source,
                    })?;
                builder = builder.identity(id);
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::Pair {
                    cert: names.client_cert,
                    key: names.client_key,
                })
            }
        }
        if tls.insecure {
            builder = builder.danger_accept_invalid_certs(true);
        }
    }
    builder.build().map_err(ClientError::Build)
}

/// A failed registry call, classified for `edge_agent_discovery_errors_total`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    /// A call (`what`: how to name it in the message; never a URL with credentials) that got no
    /// usable answer: timeout, unreadable body, or no connection.
    pub fn request(what: &str, e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_decode() || e.is_body() {
            ErrorKind::Parse
        } else {
            ErrorKind::Connect
        };
        Failure {
            kind,
            message: format!("{what}: {}", chain(&e.without_url())),
        }
    }

    /// A non-2xx answer: `auth` for 401 and 403, else `status`, with the start of the body.
    pub async fn status(what: &str, resp: reqwest::Response) -> Self {
        let status = resp.status();
        let kind = match status.as_u16() {
            401 | 403 => ErrorKind::Auth,
            _ => ErrorKind::Status,
        };
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(200).collect();
        Failure {
            kind,
            message: format!("{what}: status {status}: {}", body.trim()),
        }
    }
}

/// Flattens an error and its sources into one line.
pub(crate) fn chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// Whether `url` answers within [`crate::LIVENESS_TIMEOUT`]: any HTTP status is an answer;
/// silence is `timeout`, a refused or broken connection `connect`. `what` names the call.
pub(crate) async fn answers(
    client: &reqwest::Client,
    what: &str,
    url: &str,
) -> Result<(), crate::LivenessError> {
    match client
        .get(url)
        .timeout(crate::LIVENESS_TIMEOUT)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let f = Failure::request(what, e);
            Err((f.kind, f.message))
        }
    }
}

/// The first of `calls` (a name for messages and a URL each, in failover order) that answers
/// ([`answers`]); the last failure when none does. A cluster is live while any member is.
pub(crate) async fn any_answers(
    client: &reqwest::Client,
    calls: impl IntoIterator<Item = (String, String)>,
) -> Result<(), crate::LivenessError> {
    let mut last = (crate::ErrorKind::Connect, "liveness: no server".to_string());
    for (what, url) in calls {
        match answers(client, &what, &url).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A plain HTTP client for adapters that have none of their own (Nacos speaks through its SDK).
pub(crate) fn plain_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: TlsNames = TlsNames {
        ca_file: "ca_file",
        client_cert: "client_cert",
        client_key: "client_key",
    };
    const OPTS: ClientOptions = ClientOptions {
        connect_timeout: Duration::from_secs(1),
        timeout: None,
    };

    /// A file of `discovery/testdata` (see its README).
    pub(crate) fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    #[test]
    fn tls_options_build_or_name_the_setting_at_fault() {
        let mut tls = TlsOptions::new(NAMES);
        tls.ca_file = Some(testdata("test-cert.pem"));
        tls.client_cert = Some(testdata("test-cert.pem"));
        tls.client_key = Some(testdata("test-key.pem"));
        tls.insecure = true;
        client(OPTS, Some(&tls)).expect("real PEM files build");

        let mut bad = tls.clone();
        bad.ca_file = Some("/nonexistent/ca.pem".into());
        let err = client(OPTS, Some(&bad)).unwrap_err();
        assert!(matches!(err, ClientError::Read { .. }), "{err}");
        assert!(err.source().is_some(), "the cause is kept");
        assert!(
            err.to_string()
                .starts_with(r#"ca_file="/nonexistent/ca.pem": "#),
            "{err}"
        );

        let mut bad = tls.clone();
        bad.client_key = Some(testdata("README.md"));
        let err = client(OPTS, Some(&bad)).unwrap_err();
        assert!(matches!(err, ClientError::Identity { .. }), "{err}");
        assert!(
            err.to_string().contains("client_key=") && err.to_string().contains("README.md"),
            "{err}"
        );

        let mut bad = tls.clone();
        bad.client_key = None;
        let err = client(OPTS, Some(&bad)).unwrap_err().to_string();
        assert_eq!(err, "client_cert and client_key go together");
    }
}
