//! Load tools for `bench/run.sh` (not a benchmark by itself: under plain `cargo bench` it does
//! nothing and exits).
//!
//! - `fixed ADDR HOST RATE CONNS SECONDS`: an open-loop client at a fixed total rate, free of
//!   coordinated omission. Each of `CONNS` keep-alive connections has its own thread and its own
//!   schedule (`RATE / CONNS` per second, phases spread evenly); the latency of a request is
//!   measured from its *intended* send time, so a stalled server is charged for every request
//!   it delayed (wrk2's model). A thread sleeps until its next send time with `thread::sleep`
//!   (kernel timer slack, ~50 µs); that slack lands in every figure alike, which is why
//!   `run.sh` reports latency *added* over the direct backend. Prints one line:
//!   `sent=.. ok=.. errors=.. rate=.. p50_us=.. p90_us=.. p99_us=.. p999_us=.. max_us=..`.
//!   With `LOADGEN_TIMELINE=FILE`, also writes a per-second timeline there, one line per second
//!   of intended send time (`second ok errors p50_us p99_us max_us`), so a stall shows when it
//!   happened, not only that the tail grew.
//! - `hold ADDR HOST CONNS SECONDS`: opens `CONNS` keep-alive connections, sends one request on
//!   each, prints `held N` once all answered, keeps them open for `SECONDS`, then exits.
//!
//! Every loop is bounded by a deadline. Loopback only: the address must be 127.0.0.1.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    // `cargo bench` passes `--bench`; ignore flags.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let result = match args.first().map(String::as_str) {
        Some("fixed") if args.len() == 6 => fixed(&args[1..]),
        Some("hold") if args.len() == 5 => hold(&args[1..]),
        _ => {
            eprintln!("loadgen: a tool for bench/run.sh (fixed|hold ...); nothing to do here");
            return;
        }
    };
    if let Err(e) = result {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

fn loopback(addr: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    if !a.ip().is_loopback() {
        return Err(format!("{addr} is not loopback"));
    }
    Ok(a)
}

fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad {what}: {s}"))
}

fn request(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: loadgen\r\n\r\n").into_bytes()
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body) from `s`. `buf` carries bytes
/// already read past the previous response. Returns the status.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    let total = loop {
        if let Some(len) = length {
            if buf.len() >= head_end + len {
                break head_end + len;
            }
        } else if chunked {
            if let Some(p) = find(&buf[head_end..], b"0\r\n\r\n") {
                break head_end + p + 5;
            }
        } else {
            break head_end;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    buf.drain(..total);
    Ok(status)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    /// The second (of intended send time, from the start) of each latency, and of each error.
    seconds: Vec<u16>,
    error_seconds: Vec<u16>,
}

fn fixed(args: &[String]) -> Result<(), String> {
    let addr = loopback(&args[0])?;
    let req = request(&args[1]);
    let rate: f64 = num(&args[2], "rate")?;
    let conns: usize = num(&args[3], "conns")?;
    let secs: f64 = num(&args[4], "seconds")?;
    if !(rate > 0.0 && conns > 0 && conns <= 1024 && secs > 0.0 && secs <= 600.0) {
        return Err("need rate > 0, 0 < conns <= 1024, 0 < seconds <= 600".into());
    }
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(secs);
    let per_conn = (rate * secs / conns as f64).ceil() as usize + 1;
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let req = req.clone();
            std::thread::spawn(move || {
                let mut t = Tally {
                    latencies_us: Vec::with_capacity(per_conn),
                    errors: 0,
                    seconds: Vec::with_capacity(per_conn),
                    error_seconds: Vec::new(),
                };
                let mut stream = None;
                let mut buf = Vec::with_capacity(8192);
                let phase = interval.mul_f64(c as f64 / conns as f64);
                for i in 0..per_conn as u32 {
                    let intended = start + phase + interval * i;
                    if intended >= end {
                        break;
                    }
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    let second = (intended - start).as_secs() as u16;
                    if stream.is_none() {
                        buf.clear();
                        match connect(addr) {
                            Ok(s) => stream = Some(s),
                            Err(_) => {
                                t.errors += 1;
                                t.error_seconds.push(second);
                                continue;
                            }
                        }
                    }
                    let s = stream.as_mut().expect("connected above");
                    let ok = s
                        .write_all(&req)
                        .and_then(|_| read_response(s, &mut buf))
                        .map(|status| status == 200)
                        .unwrap_or(false);
                    if ok {
                        let us = intended.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        t.latencies_us.push(us);
                        t.seconds.push(second);
                    } else {
                        t.errors += 1;
                        t.error_seconds.push(second);
                        stream = None;
                    }
                }
                t
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let n_seconds = secs.ceil() as usize;
    let mut by_second: Vec<Vec<u32>> = vec![Vec::new(); n_seconds];
    let mut errors_by_second = vec![0u64; n_seconds];
    for th in threads {
        let t = th.join().map_err(|_| "a client thread panicked")?;
        for (&us, &sec) in t.latencies_us.iter().zip(&t.seconds) {
            by_second[(sec as usize).min(n_seconds - 1)].push(us);
        }
        for &sec in &t.error_seconds {
            errors_by_second[(sec as usize).min(n_seconds - 1)] += 1;
        }
        all.extend(t.latencies_us);
        errors += t.errors;
    }
    let took = start.elapsed().as_secs_f64().max(1e-9);
    all.sort_unstable();
    let q = |p: f64| quantile(&all, p);
    if let Some(path) = std::env::var_os("LOADGEN_TIMELINE") {
        let mut out = String::from("second\tok\terrors\tp50_us\tp99_us\tmax_us\n");
        for (sec, lat) in by_second.iter_mut().enumerate() {
            lat.sort_unstable();
            out.push_str(&format!(
                "{sec}\t{}\t{}\t{}\t{}\t{}\n",
                lat.len(),
                errors_by_second[sec],
                quantile(lat, 0.50),
                quantile(lat, 0.99),
                lat.last().copied().unwrap_or(0),
            ));
        }
        std::fs::write(&path, out).map_err(|e| format!("LOADGEN_TIMELINE {path:?}: {e}"))?;
    }
    println!(
        "sent={} ok={} errors={} rate={:.0} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
        all.len() as u64 + errors,
        all.len(),
        errors,
        all.len() as f64 / took,
        q(0.50),
        q(0.90),
        q(0.99),
        q(0.999),
        all.last().copied().unwrap_or(0),
    );
    Ok(())
}

/// The `p` quantile of sorted `v` (nearest rank), 0 when empty.
fn quantile(v: &[u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn hold(args: &[String]) -> Result<(), String> {
    let addr = loopback(&args[0])?;
    let req = request(&args[1]);
    let conns: usize = num(&args[2], "conns")?;
    let secs: u64 = num(&args[3], "seconds")?;
    if !(conns > 0 && conns <= 20_000 && secs > 0 && secs <= 600) {
        return Err("need 0 < conns <= 20000, 0 < seconds <= 600".into());
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut held = Vec::with_capacity(conns);
    let mut buf = Vec::new();
    for _ in 0..conns {
        if Instant::now() >= deadline {
            break;
        }
        let mut s = connect(addr).map_err(|e| format!("connect: {e}"))?;
        s.write_all(&req).map_err(|e| format!("write: {e}"))?;
        buf.clear();
        read_response(&mut s, &mut buf).map_err(|e| format!("read: {e}"))?;
        held.push(s);
    }
    println!("held {}", held.len());
    std::io::stdout().flush().ok();
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
    drop(held);
    Ok(())
}
