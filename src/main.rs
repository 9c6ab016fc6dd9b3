use std::process::ExitCode;

use clap::Parser;
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
    edge_agent::init_logging(config.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
