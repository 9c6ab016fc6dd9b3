//! A Eureka source from its URL: servers in failover order, interval, timeout, credentials.
use std::path::PathBuf;
use std::time::Duration;

use ::url::Url;

use super::*;
use crate::http::{self, ClientOptions, TlsNames, TlsOptions};
use crate::SourceError;

/// The TLS query keys, named after Consul's options (`-ca-file`, `-client-cert`,
/// `-client-key`; `CONSUL_HTTP_SSL_VERIFY` for `ssl_verify`).
const TLS_NAMES: TlsNames = TlsNames {
    ca_file: "ca_file",
    client_cert: "client_cert",
    client_key: "client_key",
};

impl EurekaDiscovery {
    /// From `eureka://…` or `eureka+https://…`, credentials falling back to the environment.
    pub fn from_url(url: &str) -> Result<Self, SourceError> {
        Self::from_url_with_env(url, |k| std::env::var(k).ok())
    }

    /// As [`EurekaDiscovery::from_url`], reading variables through `env`.
    pub fn from_url_with_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SourceError> {
        let invalid = |reason: String| SourceError::Invalid {
            url: redact(url),
            reason,
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let https = match parsed.scheme() {
            "eureka" => false,
            "eureka+https" => true,
            other => {
                return Err(invalid(format!(
                    "scheme {other:?}: expected eureka or eureka+https"
                )))
            }
        };
        let mut credentials = None;
        if !parsed.username().is_empty() {
            credentials = Some(Credentials {
                user: decode(parsed.username()),
                password: parsed.password().map(decode),
            });
        } else if let Some(user) = env(ENV_USERNAME).filter(|u| !u.is_empty()) {
            credentials = Some(Credentials {
                user,
                password: env(ENV_PASSWORD),
            });
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("no host: expected eureka://host:port/eureka".into()))?;
        let mut servers = vec![server(host, parsed.port(), parsed.path(), https)];
        let mut interval = DEFAULT_INTERVAL;
        let mut timeout = DEFAULT_TIMEOUT;
        let mut tls = TlsOptions::new(TLS_NAMES);
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "server" => servers.push(parse_server(&value, https).map_err(&invalid)?),
                "interval" => {
                    interval = crate::parse_duration(&value, MIN_INTERVAL)
                        .map_err(|e| invalid(format!("interval={value:?}: {e}")))?
                }
                "timeout" => {
                    timeout = crate::parse_duration(&value, MIN_INTERVAL)
                        .map_err(|e| invalid(format!("timeout={value:?}: {e}")))?
                }
                "ca_file" | "client_cert" | "client_key" | "ssl_verify" if !https => {
                    return Err(invalid(format!(
                        "{key}= is a TLS option: use eureka+https://"
                    )))
                }
                "ca_file" => tls.ca_file = Some(tls_path(&key, &value).map_err(&invalid)?),
                "client_cert" => tls.client_cert = Some(tls_path(&key, &value).map_err(&invalid)?),
                "client_key" => tls.client_key = Some(tls_path(&key, &value).map_err(&invalid)?),
                "ssl_verify" => {
                    tls.insecure = match value.trim() {
                        "true" => false,
                        "false" => true,
                        _ => return Err(invalid(format!("ssl_verify={value:?}: true or false"))),
                    }
                }
                other => {
                    return Err(invalid(format!(
                        "unknown parameter {other:?} (known: server, interval, timeout, \
                         ca_file, client_cert, client_key, ssl_verify)"
                    )))
                }
            }
        }
        let opts = ClientOptions {
            connect_timeout: timeout,
            timeout: Some(timeout),
        };
        let client =
            http::client(opts, https.then_some(&tls)).map_err(|source| SourceError::Client {
                url: redact(url),
                source,
            })?;
        let (lookup_tx, lookup_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(EurekaDiscovery {
            servers,
            https,
            credentials,
            interval,
            timeout,
            client,
            lookups: super::Lookups::new(lookup_tx, lookup_rx),
        })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Base URLs of the servers, in failover order.
    pub fn servers(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.base.clone()).collect()
    }
}

/// The path a TLS query key names; never empty.
fn tls_path(key: &str, value: &str) -> Result<PathBuf, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("{key}= needs a file path"));
    }
    Ok(PathBuf::from(value))
}

/// The URL with any user info removed, for error messages.
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => match (url.split_once("://"), url.rfind('@')) {
            (Some((scheme, _)), Some(at)) => format!("{scheme}://{}", &url[at + 1..]),
            _ => url.to_string(),
        },
    }
}

fn decode(s: &str) -> String {
    ::url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn server(host: &str, port: Option<u16>, path: &str, https: bool) -> Server {
    let path = path.trim_end_matches('/');
    let path = if path.is_empty() { DEFAULT_PATH } else { path };
    let authority = match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let display = format!("{authority}{path}");
    let scheme = if https { "https" } else { "http" };
    Server {
        base: format!("{scheme}://{display}"),
        display,
    }
}

/// `host:port[/path]` from a `server=` parameter.
fn parse_server(value: &str, https: bool) -> Result<Server, String> {
    let scheme = if https { "https" } else { "http" };
    let u = Url::parse(&format!("{scheme}://{value}"))
        .map_err(|e| format!("server={value:?}: {e}; expected host:port/path"))?;
    if !u.username().is_empty() || u.query().is_some() {
        return Err(format!(
            "server={value:?}: expected host:port/path (credentials go in the main URL)"
        ));
    }
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("server={value:?}: no host"))?;
    Ok(server(host, u.port(), u.path(), https))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_failover_interval_and_credentials() {
        let none = |_: &str| None;
        let d = EurekaDiscovery::from_url_with_env(
            "eureka://127.0.0.1:8761/eureka/?server=127.0.0.1:8762&server=h3:81/x/eureka&interval=500ms&timeout=2s",
            none,
        )
        .unwrap();
        assert_eq!(
            d.servers(),
            vec![
                "http://127.0.0.1:8761/eureka",
                "http://127.0.0.1:8762/eureka",
                "http://h3:81/x/eureka"
            ]
        );
        assert_eq!(
            (d.interval(), d.timeout()),
            (Duration::from_millis(500), Duration::from_secs(2))
        );
        assert_eq!(
            d.describe(),
            "eureka://127.0.0.1:8761/eureka?server=127.0.0.1:8762/eureka&server=h3:81/x/eureka&interval=500ms"
        );
        let d = EurekaDiscovery::from_url_with_env("eureka+https://u%40x:s3cret@eu:8443", none)
            .unwrap();
        assert_eq!(d.servers(), vec!["https://eu:8443/eureka"]);
        assert_eq!(d.interval(), DEFAULT_INTERVAL);
        let c = d.credentials.clone().unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_deref()),
            ("u@x", Some("s3cret"))
        );
        assert!(!d.describe().contains("s3cret") && !format!("{d:?}").contains("s3cret"));
        let env = |k: &str| match k {
            ENV_USERNAME => Some("envuser".to_string()),
            ENV_PASSWORD => Some("envpass".to_string()),
            _ => None,
        };
        let d = EurekaDiscovery::from_url_with_env("eureka://eu:8761/eureka", env).unwrap();
        assert_eq!(d.credentials.unwrap().user, "envuser");
        for bad in [
            "eureka://eu:8761/eureka?interval=soon",
            "eureka://eu:8761/eureka?interval=1ms",
            "eureka://eu:8761/eureka?zone=a",
            "eureka://:8761/eureka",
            "eureka://eu:8761/eureka?server=u:p@h2:1",
        ] {
            assert!(
                EurekaDiscovery::from_url_with_env(bad, none).is_err(),
                "{bad} accepted"
            );
        }
        let err = EurekaDiscovery::from_url_with_env("eureka://u:pw@eu:8761/eureka?x=1", none)
            .unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
        assert_eq!(
            crate::from_url("eureka+https://eu:1/e").unwrap().kind(),
            "eureka"
        );
    }

    /// Eureka takes the TLS options Consul has (defect 15): a CA file that is not there is
    /// refused when the URL is parsed, naming the key and the value; real PEM files build.
    #[test]
    fn https_takes_the_tls_options() {
        let none = |_: &str| None;
        let err = EurekaDiscovery::from_url_with_env(
            "eureka+https://u:pw@eu:8443/eureka?ca_file=/nonexistent",
            none,
        )
        .unwrap_err();
        assert!(matches!(err, SourceError::Client { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(r#"ca_file="/nonexistent""#), "{msg}");
        assert!(!msg.contains("pw"), "{msg}");
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );

        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata");
        let url = format!(
            "eureka+https://eu:8443/eureka?ca_file={data}/test-cert.pem\
             &client_cert={data}/test-cert.pem&client_key={data}/test-key.pem&ssl_verify=false"
        );
        EurekaDiscovery::from_url_with_env(&url, none).expect("real PEM files build");
        let only_cert = format!("eureka+https://eu/eureka?client_cert={data}/test-cert.pem");
        let err = EurekaDiscovery::from_url_with_env(&only_cert, none).unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
        for bad in [
            "eureka://eu/eureka?ca_file=/etc/ca.pem",
            "eureka+https://eu/eureka?ca_file=",
            "eureka+https://eu/eureka?ssl_verify=maybe",
        ] {
            assert!(
                matches!(
                    EurekaDiscovery::from_url_with_env(bad, none),
                    Err(SourceError::Invalid { .. })
                ),
                "{bad} accepted"
            );
        }
    }
}
