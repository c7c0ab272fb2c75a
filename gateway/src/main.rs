//! The `gateway` command: serve, check a config, make API keys.

use clap::{Parser, Subcommand};
use gateway::config::{keys, Config};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "tollgate: a GPU inference-serving gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the tenant API.
    Serve {
        /// Config file. Without it, `config/gateway.toml` if present, else the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address; overrides `server.listen` (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate a config file and print a summary.
    CheckConfig { file: PathBuf },
    /// Download a known model into the local cache (checked by SHA-256).
    FetchModel {
        /// A known model name (smollm2-135m).
        name: String,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a fresh API key: prints the key once, and the config line holding its digest.
    New {
        #[arg(long)]
        tenant: String,
    },
}

const DEFAULT_CONFIG_PATH: &str = "config/gateway.toml";

fn load_config(path: Option<PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(&p).map_err(|e| format!("{}: {e}", p.display())),
        None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load(DEFAULT_CONFIG_PATH.as_ref())
                .map_err(|e| format!("{DEFAULT_CONFIG_PATH}: {e}"))
        }
        None => {
            tracing::info!(
                "no config file given and no {DEFAULT_CONFIG_PATH}: using the embedded default"
            );
            Config::embedded_default().map_err(|e| format!("embedded default config: {e}"))
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen } => {
            let mut cfg = match load_config(config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(addr) = listen {
                cfg.server.listen = addr;
            }
            let mut builder = match cfg.server.threads {
                1 => tokio::runtime::Builder::new_current_thread(),
                0 => tokio::runtime::Builder::new_multi_thread(),
                n => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
            };
            let rt = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(gateway::server::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                let workers: usize = cfg
                    .pools
                    .iter()
                    .map(|p| {
                        p.workers
                            .iter()
                            .map(|w| match w {
                                gateway::config::WorkerConfig::Sim(s) => s.count,
                                gateway::config::WorkerConfig::Openai(_)
                                | gateway::config::WorkerConfig::Engine(_) => 1,
                            })
                            .sum::<usize>()
                    })
                    .sum();
                println!(
                    "{}: ok ({} models, {} pools, {} workers, {} tenants)",
                    file.display(),
                    cfg.models.len(),
                    cfg.pools.len(),
                    workers,
                    cfg.tenants.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Command::FetchModel { name } => {
            match gateway::model_fetch::KNOWN.iter().find(|k| k.name == name) {
                Some(k) => match gateway::model_fetch::ensure(k) {
                    Ok(path) => {
                        println!("{}", path.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                },
                None => {
                    let known: Vec<_> =
                        gateway::model_fetch::KNOWN.iter().map(|k| k.name).collect();
                    eprintln!("error: unknown model {name:?}; known: {}", known.join(", "));
                    ExitCode::from(2)
                }
            }
        }
        Command::Keys {
            command: KeysCommand::New { tenant },
        } => {
            let key = keys::generate();
            let digest = hex::encode(keys::digest(&key));
            println!("API key for tenant {tenant:?} (shown once; give it to the tenant):");
            println!("  {key}");
            println!("Add its digest to the tenant in the config:");
            println!("  [[tenants]]");
            println!("  id = {tenant:?}");
            println!("  keys_sha256 = [\"{digest}\"]");
            ExitCode::SUCCESS
        }
    }
}
