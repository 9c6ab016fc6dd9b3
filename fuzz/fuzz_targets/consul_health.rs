//! Consul answers: any JSON through `consul::parse_health` (`/v1/health/service/<svc>`) and
//! `consul::parse_catalog` (`/v1/catalog/services`). No panic.
#![no_main]

use discovery::consul::{parse_catalog, parse_health};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok((insts, _problems)) = parse_health(&body) {
        assert!(insts.iter().all(|i| i.port != 0), "port 0 accepted");
    }
    let _ = parse_catalog(&body);
});
