//! The file registry's services file: `discovery::file::parse` on any text. No panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(parsed) = discovery::file::parse(text) {
        for insts in parsed.services.values() {
            assert!(insts.iter().all(|i| i.port != 0), "port 0 accepted");
        }
    }
});
