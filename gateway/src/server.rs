//! Running the server: bind the tenant and admin listeners, serve HTTP/1.1 and HTTP/2,
//! probe workers, reload the config on change, and shut down gracefully: on SIGTERM or
//! SIGINT stop accepting, let in-flight requests (streams included) finish up to
//! `server.drain_timeout_secs`, then exit.

use crate::api;
use crate::config::Config;
use crate::route::health;
use crate::state::Shared;
use axum::serve::ListenerExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Binds `config.server.listen` and serves until shutdown. `path` is the config file, if
/// the config came from one (reloads read it again).
pub async fn run(config: Config, path: Option<PathBuf>) -> Result<(), ServeError> {
    let listener = bind(config.server.listen).await?;
    serve(listener, config, path).await
}

/// Serves on an already bound listener until SIGTERM/SIGINT and the drain that follows.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    path: Option<PathBuf>,
) -> Result<(), ServeError> {
    let state = Shared::new(config, path).map_err(ServeError::Setup)?;
    if let Some(addr) = state.server.admin_listen {
        let admin = bind(addr).await?;
        let local = admin.local_addr()?;
        // Printed before the tenant listener's line, which scripts wait for.
        println!("tollgate admin on http://{local}");
        tracing::info!(%local, "admin API listening");
        let app = api::admin::app(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, app).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
    }
    crate::reload::spawn_triggers(state.clone());
    let probes: Vec<_> = state
        .router
        .pools
        .iter()
        .map(|p| tokio::spawn(health::probe_loop(p.clone())))
        .collect();
    let local = listener.local_addr()?;
    // Tests and scripts read this line to find an ephemeral port.
    println!("tollgate listening on http://{local}");
    tracing::info!(%local, "listening");
    let drain = Duration::from_secs_f64(state.server.drain_timeout_secs);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server =
        axum::serve(listener, api::app(state.clone())).with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
    let on_signal = async {
        shutdown_signal().await;
        state.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            ?drain,
            "shutdown: no longer accepting; draining in-flight requests"
        );
        let _ = stop_tx.send(true);
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        r = server => {
            r?;
            tracing::info!("drained; exiting");
        }
        _ = on_signal => tracing::warn!("drain deadline passed with requests in flight; exiting"),
    }
    for p in probes {
        p.abort();
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; shutting down only on ctrl-c");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
