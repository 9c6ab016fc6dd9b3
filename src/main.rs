use std::process::ExitCode;

use clap::Parser;

/// mimalloc: fewer cycles per request than glibc malloc for the proxy's many small, short-lived
/// allocations (BENCHMARKS.md, #8).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use edge_agent::config::{Cli, Command, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        println!(
            "configuration is valid: listen {}, admin {}, {} registr{}, {} upstream(s), {} route(s)",
            config.listen,
            config.admin_listen,
            config.registries.len(),
            if config.registries.len() == 1 { "y" } else { "ies" },
            config.dynamic.upstreams.len(),
            config.dynamic.routes.len()
        );
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Status { json }) = cli.command {
        return ExitCode::from(edge_agent::status::run(&config, json));
    }
    edge_agent::init_logging(config.log_json);
    // Adapters that keep files of their own (the Nacos SDK's cache) read the state directory
    // from the environment; a `--state-dir` flag given instead of the variable is passed on.
    // Set before any thread starts.
    if let Some(dir) = &config.state_dir {
        std::env::set_var(discovery::ENV_STATE_DIR, dir);
    }
    // One worker (`TOKIO_WORKER_THREADS=1`): a current-thread runtime, which skips the
    // work-stealing scheduler's cross-thread bookkeeping on every wake-up (BENCHMARKS.md, #8).
    // Otherwise tokio's multi-thread runtime, one worker per CPU unless that variable says.
    let one_worker = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let mut builder = if one_worker {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(edge_agent::run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
