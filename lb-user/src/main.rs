//! `lb`: the daemon and its command-line client.
use std::{io::IsTerminal, net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use lb::{
    addr::SourcePrefix,
    api::{self, Request, Response},
    cli::{checks, preset, status, top},
    config::{Config, DEFAULT_CONTROL_SOCKET},
    dataplane,
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP load balancer for Lync / Skype for Business Front End pools"
)]
struct Cli {
    /// Control socket of the daemon, for the commands that talk to it (before the command:
    /// `lb --socket PATH status`). The daemon itself serves `daemon.control_socket`.
    #[arg(long, env = "LB_SOCKET")]
    socket: Option<PathBuf>,
    /// Machine-readable output: JSON on stdout, for the commands that talk to the daemon,
    /// init, detach and config check, errors included (`{"error": "..."}`, exit status 1).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: attach (or adopt) the XDP program and serve the control socket.
    Daemon {
        /// The config file (e.g. /etc/lb/lb.toml; its format: lb.toml(5)).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Services, servers with their state, live flows and affinities, counters.
    Status,
    /// Live view of services and servers, refreshed every second (q quits).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Data-plane counters and traffic per service and server.
    Stats,
    /// Re-read the config file and apply service changes (same as SIGHUP).
    Reload,
    /// Live changes to a service's servers (persisted across restarts).
    Backend {
        #[command(subcommand)]
        command: BackendCommand,
    },
    /// This node in a scale-out group: drain withdraws its VIP routes (the router sends
    /// new clients to the other nodes), its flows continue; undrain announces them again.
    Node {
        /// drain or undrain.
        #[arg(value_enum)]
        action: NodeAction,
    },
    /// The HA pair (docs/ha.md): sync state and peers; hand the active role over on purpose.
    Ha {
        /// status (default), handover or resume.
        #[arg(value_enum, default_value_t = HaAction::Status)]
        action: HaAction,
        /// handover: even with no peer connected (the peer may be cold or absent).
        #[arg(long)]
        force: bool,
    },
    /// A service's live Maglev table: slots per server and a digest to compare nodes.
    Maglev {
        /// The service, by its name in the config.
        service: String,
        /// Also show the server the table picks for this client address.
        #[arg(long)]
        client: Option<IpAddr>,
    },
    /// Inspect or reset client affinities.
    Affinity {
        #[command(subcommand)]
        command: AffinityCommand,
    },
    /// Data-plane debug logging of new flows and drops, into the daemon's log (off at start).
    Debug {
        /// on or off.
        #[arg(value_enum)]
        state: Switch,
    },
    /// Write a commented config for a Lync / Skype for Business VIP (to stdout, or --output).
    Init {
        /// Which VIP of the pool the config is for.
        #[arg(long, value_enum)]
        preset: preset::Preset,
        /// The VIP (default: a documentation address to replace).
        #[arg(long)]
        vip: Option<IpAddr>,
        /// The Front End servers.
        #[arg(long, value_delimiter = ',')]
        servers: Vec<IpAddr>,
        /// SNAT addresses: local addresses of this box on the server side.
        #[arg(long, value_delimiter = ',')]
        snat: Vec<IpAddr>,
        /// Interfaces to attach to (client side and server side, or the one arm).
        #[arg(long, value_delimiter = ',')]
        interfaces: Vec<String>,
        /// Clients allowed to connect, as prefixes or addresses (for lync-web-external: the
        /// reverse proxies); any other client is refused. Default: any client.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<SourcePrefix>,
        /// Write here instead of stdout; an existing file is kept unless --force.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Overwrite an existing --output file.
        #[arg(long)]
        force: bool,
    },
    /// Print shell completions for lb.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print lb's man page (roff), or write every page (one per subcommand) to a directory.
    Man {
        /// Write lb.1 and one lb-<subcommand>.1 per subcommand here instead of printing lb.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Stop the data plane for good: unpin its program and maps (flows and affinities are
    /// lost). Run after stopping the daemon.
    Detach {
        /// The config file (e.g. /etc/lb/lb.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Add a server (default port: the service's backend_port).
    Add {
        /// The service, by its name in the config.
        service: String,
        /// The server's address.
        address: IpAddr,
        /// The server's port (default: the service's backend_port).
        #[arg(long)]
        port: Option<u16>,
        /// Relative weight for new clients, 0..=1000 (default 1).
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove a server; its open connections keep working until they end.
    Remove {
        /// The service, by its name in the config.
        service: String,
        /// The server's address.
        address: IpAddr,
    },
    /// No new clients; existing connections and affinities continue. With --deadline,
    /// whatever is left after that many seconds is cut.
    Drain {
        /// The service, by its name in the config.
        service: String,
        /// The server's address.
        address: IpAddr,
        /// Seconds after which the remaining connections and affinities are cut.
        #[arg(long)]
        deadline: Option<u64>,
    },
    /// Take new clients again.
    Undrain {
        /// The service, by its name in the config.
        service: String,
        /// The server's address.
        address: IpAddr,
    },
    /// Change a server's relative weight (0: no new clients).
    Weight {
        /// The service, by its name in the config.
        service: String,
        /// The server's address.
        address: IpAddr,
        /// Relative weight for new clients, 0..=1000 (0: none).
        weight: u32,
    },
}

#[derive(Subcommand)]
enum AffinityCommand {
    /// Live affinities of a service.
    List {
        /// The service, by its name in the config.
        service: String,
        /// Only this client's affinities.
        #[arg(long)]
        client: Option<IpAddr>,
    },
    /// Forget affinities (all of a service, one client's, or those pointing at one server).
    Flush {
        /// The service, by its name in the config.
        service: String,
        /// Only this client's affinities.
        #[arg(long, conflicts_with = "backend")]
        client: Option<IpAddr>,
        /// Only the affinities pointing at this server.
        #[arg(long)]
        backend: Option<IpAddr>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum NodeAction {
    Drain,
    Undrain,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum HaAction {
    /// Readiness, peers and what the sync refused.
    Status,
    /// Tell keepalived this node must not be active: the peer takes the addresses.
    Handover,
    /// Let keepalived make this node active or backup again.
    Resume,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (names the offending key on error) and warn about the known
    /// Lync traps; --strict turns warnings into a failure.
    Check {
        /// The config file to check (its format: lb.toml(5)).
        file: PathBuf,
        /// Fail on warnings too.
        #[arg(long)]
        strict: bool,
        /// The config of another node of the same scale-out group (repeatable): its
        /// services must be the same and its SNAT addresses different.
        #[arg(long = "peer")]
        peers: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Daemon { .. }) {
        // A command whose reader went away (`lb status | head -1`) ends quietly, as other
        // Unix tools do, instead of panicking on the failed write. The daemon keeps Rust's
        // default (SIGPIPE ignored): a control client hanging up is an error to handle.
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if json => {
            println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.json
        && matches!(
            cli.command,
            Command::Daemon { .. } | Command::Completions { .. } | Command::Man { .. }
        )
    {
        bail!("--json is for the commands that talk to the daemon, init, detach and config check");
    }
    if matches!(cli.command, Command::Daemon { .. }) {
        if let Some(socket) = &cli.socket {
            bail!(
                "--socket (or LB_SOCKET={}) is for the commands that talk to the daemon; the daemon serves daemon.control_socket from its config",
                socket.display()
            );
        }
    }
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let call = |request: Request| -> Result<Response> {
        match runtime.block_on(api::call(&socket, &request))? {
            Response::Error { message } => bail!("{message}"),
            other => Ok(other),
        }
    };
    let json = cli.json;
    // A change the daemon made: said in prose, or as the request it carried out.
    let done = |request: Request, what: String| -> Result<()> {
        let carried_out = json.then(|| serde_json::to_value(&request)).transpose()?;
        match call(request)? {
            Response::Done => {
                match carried_out {
                    Some(request) => println!(
                        "{}",
                        serde_json::json!({ "done": request, "message": what })
                    ),
                    None => println!("{what}"),
                }
                Ok(())
            }
            other => unexpected(other),
        }
    };
    let status = || -> Result<api::StatusReport> {
        match call(Request::Status)? {
            Response::Status(report) => Ok(report),
            other => bail!("unexpected response from the daemon: {other:?}"),
        }
    };
    match cli.command {
        Command::Daemon { config } => {
            // Under systemd the journal timestamps each line itself; colour codes only for
            // a terminal, never in a log file or the journal.
            let journal = std::env::var_os("JOURNAL_STREAM").is_some();
            let log = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_ansi(std::io::stdout().is_terminal() && !journal);
            if journal {
                log.without_time().init();
            } else {
                log.init();
            }
            runtime.block_on(lb::daemon::run(&config))
        }
        Command::Status => {
            let report = status()?;
            show(json, &report, || status::render(&report))
        }
        Command::Stats => {
            let report = status()?;
            show(json, &report, || status::render_stats(&report))
        }
        Command::Top { interval } => {
            if !(0.1..=60.0).contains(&interval) {
                bail!("--interval: 0.1 to 60 seconds, got {interval}");
            }
            if json || !std::io::stdout().is_terminal() {
                bail!("lb top draws on a terminal and stdout is not one; in scripts use `lb status` (or `lb status --json`)");
            }
            top::run(&socket, std::time::Duration::from_secs_f64(interval))
        }
        Command::Reload => done(Request::Reload, "configuration reloaded".into()),
        Command::Backend { command } => match command {
            BackendCommand::Add {
                service,
                address,
                port,
                weight,
            } => {
                let what = format!("{address} added to {service}");
                done(
                    Request::BackendAdd {
                        service,
                        address,
                        port,
                        weight,
                    },
                    what,
                )
            }
            BackendCommand::Remove { service, address } => {
                let what = format!("{address} removed from {service}");
                done(Request::BackendRemove { service, address }, what)
            }
            BackendCommand::Drain {
                service,
                address,
                deadline,
            } => {
                let what = match deadline {
                    Some(d) => format!(
                        "{address} of {service} draining; remaining connections cut in {d} s"
                    ),
                    None => format!("{address} of {service} draining"),
                };
                done(
                    Request::BackendDrain {
                        service,
                        address,
                        deadline_s: deadline,
                    },
                    what,
                )
            }
            BackendCommand::Undrain { service, address } => {
                let what = format!("{address} of {service} takes new clients again");
                done(Request::BackendUndrain { service, address }, what)
            }
            BackendCommand::Weight {
                service,
                address,
                weight,
            } => {
                let what = format!("{address} of {service} now has weight {weight}");
                done(
                    Request::BackendWeight {
                        service,
                        address,
                        weight,
                    },
                    what,
                )
            }
        },
        Command::Affinity { command } => match command {
            AffinityCommand::List { service, client } => {
                let Response::Affinities { entries } =
                    call(Request::AffinityList { service, client })?
                else {
                    bail!("unexpected response")
                };
                show(json, &entries, || status::render_affinities(&entries))
            }
            AffinityCommand::Flush {
                service,
                client,
                backend,
            } => {
                let Response::Flushed { removed } = call(Request::AffinityFlush {
                    service,
                    client,
                    backend,
                })?
                else {
                    bail!("unexpected response")
                };
                show(json, &serde_json::json!({ "removed": removed }), || {
                    format!("{removed} affinities removed\n")
                })
            }
        },
        Command::Node { action } => {
            let drained = matches!(action, NodeAction::Drain);
            let what = if drained {
                "node drained: its VIP routes are withdrawn; open connections continue"
            } else {
                "node undrained: its VIP routes are announced again"
            };
            done(Request::NodeDrain { drained }, what.into())
        }
        Command::Ha { action, force } => match action {
            HaAction::Status => {
                let sync = status()?
                    .sync
                    .context("this node has no [daemon.sync]: it is not part of an HA pair")?;
                show(json, &sync, || status::render_sync(&sync))
            }
            HaAction::Handover => done(
                Request::HaHandover { force },
                "handed over: keepalived releases this node's addresses and the peer takes them; `lb ha resume` undoes it".into(),
            ),
            HaAction::Resume => done(
                Request::HaResume,
                "resumed: keepalived may make this node active or backup again".into(),
            ),
        },
        Command::Maglev { service, client } => {
            let Response::MaglevTable(table) = call(Request::MaglevTable { service })? else {
                bail!("unexpected response")
            };
            match client {
                None => show(json, &table, || status::render_maglev(&table)),
                Some(client) => {
                    let server = table.server_for(client);
                    let value = serde_json::json!({ "table": table, "client": client, "server": server });
                    show(json, &value, || {
                        format!(
                            "{}a new client at {client} goes to {}\n",
                            status::render_maglev(&table),
                            server.unwrap_or("no server")
                        )
                    })
                }
            }
        }
        Command::Debug { state } => {
            let enabled = matches!(state, Switch::On);
            let what = format!(
                "data-plane debug logging {}",
                if enabled { "on" } else { "off" }
            );
            done(Request::DebugLog { enabled }, what)
        }
        Command::Init {
            preset,
            vip,
            servers,
            snat,
            interfaces,
            allow,
            output,
            force,
        } => {
            let defaults = preset::Site::default();
            let site = preset::Site {
                vip: vip.unwrap_or(defaults.vip),
                servers: if servers.is_empty() {
                    defaults.servers
                } else {
                    servers
                },
                snat: if snat.is_empty() { defaults.snat } else { snat },
                interfaces: if interfaces.is_empty() {
                    defaults.interfaces
                } else {
                    interfaces
                },
                allow,
            };
            let text = preset::render(preset, &site)?;
            match output {
                None => show(json, &serde_json::json!({ "config": text }), || text.clone()),
                Some(path) => {
                    if path.exists() && !force {
                        bail!("{} exists; use --force to replace it", path.display());
                    }
                    std::fs::write(&path, text)
                        .with_context(|| format!("write {}", path.display()))?;
                    if json {
                        println!("{}", serde_json::json!({ "wrote": path }));
                    } else {
                        eprintln!("wrote {}", path.display());
                    }
                    Ok(())
                }
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("write the man pages to {}", dir.display()))
        }
        Command::Config {
            command:
                ConfigCommand::Check {
                    file,
                    strict,
                    peers,
                },
        } => {
            let config = Config::load(&file)?;
            for peer in &peers {
                let other = Config::load(peer)?;
                checks::same_group(&config, &other)
                    .with_context(|| format!("{} and {}", file.display(), peer.display()))?;
            }
            let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
            // What this host lacks stops the daemon, but the check may run elsewhere.
            let mut warnings = checks::warnings(&config);
            warnings.extend(lb::config::host_mismatches(&config)?);
            if strict && !warnings.is_empty() {
                if json {
                    bail!(
                        "{}: {} warning(s): {}",
                        file.display(),
                        warnings.len(),
                        warnings.join("; ")
                    );
                }
                for w in &warnings {
                    println!("warning: {w}");
                }
                bail!("{}: {} warning(s)", file.display(), warnings.len());
            }
            let value = serde_json::json!({
                "file": file,
                "services": config.services.len(),
                "backends": backends,
                "warnings": warnings,
            });
            show(json, &value, || {
                let mut text: String = warnings.iter().map(|w| format!("warning: {w}\n")).collect();
                text += &format!(
                    "{}: ok ({} services, {backends} backends, {} warnings)\n",
                    file.display(),
                    config.services.len(),
                    warnings.len()
                );
                text
            })
        }
        Command::Detach { config } => {
            let config = Config::load(&config)?;
            let socket = PathBuf::from(&config.daemon.control_socket);
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                bail!(
                    "the daemon is still running on {}; stop it first",
                    socket.display()
                );
            }
            dataplane::remove_pins(std::path::Path::new(&config.daemon.pin_dir))
                .context("unpin the data plane")?;
            let value = serde_json::json!({ "detached": config.daemon.pin_dir });
            show(json, &value, || {
                format!(
                    "data plane detached: pins under {} removed\n",
                    config.daemon.pin_dir
                )
            })
        }
    }
}

/// What a command shows: `text()` for people, `value` as JSON for scripts.
fn show(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text());
    }
    Ok(())
}

fn unexpected(response: Response) -> Result<()> {
    bail!("unexpected response from the daemon: {response:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let command = Cli::command();
        command.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&command, "lb", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn the_daemon_refuses_a_socket_option_it_would_ignore() {
        let cli = Cli::try_parse_from(["lb", "--socket", "/tmp/x.sock", "daemon", "-c", "a.toml"])
            .unwrap();
        let e = format!("{:#}", run(cli).unwrap_err());
        assert!(e.contains("daemon.control_socket"), "{e}");
        assert!(
            Cli::try_parse_from(["lb", "daemon", "--socket", "/tmp/x.sock", "-c", "a"]).is_err()
        );
    }
}
