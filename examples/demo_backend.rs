//! A tiny HTTP backend for `make run` and the README: answers every request with its own
//! address, the path it saw and the `X-Forwarded-For` it got.
//!
//! `cargo run --example demo_backend -- 127.0.0.1:18081 127.0.0.1:18082`
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addrs: Vec<SocketAddr> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err("usage: demo_backend ADDR [ADDR…]".into());
    }
    let mut tasks = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr).await?;
        println!("demo backend listening on http://{addr}");
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| async move {
                        let xff = req
                            .headers()
                            .get("x-forwarded-for")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        let body = format!(
                            "hello from {addr}: {} {} (x-forwarded-for: {xff})\n",
                            req.method(),
                            req.uri()
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}
