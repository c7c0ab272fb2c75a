//! Thread-per-core serving (`server.runtime = "per_core"`, the default): the serving
//! threads, each with its own single-threaded tokio runtime, and the hand-off of accepted
//! connections to them.
//!
//! The acceptor (on the main runtime) gives each new tenant connection to the thread with
//! the fewest open ones. From then on everything the connection's requests do in the
//! gateway — parsing, admission, the upstream call (each thread has its own pool of
//! upstream connections: [`crate::worker::openai`]), rendering — runs on that thread, so
//! a request wakes no other thread of the gateway. A work-stealing runtime moves tasks
//! between threads instead, and on a small machine those wakeups (inter-processor
//! interrupts on a VM) cost more than the balance they buy.
//!
//! Graceful shutdown: when `stop` turns true each thread stops taking connections and
//! lets its in-flight ones finish; [`Cores::drained`] resolves when all have. Dropping
//! [`Cores`] (the server future dropped) ends the threads' runtimes at once.

use crate::metrics::Metrics;
use axum::Router;
use prometheus_client::metrics::gauge::Gauge;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

/// A connection on its way to a serving thread, counted in that thread's open ones.
type Handed = (std::net::TcpStream, SocketAddr, Open);

/// The serving threads.
pub struct Cores {
    cores: Vec<Core>,
}

struct Core {
    tx: mpsc::UnboundedSender<Handed>,
    /// Its open connections (`tollgate_open_connections{thread}`).
    open: Gauge,
    /// Resolves (or errs: the thread is gone) when the thread's server has drained.
    done: Option<oneshot::Receiver<()>>,
    /// Dropped with the core, it ends the thread's runtime, in-flight requests and all.
    _kill: oneshot::Sender<()>,
}

impl Cores {
    /// Starts `n` serving threads (at least one), each serving `app` on the connections it
    /// is handed, until `stop` turns true and they have drained — and, with `background`
    /// (how many background responses run), until none runs (one may be using this
    /// thread's runtime: its task, its upstream connection). `local` is the listener's
    /// address (what the threads' listeners report).
    pub fn start(
        n: usize,
        app: Router,
        metrics: &Metrics,
        local: SocketAddr,
        stop: watch::Receiver<bool>,
        background: Option<watch::Receiver<usize>>,
    ) -> io::Result<Self> {
        let mut cores = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let name = format!("http-{i}");
            let (tx, rx) = mpsc::unbounded_channel();
            let (done_tx, done) = oneshot::channel();
            let (kill, kill_rx) = oneshot::channel::<()>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (app, mut stop) = (app.clone(), stop.clone());
            let mut background = background.clone();
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let listener = Handoff { rx, local };
                    let served = axum::serve(listener, app).with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    });
                    let server = async move {
                        let r = served.await;
                        if let Some(running) = &mut background {
                            let _ = running.wait_for(|n| *n == 0).await;
                        }
                        r
                    };
                    rt.block_on(async {
                        tokio::select! {
                            r = server => {
                                if let Err(e) = r {
                                    tracing::error!(error = %e, "serving thread failed");
                                }
                                let _ = done_tx.send(());
                            }
                            // Its sender dropped with the core: the thread ends.
                            _ = kill_rx => {}
                        }
                    });
                    // Blocking tasks (a schema's compilation) get a moment to end.
                    rt.shutdown_timeout(Duration::from_secs(1));
                })?;
            cores.push(Core {
                tx,
                open: metrics.open_connections(&name),
                done: Some(done),
                _kill: kill,
            });
        }
        Ok(Self { cores })
    }

    /// Hands an accepted connection to the thread with the fewest open connections.
    pub fn hand(&self, tcp: TcpStream, peer: SocketAddr) {
        let Some(core) = self.cores.iter().min_by_key(|c| c.open.get()) else {
            return;
        };
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a serving thread");
                return;
            }
        };
        core.open.inc();
        // A thread that is gone (it panicked) drops the connection; the client sees it
        // closed, and the next pick counts the connection as open there no more.
        let _ = core.tx.send((std, peer, Open(core.open.clone())));
    }

    /// Resolves when every thread's server has drained after `stop`.
    pub async fn drained(&mut self) {
        for c in &mut self.cores {
            if let Some(done) = c.done.take() {
                let _ = done.await;
            }
        }
    }
}

/// One thread's end of the hand-off: an [`axum::serve::Listener`] whose connections come
/// from the acceptor.
struct Handoff {
    rx: mpsc::UnboundedReceiver<Handed>,
    local: SocketAddr,
}

impl axum::serve::Listener for Handoff {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let Some((std, peer, open)) = self.rx.recv().await else {
                // The acceptor is gone: no connection will come (shutdown ends the serve).
                return std::future::pending().await;
            };
            match TcpStream::from_std(std) {
                Ok(tcp) => return (Conn { tcp, _open: open }, peer),
                Err(e) => tracing::warn!(error = %e, "cannot take over a handed connection"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Counts a connection among its thread's open ones while it lives.
struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A handed connection: the stream, counted while open.
pub struct Conn {
    tcp: TcpStream,
    _open: Open,
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
