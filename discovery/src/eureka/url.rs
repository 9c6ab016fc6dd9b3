//! A Eureka source from its URL: servers in failover order, interval, timeout, credentials.
use std::time::Duration;

use ::url::Url;

use super::*;
use crate::SourceError;

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
                other => {
                    return Err(invalid(format!(
                        "unknown parameter {other:?} (known: server, interval, timeout)"
                    )))
                }
            }
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("edge-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(EurekaDiscovery {
            servers,
            https,
            credentials,
            interval,
            timeout,
            client,
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
}
