//! Eureka `/apps` and `/apps/delta` answers: the input is a full fetch and a delta separated by
//! a NUL byte (the delta may be absent). Each JSON document goes through
//! `eureka::parse_answer`; a parsed full fetch becomes a `Registry`, takes the delta, and is
//! hashed and snapshotted. No panic.
#![no_main]

use discovery::eureka::{parse_answer, Registry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (full, delta) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(full) = serde_json::from_slice::<serde_json::Value>(full) else {
        return;
    };
    let Ok(answer) = parse_answer(&full) else {
        return;
    };
    let mut reg = Registry::from_full(&answer);
    let _ = reg.hashcode();
    let _ = reg.snapshot();
    if let Some(Ok(delta)) = delta.map(serde_json::from_slice::<serde_json::Value>) {
        if let Ok(delta) = parse_answer(&delta) {
            let _ = reg.apply_delta(&delta);
            let _ = reg.hashcode();
            let _ = reg.len();
            for insts in reg.snapshot().values() {
                assert!(insts.iter().all(|i| i.port != 0), "port 0 accepted");
            }
        }
    }
});
