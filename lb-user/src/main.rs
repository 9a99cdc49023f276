//! `lb`: the daemon and its command-line client.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use lb::{
    api::{self, Request, Response},
    config::{Config, DEFAULT_CONTROL_SOCKET},
    status,
};

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP load balancer for Lync / Skype for Business Front End pools")]
struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "LB_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: attach the XDP program and serve the control socket.
    Daemon {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Services, backends and data-plane counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Re-read the config file and apply service changes (same as SIGHUP).
    Reload,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; names the offending key on error.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match cli.command {
        Command::Daemon { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            runtime.block_on(lb::daemon::run(&config))
        }
        Command::Status { json } => {
            let report = match runtime.block_on(api::call(&cli.socket, &Request::Status))? {
                Response::Status(report) => report,
                other => return unexpected(other),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::render(&report));
            }
            Ok(())
        }
        Command::Reload => match runtime.block_on(api::call(&cli.socket, &Request::Reload))? {
            Response::Reloaded => {
                println!("configuration reloaded");
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Config { command: ConfigCommand::Check { file } } => {
            let config = Config::load(&file)?;
            let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
            println!("{}: ok ({} services, {backends} backends)", file.display(), config.services.len());
            Ok(())
        }
    }
}

fn unexpected(response: Response) -> Result<()> {
    match response {
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected response from the daemon: {other:?}"),
    }
}
