//! The HTTP/1 head parser (`edge_agent::h1`, #15): arbitrary bytes as a request head, a response
//! head (to GET and to HEAD), and a chunked body fed in two pieces at an arbitrary split. No
//! panic, and every answer is consistent: spans (and line ends) within the head, a complete head's length within
//! the input, what the writer makes of an accepted head parses again with the same framing, and
//! the chunked decoder never reads past its input, reports data only inside what it read, and
//! reads nothing after the body's end.
#![no_main]

use edge_agent::h1::chunked::Decoder;
use edge_agent::h1::write::{write_request, Added};
use edge_agent::h1::{Limits, Parse, RequestHead, ResponseHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let mut head = RequestHead::default();
    if let Ok(Parse::Complete(n)) = head.parse(data, &limits) {
        assert!(n <= data.len() && n == head.len);
        for s in [head.method, head.target]
            .into_iter()
            .chain(head.host)
            .chain(head.headers().iter().flat_map(|h| [h.name, h.value]))
        {
            assert!(s.start <= s.end && (s.end as usize) <= n);
        }
        for h in head.headers() {
            assert!(h.name.end <= h.value.start && h.value.end <= h.line_end);
            assert!(h.line_end as usize <= n);
        }
        let mut out = Vec::new();
        let add = Added {
            target: None,
            tunnel: head.is_tunnel_upgrade(data),
            client_ip: b"192.0.2.1",
            proto: b"http",
            host: b"10.0.0.1:80",
            request_id: Some(b"id"),
        };
        write_request(&mut out, &head, data, &add);
        let mut again = RequestHead::default();
        match again.parse(&out, &limits) {
            Ok(Parse::Complete(m)) => {
                assert_eq!(m, out.len());
                assert_eq!(again.body, head.body);
                assert_eq!(again.method.of(&out), head.method.of(data));
            }
            // The added lines can push a head near a limit (lines, line length) over it;
            // nothing else may fail.
            Err(e) if e.status() == 431 => {}
            other => panic!("the written head does not parse: {other:?}"),
        }
    }

    for to_head in [false, true] {
        let mut resp = ResponseHead::default();
        if let Ok(Parse::Complete(n)) = resp.parse(data, to_head) {
            assert!(n <= data.len() && (100..=999).contains(&resp.status));
            for h in resp.headers() {
                assert!(h.name.end as usize <= n && h.value.end as usize <= n);
            }
        }
    }

    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let mut d = Decoder::new();
    let mut fed = 0;
    'pieces: for piece in [&data[..split], &data[split..]] {
        let mut rest = piece;
        while !rest.is_empty() {
            let Ok(step) = d.decode(rest) else { break 'pieces };
            assert!(step.consumed <= rest.len());
            if let Some(r) = &step.data {
                assert!(r.start <= r.end && r.end == step.consumed);
            }
            fed += step.consumed;
            if step.done {
                assert!(d.is_done());
                assert_eq!(d.decode(b"more").map(|s| s.consumed), Ok(0));
                break 'pieces;
            }
            assert!(step.consumed > 0, "no progress");
            rest = &rest[step.consumed..];
        }
    }
    assert!(fed <= data.len());
});
