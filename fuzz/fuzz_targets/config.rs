//! The agent's config file: any bytes as `EDGE_AGENT_CONFIG`, through `Config::load` (TOML
//! parse into `FileConfig`, then every validation: listen addresses, balancers, durations,
//! upstreams, routes, guard). No panic, whatever the file says.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use edge_agent::config::{Cli, Config};
use libfuzzer_sys::fuzz_target;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!(
            "edge-agent-fuzz-config-{}.toml",
            std::process::id()
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    // Config::load reads the file itself; non-UTF-8 files are refused by read_to_string, which
    // is worth covering too, so the bytes go in as they are.
    if std::fs::write(path(), data).is_err() {
        return;
    }
    let cli = Cli {
        config: Some(path().clone()),
        registry: Some("file:///dev/null".into()),
        state_dir: Some(std::env::temp_dir()),
        ..Default::default()
    };
    let _ = Config::load(&cli);
});
