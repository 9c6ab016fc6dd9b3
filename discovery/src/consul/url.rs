//! A Consul source from its URL and Consul's environment variables (see the module doc of
//! [`super`] for what each one does).
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ::url::Url;
use moka::notification::RemovalCause;
use reqwest::header::HeaderValue;
use tokio::sync::mpsc;

use super::*;
use crate::http::{self, ClientOptions, TlsNames, TlsOptions};
use crate::{join_host_port, SourceError};

/// Consul's TLS variables, as [`http::client`] names them in messages.
const TLS_NAMES: TlsNames = TlsNames {
    ca_file: ENV_CACERT,
    client_cert: ENV_CLIENT_CERT,
    client_key: ENV_CLIENT_KEY,
};

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "t" | "true" | "yes" | "on"
    )
}

/// A server from a host and an optional port; `base` is set once the scheme is final (the
/// environment may still turn HTTPS on).
fn server(host: &str, port: Option<u16>, https: bool) -> Server {
    let port = port.unwrap_or(if https { 8501 } else { 8500 });
    let authority = if host.starts_with('[') {
        format!("{host}:{port}")
    } else {
        join_host_port(host, port)
    };
    Server {
        base: String::new(),
        authority,
    }
}

/// A `server=` value: `host` or `host:port`, nothing else.
fn parse_server(value: &str, https: bool) -> Result<Server, String> {
    if value.is_empty() {
        return Err("server= needs host[:port]".into());
    }
    if value.contains("://") || value.contains('/') || value.contains('@') {
        return Err(format!(
            "server={value:?}: expected host[:port] (the scheme is the URL's, no path, no credentials)"
        ));
    }
    // A scheme without a default port, so an explicit `:80` is kept.
    let u =
        Url::parse(&format!("consul://{value}")).map_err(|e| format!("server={value:?}: {e}"))?;
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("server={value:?}: no host"))?;
    if !u.path().is_empty() || u.query().is_some() || u.fragment().is_some() {
        return Err(format!("server={value:?}: expected host[:port]"));
    }
    let port = u.port();
    Ok(server(host, port, https))
}

impl ConsulDiscovery {
    /// From `consul://…` or `consul+https://…`, reading Consul's variables from the environment.
    pub fn from_url(url: &str) -> Result<Self, SourceError> {
        Self::from_url_with_env(url, |k| std::env::var(k).ok())
    }

    /// As [`ConsulDiscovery::from_url`], reading variables through `env`.
    pub fn from_url_with_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SourceError> {
        let invalid = |reason: String| SourceError::Invalid {
            url: url.to_string(),
            reason,
        };
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(SourceError::Invalid {
                url: "consul://<redacted>".into(),
                reason: format!("no credentials in the URL: set {ENV_TOKEN} instead"),
            });
        }
        let mut https = match parsed.scheme() {
            "consul" => false,
            "consul+https" => true,
            other => {
                return Err(invalid(format!(
                    "scheme {other:?}: expected consul or consul+https"
                )))
            }
        };
        if env(ENV_SSL).is_some_and(|v| truthy(&v)) {
            https = true;
        }
        let listed: Vec<String> = parsed
            .query_pairs()
            .filter(|(k, _)| k == "server")
            .map(|(_, v)| v.trim().to_string())
            .collect();
        let host = parsed.host_str().filter(|h| !h.is_empty());
        let mut servers = Vec::new();
        match host {
            Some(h) => servers.push(server(h, parsed.port(), https)),
            // `consul://?server=a&server=b`: those servers only, not CONSUL_HTTP_ADDR.
            None if !listed.is_empty() => {}
            None => {
                let addr = env(ENV_ADDR).unwrap_or_else(|| DEFAULT_ADDR.to_string());
                let rest = if let Some(r) = addr.strip_prefix("https://") {
                    https = true;
                    r
                } else if let Some(r) = addr.strip_prefix("http://") {
                    r
                } else if addr.contains("://") {
                    return Err(invalid(format!(
                        "{ENV_ADDR}={addr:?}: only http://, https:// or host:port are supported"
                    )));
                } else {
                    addr.as_str()
                };
                let u = Url::parse(&format!("http://{}", rest.trim_end_matches('/')))
                    .map_err(|e| invalid(format!("{ENV_ADDR}={addr:?}: {e}")))?;
                let h = u
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| invalid(format!("{ENV_ADDR}={addr:?}: no host")))?;
                servers.push(server(h, u.port(), https));
            }
        }
        for value in &listed {
            let s = parse_server(value, https).map_err(&invalid)?;
            if servers.contains(&s) {
                return Err(invalid(format!(
                    "server={value:?}: {} is already listed",
                    s.authority
                )));
            }
            servers.push(s);
        }
        let mut dc = None;
        let mut tags = Vec::new();
        let mut near = None;
        let mut wait = DEFAULT_WAIT;
        let mut idle_ttl = DEFAULT_IDLE_TTL;
        let mut pinned: Vec<String> = Vec::new();
        for (key, value) in parsed.query_pairs() {
            let value = value.trim().to_string();
            match key.as_ref() {
                "dc" => dc = Some(value).filter(|v| !v.is_empty()),
                "tag" if !value.is_empty() => tags.push(value),
                "tag" => return Err(invalid("tag= needs a value".into())),
                "near" => near = Some(value).filter(|v| !v.is_empty()),
                "wait" => {
                    wait = crate::parse_duration(&value, MIN_DURATION)
                        .map_err(|e| invalid(format!("wait={value:?}: {e}")))?;
                    if wait > MAX_WAIT {
                        return Err(invalid(format!(
                            "wait={value:?}: Consul caps the wait at {MAX_WAIT:?}"
                        )));
                    }
                }
                "idle_ttl" => {
                    idle_ttl = crate::parse_duration(&value, MIN_DURATION)
                        .map_err(|e| invalid(format!("idle_ttl={value:?}: {e}")))?
                }
                "server" => {} // read above
                "service" => {
                    for name in value.split(',').filter(|n| !n.trim().is_empty()) {
                        let n = normalize(name).ok_or_else(|| {
                            invalid(format!("service={name:?}: not a Consul service name"))
                        })?;
                        if !pinned.contains(&n) {
                            pinned.push(n);
                        }
                    }
                }
                other => {
                    return Err(invalid(format!(
                    "unknown parameter {other:?} (known: server, dc, tag, near, wait, idle_ttl, service)"
                )))
                }
            }
        }
        let token = match env(ENV_TOKEN) {
            Some(t) => Some(t),
            None => match env(ENV_TOKEN_FILE) {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| invalid(format!("{ENV_TOKEN_FILE}={path:?}: {e}")))?,
                ),
                None => None,
            },
        };
        let token = match token.map(|t| t.trim().to_string()) {
            Some(t) if !t.is_empty() => {
                let mut v = HeaderValue::from_str(&t)
                    .map_err(|_| invalid(format!("{ENV_TOKEN}: not a valid header value")))?;
                v.set_sensitive(true);
                Some(Token(v))
            }
            _ => None,
        };
        let tls = https.then(|| TlsOptions {
            ca_file: env(ENV_CACERT).map(PathBuf::from),
            client_cert: env(ENV_CLIENT_CERT).map(PathBuf::from),
            client_key: env(ENV_CLIENT_KEY).map(PathBuf::from),
            insecure: env(ENV_SSL_VERIFY).is_some_and(|v| !truthy(&v)),
            ..TlsOptions::new(TLS_NAMES)
        });
        let opts = ClientOptions {
            connect_timeout: CONNECT_TIMEOUT,
            timeout: None,
        };
        let client = http::client(opts, tls.as_ref()).map_err(|source| SourceError::Client {
            url: url.to_string(),
            source,
        })?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let listener_tx = cmd_tx.clone();
        let wanted = moka::sync::Cache::builder()
            .max_capacity(MAX_WATCHED)
            .time_to_idle(idle_ttl)
            .eviction_listener(move |name: Arc<String>, generation: u64, cause| {
                if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                    let _ = listener_tx.send(Cmd::Idle {
                        name: (*name).clone(),
                        generation,
                    });
                }
            })
            .build();
        let scheme = if https { "https" } else { "http" };
        for s in &mut servers {
            s.base = format!("{scheme}://{}", s.authority);
        }
        Ok(ConsulDiscovery {
            servers,
            current: AtomicUsize::new(0),
            https,
            token,
            dc,
            tags,
            near,
            wait,
            idle_ttl,
            pinned,
            client,
            catalog: RwLock::new(None),
            watching: AtomicUsize::new(0),
            wanted,
            generation: AtomicU64::new(1),
            cmd_tx,
            cmd_rx: Mutex::new(Some(cmd_rx)),
        })
    }

    pub fn wait(&self) -> Duration {
        self.wait
    }

    pub fn idle_ttl(&self) -> Duration {
        self.idle_ttl
    }

    /// `http(s)://host:port` of the Consul HTTP API calls go to now.
    pub fn base(&self) -> &str {
        &self.server().1.base
    }

    /// `http(s)://host:port` of every server, in failover order.
    pub fn servers(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.base.clone()).collect()
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Timeout of one blocking call: the wait, Consul's jitter (wait/16) and a margin.
    pub fn call_timeout(&self) -> Duration {
        self.wait + self.wait / 16 + TIMEOUT_MARGIN
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use super::*;

    pub(in crate::consul) fn src(
        url: &str,
        env: &[(&str, &str)],
    ) -> Result<ConsulDiscovery, SourceError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConsulDiscovery::from_url_with_env(url, move |k| env.get(k).cloned())
    }

    #[test]
    fn url_and_environment() {
        let c = src("consul://127.0.0.1:18500?dc=eu1&tag=a&tag=b&near=_agent&wait=2s&idle_ttl=1m&service=Web,api", &[("CONSUL_HTTP_TOKEN", "s3cret")]).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:18500");
        assert_eq!(c.wait(), Duration::from_secs(2));
        assert_eq!(c.idle_ttl(), Duration::from_secs(60));
        assert_eq!(
            c.call_timeout(),
            Duration::from_millis(2000 + 125) + TIMEOUT_MARGIN
        );
        assert!(c.has_token());
        assert_eq!(c.pinned, vec!["web", "api"]);
        let d = c.describe();
        assert!(
            !d.contains("s3cret") && !format!("{c:?}").contains("s3cret"),
            "{d}"
        );
        assert!(
            d.starts_with("consul://127.0.0.1:18500/?dc=eu1&tag=a&tag=b&near=_agent"),
            "{d}"
        );

        // No host: CONSUL_HTTP_ADDR, with its scheme; defaults otherwise.
        let c = src("consul://", &[("CONSUL_HTTP_ADDR", "https://consul.local")]).unwrap();
        assert_eq!(c.base(), "https://consul.local:8501");
        assert!(c
            .describe()
            .starts_with("consul+https://consul.local:8501/"));
        let c = src("consul://", &[]).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:8500");
        assert_eq!(c.wait(), DEFAULT_WAIT);
        let c = src("consul://?dc=x", &[("CONSUL_HTTP_ADDR", "10.0.0.1:9500")]).unwrap();
        assert_eq!(c.base(), "http://10.0.0.1:9500");
        let c = src("consul://h:1", &[("CONSUL_HTTP_SSL", "true")]).unwrap();
        assert_eq!(c.base(), "https://h:1");
        let c = src("consul+https://[::1]:8501", &[]).unwrap();
        assert_eq!(c.base(), "https://[::1]:8501");

        for bad in [
            "consul://h?wait=11m",
            "consul://h?wait=5x",
            "consul://h?bogus=1",
            "consul://h?service=a/b",
            "consul://h?tag=",
        ] {
            assert!(
                matches!(src(bad, &[]), Err(SourceError::Invalid { .. })),
                "{bad}"
            );
        }
        // Further servers, in failover order; with no host, the server= list only.
        let c = src("consul://a:1?server=b&server=[::1]:3&server=c:80", &[]).unwrap();
        assert_eq!(
            c.servers(),
            [
                "http://a:1",
                "http://b:8500",
                "http://[::1]:3",
                "http://c:80"
            ]
        );
        assert!(
            c.describe().starts_with(
                "consul://a:1/?server=b%3A8500&server=%5B%3A%3A1%5D%3A3&server=c%3A80&wait="
            ),
            "{}",
            c.describe()
        );
        let c = src(
            "consul://?server=b:2&server=c:3",
            &[("CONSUL_HTTP_ADDR", "x:9")],
        )
        .unwrap();
        assert_eq!(c.servers(), ["http://b:2", "http://c:3"]);
        let c = src("consul+https://a?server=b", &[]).unwrap();
        assert_eq!(c.servers(), ["https://a:8501", "https://b:8501"]);
        for (bad, says) in [
            ("consul://a?server=", "server= needs host[:port]"),
            (
                "consul://a?server=http://b:1",
                "server=\"http://b:1\": expected host[:port]",
            ),
            (
                "consul://a?server=b:1/x",
                "server=\"b:1/x\": expected host[:port]",
            ),
            ("consul://a?server=u@b", "no credentials"),
            ("consul://a?server=b:99999", "server=\"b:99999\""),
            (
                "consul://a:1?server=a:1",
                "server=\"a:1\": a:1 is already listed",
            ),
        ] {
            let err = src(bad, &[]).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }

        let err = src("consul://tok@h:1", &[]).unwrap_err().to_string();
        assert!(!err.contains("tok"), "{err}");
        assert!(src("consul://", &[("CONSUL_HTTP_ADDR", "unix:///tmp/c.sock")]).is_err());
        assert!(src("consul+https://h", &[("CONSUL_CACERT", "/nonexistent.pem")]).is_err());
        assert!(src("consul+https://h", &[("CONSUL_CLIENT_CERT", "/x.pem")]).is_err());
    }
}
