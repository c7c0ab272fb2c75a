//! Running the server: bind the tenant and admin listeners, serve HTTP/1.1 and HTTP/2,
//! probe workers, reload the config on change, and shut down gracefully: on SIGTERM or
//! SIGINT stop accepting, let in-flight requests (streams included) and background
//! responses finish up to `server.drain_timeout_secs`, then exit.
//!
//! Tenant connections are served by one thread per core ([`cores`], the default) or by
//! one work-stealing runtime (`server.runtime = "shared"`).

mod cores;

use crate::api;
use crate::config::{Config, RuntimeKind};
use crate::route::health;
use crate::state::Shared;
use axum::serve::ListenerExt;
use axum::Router;
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
    crate::batch::runner::resume(&state);
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = api::app(state.clone());
    let threads = serving_threads(state.server.threads);
    let background = state.responses.as_ref().map(|s| s.running_count());
    let server = async {
        match state.server.runtime {
            RuntimeKind::PerCore => {
                let running = background.clone();
                per_core(listener, app, &state.metrics, threads, stop_rx, running).await?
            }
            RuntimeKind::Shared => shared(listener, app, stop_rx).await?,
        }
        // Background responses run apart from any connection: they get the drain too.
        if let Some(mut running) = background {
            let n = *running.borrow();
            if n > 0 {
                tracing::info!(running = n, "shutdown: waiting for background responses");
            }
            let _ = running.wait_for(|n| *n == 0).await;
        }
        // Running batches stop sending requests; those in flight end and are kept.
        if let Some(batches) = &state.batches {
            batches.drain();
            let mut running = batches.running_count();
            let _ = running.wait_for(|n| *n == 0).await;
        }
        Ok::<_, std::io::Error>(())
    };
    let on_signal = async {
        shutdown_signal().await;
        state.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            ?drain,
            "shutdown: no longer accepting; draining in-flight requests"
        );
        let _ = stop_tx.send(true);
        if let Some(batches) = &state.batches {
            batches.drain();
        }
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
    // The journal's last records into the database, and its segment removed.
    if let Some(l) = &state.ledger {
        if !l.close().await {
            tracing::warn!("usage ledger: the journal stays on disk; the next start copies it");
        }
    }
    Ok(())
}

/// Threads serving tenant HTTP for `server.threads` (0: one per CPU).
pub fn serving_threads(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Serves on the calling runtime (the work-stealing one `main` builds for `shared`).
async fn shared(
    listener: TcpListener,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await
}

/// Accepts here and hands each connection to a serving thread ([`cores`]); after `stop`,
/// waits until every thread has drained.
async fn per_core(
    listener: TcpListener,
    app: Router,
    metrics: &crate::metrics::Metrics,
    threads: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
    background: Option<tokio::sync::watch::Receiver<usize>>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let mut cores = cores::Cores::start(threads, app, metrics, local, stop.clone(), background)?;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    cores.hand(tcp, peer);
                }
                Err(e) => {
                    // Out of file descriptors, for one: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    drop(listener);
    cores.drained().await;
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
