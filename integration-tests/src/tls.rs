//! TLS for tests: certificates generated on the spot with `rcgen` (a CA and leaves it signs,
//! written as PEM files the agent reads), and a real HTTPS backend (tokio-rustls under hyper's
//! HTTP/1 server, or its HTTP/2 server when ALPN settled on `h2`) that can require a client
//! certificate.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// A certificate authority made for one test, its certificate written to `<dir>/<name>-ca.pem`.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub name: String,
    pub pem_path: PathBuf,
    dir: PathBuf,
}

/// A leaf certificate and key, as PEM text and as the files written.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem_path, issuer.pem()).unwrap();
        Ca {
            issuer,
            name: name.to_string(),
            pem_path,
            dir: dir.to_path_buf(),
        }
    }

    /// A leaf for `names` (DNS names or IP addresses), valid now.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        self.leaf_with(file, names, |_| {})
    }

    /// A leaf whose validity ended in 2001.
    pub fn expired_leaf(&self, file: &str, names: &[&str]) -> Leaf {
        self.leaf_with(file, names, |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        })
    }

    fn leaf_with(
        &self,
        file: &str,
        names: &[&str],
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}-key.pem"));
        std::fs::write(&cert_path, &cert_pem).unwrap();
        std::fs::write(&key_path, &key_pem).unwrap();
        Leaf {
            cert_pem,
            key_pem,
            cert_path,
            key_path,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls acceptor serving `leaf`, offering `alpn`; with `client_ca`, a client certificate
/// signed by it is required.
pub fn acceptor(leaf: &Leaf, client_ca: Option<&Ca>, alpn: &[&[u8]]) -> TlsAcceptor {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

/// A real HTTPS backend on 127.0.0.1: answers every request with `x-backend: <name>`,
/// `x-sni: <the SNI the client sent>`, `x-version: <the request's HTTP version>` (`HTTP/2.0`
/// when ALPN chose `h2`, which it serves with hyper's HTTP/2 server) and body `<name> <path and query>`;
/// counts handshakes that completed and failed. A request for `/hold` is answered only once
/// the test [`TlsBackend::release`]s it, so requests can be held open together.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub handshakes: Arc<AtomicU64>,
    pub failed_handshakes: Arc<AtomicU64>,
    /// Most requests seen open at once on one connection.
    pub peak_streams: Arc<AtomicU64>,
    held: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsBackend {
    pub async fn start(name: &str, acceptor: TlsAcceptor) -> TlsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicU64::new(0));
        let failed_handshakes = Arc::new(AtomicU64::new(0));
        let peak_streams = Arc::new(AtomicU64::new(0));
        let held = Arc::new(Semaphore::new(0));
        let (ok, failed, peak, hold, name) = (
            handshakes.clone(),
            failed_handshakes.clone(),
            peak_streams.clone(),
            held.clone(),
            name.to_string(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, ok, failed, peak, hold, name) = (
                    acceptor.clone(),
                    ok.clone(),
                    failed.clone(),
                    peak.clone(),
                    hold.clone(),
                    name.clone(),
                );
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    ok.fetch_add(1, Ordering::SeqCst);
                    let sni = stream.get_ref().1.server_name().unwrap_or("").to_string();
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    // Requests open on this connection now.
                    let open = Arc::new(AtomicU64::new(0));
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (name, sni, open, peak, hold) = (
                            name.clone(),
                            sni.clone(),
                            open.clone(),
                            peak.clone(),
                            hold.clone(),
                        );
                        async move {
                            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            if req.uri().path() == "/hold" {
                                hold.acquire().await.unwrap().forget();
                            }
                            open.fetch_sub(1, Ordering::SeqCst);
                            // The path: an HTTP/2 request's URI is absolute.
                            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                            let body = format!("{name} {path}");
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("x-backend", name.as_str())
                                    .header("x-sni", sni.as_str())
                                    .header("x-version", format!("{:?}", req.version()))
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    if h2 {
                        let _ = http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    } else {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
        TlsBackend {
            addr,
            handshakes,
            failed_handshakes,
            peak_streams,
            held,
            task,
        }
    }

    /// Lets `n` held `/hold` requests answer.
    pub fn release(&self, n: usize) {
        self.held.add_permits(n);
    }

    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }

    pub fn failed_handshakes(&self) -> u64 {
        self.failed_handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
