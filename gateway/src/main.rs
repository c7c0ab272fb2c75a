//! The `gateway` command: serve, check a config, make API keys.

use clap::{Parser, Subcommand};
use gateway::config::{keys, Config, RuntimeKind};
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
        /// Admin listen address; overrides `server.admin_listen`.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Export metered usage: per-tenant, per-minute totals from the usage database.
    Usage {
        /// Start: an RFC 3339 time (2026-11-27T10:00:00Z) or a duration ago (15m, 2h, 7d).
        #[arg(long)]
        since: String,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum, default_value = "csv")]
        format: UsageFormat,
        /// The usage database; default: `metering.path` of the config.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Config file whose `metering.path` names the database.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print a summary.
    CheckConfig { file: PathBuf },
    /// Serve one model with the in-process engine over the same OpenAI API, for gateways
    /// to route to as an `openai` worker. Callers authenticate with the shared secret in
    /// `$TOLLGATE_WORKER_SECRET` (a gateway sends it as its `api_key`); they are trusted to
    /// name the tenant of each request (`x-tollgate-tenant`, `x-tollgate-weight`).
    Worker {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Model source: a known name (fetched) or a .gguf path.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// The model id clients ask for (defaults to --model).
        #[arg(long)]
        model_id: Option<String>,
        /// Compute backend: auto, cpu or cuda.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// CPU backend threads (0 = one per CPU).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// KV-cache capacity in tokens (default: 65536 on the CPU; on a GPU, most of its
        /// free memory).
        #[arg(long)]
        kv_tokens: Option<usize>,
    },
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum UsageFormat {
    Csv,
    Json,
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

/// The config and the file it came from (none for the embedded default).
fn load_config(path: Option<PathBuf>) -> Result<(Config, Option<PathBuf>), String> {
    let path = path.or_else(|| {
        let p = PathBuf::from(DEFAULT_CONFIG_PATH);
        p.exists().then_some(p)
    });
    match path {
        Some(p) => Config::load(&p)
            .map(|c| (c, Some(p.clone())))
            .map_err(|e| format!("{}: {e}", p.display())),
        None => {
            tracing::info!(
                "no config file given and no {DEFAULT_CONFIG_PATH}: using the embedded default"
            );
            Config::embedded_default()
                .map(|c| (c, None))
                .map_err(|e| format!("embedded default config: {e}"))
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
    match Cli::parse().command {
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => match load_config(config) {
            Ok((mut cfg, path)) => {
                if let Some(addr) = listen {
                    cfg.server.listen = addr;
                }
                if let Some(addr) = admin_listen {
                    cfg.server.admin_listen = Some(addr);
                }
                serve(cfg, path)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Worker {
            listen,
            model,
            model_id,
            backend,
            threads,
            kv_tokens,
        } => match worker_config(listen, &model, model_id, &backend, threads, kv_tokens) {
            Ok(cfg) => serve(cfg, None),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::CheckConfig { file } => check_config(&file),
        Command::Usage {
            since,
            tenant,
            format,
            db,
            config,
        } => usage(&since, tenant.as_deref(), format, db, config),
        Command::FetchModel { name } => fetch_model(&name),
        Command::Keys {
            command: KeysCommand::New { tenant },
        } => new_key(&tenant),
    }
}

fn serve(cfg: Config, path: Option<PathBuf>) -> ExitCode {
    // Per core: this runtime accepts and runs the background tasks (probes, reloads,
    // the admin API); the serving threads have their own.
    let mut builder = match (cfg.server.runtime, cfg.server.threads) {
        (RuntimeKind::PerCore, _) | (RuntimeKind::Shared, 1) => {
            tokio::runtime::Builder::new_current_thread()
        }
        (RuntimeKind::Shared, n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(gateway::server::serving_threads(n));
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
    match rt.block_on(gateway::server::run(cfg, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The config of `gateway worker`: one model, one engine, and the calling gateway as a
/// trusted tenant authenticated by the shared secret.
fn worker_config(
    listen: SocketAddr,
    model: &str,
    model_id: Option<String>,
    backend: &str,
    threads: usize,
    kv_tokens: Option<usize>,
) -> Result<Config, String> {
    let secret = std::env::var("TOLLGATE_WORKER_SECRET").map_err(|_| {
        "set TOLLGATE_WORKER_SECRET: the shared secret gateways send as their api_key".to_string()
    })?;
    if secret.len() < 16 {
        return Err("TOLLGATE_WORKER_SECRET must be at least 16 characters".into());
    }
    let id = model_id.unwrap_or_else(|| model.to_string());
    let digest = hex::encode(keys::digest(&secret));
    let kv = kv_tokens.map_or(String::new(), |k| format!(", kv_tokens = {k}"));
    let text = format!(
        r#"[server]
listen = "{listen}"

[[models]]
id = {id:?}
source = {model:?}

[[pools]]
name = "worker"
model = {id:?}
workers = [{{ kind = "engine", backend = {backend:?}, threads = {threads}{kv} }}]

[[tenants]]
id = "gateway"
keys_sha256 = ["{digest}"]
trusted = true

# The gateway in front meters and limits; a worker does neither.
[metering]
enabled = false
"#
    );
    Config::from_toml(&text).map_err(|e| e.to_string())
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(cfg) => {
            let workers: usize = cfg
                .pools
                .iter()
                .flat_map(|p| &p.workers)
                .map(|w| match w {
                    gateway::config::WorkerConfig::Sim(s) => s.count,
                    gateway::config::WorkerConfig::Openai(_)
                    | gateway::config::WorkerConfig::Engine(_) => 1,
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
    }
}

fn usage(
    since: &str,
    tenant: Option<&str>,
    format: UsageFormat,
    db: Option<PathBuf>,
    config: Option<PathBuf>,
) -> ExitCode {
    use gateway::meter::export;
    let db = match db {
        Some(db) => db,
        None => match load_config(config) {
            Ok((cfg, path)) => {
                gateway::state::resolve_relative(path.as_deref(), &cfg.metering.path)
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let since_ms = match export::parse_since(since) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !db.exists() {
        eprintln!("error: no usage database at {}", db.display());
        return ExitCode::FAILURE;
    }
    // What stopped gateways left in their journals first (a running one's are its own).
    if let Err(e) = gateway::meter::recover(&db) {
        eprintln!(
            "warning: {}: the journals of stopped gateways were not copied: {e}",
            db.display()
        );
    }
    match export::totals(&db, since_ms, tenant) {
        Ok(rows) => {
            match format {
                UsageFormat::Csv => print!("{}", export::to_csv(&rows)),
                UsageFormat::Json => match serde_json::to_string_pretty(&rows) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", db.display());
            ExitCode::FAILURE
        }
    }
}

fn fetch_model(name: &str) -> ExitCode {
    let Some(k) = gateway::model_fetch::KNOWN.iter().find(|k| k.name == name) else {
        let known: Vec<_> = gateway::model_fetch::KNOWN.iter().map(|k| k.name).collect();
        eprintln!("error: unknown model {name:?}; known: {}", known.join(", "));
        return ExitCode::from(2);
    };
    match gateway::model_fetch::ensure(k) {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn new_key(tenant: &str) -> ExitCode {
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
