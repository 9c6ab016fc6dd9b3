//! Registry URLs for every scheme (`file`, `consul`, `consul+https`, `eureka`, `eureka+https`,
//! `nacos`, `dns`, unknown): `discovery::from_url` on any text. No panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|url: &str| {
    let _ = discovery::from_url(url);
});
