//! `loadtest run SCENARIO`: plays every tenant of a scenario against a gateway at once,
//! then reports per tenant.
//!
//! An open-loop tenant's requests are scheduled ahead (a pacer thread releases each at its
//! intended time, Poisson or evenly spaced) whatever the answers, over its own pool of
//! keep-alive connections; latencies count from the intended time, so a gateway that
//! stalls cannot hide its queueing. A closed-loop tenant is a number of users, each
//! sending its next request when its last one has ended. Requests intended (or sent)
//! during the warm-up are not counted; the window's rates are over `duration_secs`; at the
//! window's end no new request starts, and those in flight have `drain_secs` to finish.
//! A batch tenant's requests go as one batch through the Batch API ([`crate::batch`]).

use crate::exchange::{connect, exchange, Conn, Exchange};
use crate::report::{Report, Stats, TenantReport};
use crate::scenario::{Arrival, Conversation, Scenario, TenantLoad, Traffic};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// The scenario file (TOML; see `config/scenarios/`).
    scenario: PathBuf,
    /// The gateway's base URL, in place of the scenario's `target`.
    #[arg(long)]
    target: Option<String>,
    /// Seconds of measured load, in place of the scenario's.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of warm-up, in place of the scenario's.
    #[arg(long)]
    warmup: Option<f64>,
    /// Also write the report as JSON to this file (`-`: JSON on stdout, no table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also print each tenant's requests and weighted tokens second by second.
    #[arg(long)]
    timeline: bool,
}

/// When the run's phases begin and end.
#[derive(Clone, Copy)]
struct Times {
    start: Instant,
    window: Instant,
    end: Instant,
    deadline: Instant,
}

pub async fn run(a: RunArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.scenario)
        .map_err(|e| format!("{}: {e}", a.scenario.display()))?;
    let mut sc = Scenario::parse(&text).map_err(|e| format!("{}: {e}", a.scenario.display()))?;
    if let Some(t) = a.target {
        sc.target = t;
    }
    if let Some(d) = a.duration {
        sc.duration_secs = d;
    }
    if let Some(w) = a.warmup {
        sc.warmup_secs = w;
    }
    sc.check()?;
    let report = execute(&sc).await?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    match a.json {
        Some(p) if p.as_os_str() == "-" => {
            println!("{json}");
            return Ok(());
        }
        Some(p) => {
            print!("{}", report.table());
            std::fs::write(&p, json).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        None => print!("{}", report.table()),
    }
    if a.timeline {
        print!("{}", report.timeline());
    }
    Ok(())
}

/// Plays a (checked) scenario and reports.
pub async fn execute(sc: &Scenario) -> Result<Report, String> {
    let uri: http::Uri = sc.target.parse().map_err(|e| format!("target: {e}"))?;
    let authority = uri.authority().ok_or("target needs host:port")?.to_string();
    let start = Instant::now() + Duration::from_millis(100);
    let window = start + Duration::from_secs_f64(sc.warmup_secs);
    let end = window + Duration::from_secs_f64(sc.duration_secs);
    let times = Times {
        start,
        window,
        end,
        deadline: end + Duration::from_secs_f64(sc.drain_secs),
    };
    let mut runs = Vec::new();
    for (i, t) in sc.tenants.iter().enumerate() {
        let player = Player {
            load: Arc::new(t.clone()),
            key: Arc::from(t.api_key()?),
            authority: Arc::from(authority.as_str()),
            seed: sc.seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
            times,
        };
        let traffic = t.traffic()?;
        runs.push((
            traffic,
            match traffic {
                Traffic::Open { rate, arrival } => tokio::spawn(player.open_loop(rate, arrival)),
                Traffic::Closed { users } => tokio::spawn(player.closed_loop(users)),
                Traffic::Batch { requests } => tokio::spawn(player.batch().play(requests)),
            },
        ));
    }
    let mut tenants = Vec::new();
    for (t, (traffic, run)) in sc.tenants.iter().zip(runs) {
        let stats = run.await.map_err(|e| e.to_string())?;
        let (offered, users, batch) = match traffic {
            Traffic::Open { rate, .. } => (Some(rate), None, None),
            Traffic::Closed { users } => (None, Some(users), None),
            Traffic::Batch { requests } => (None, None, Some(requests)),
        };
        let mut report = TenantReport::new(
            &t.name,
            offered,
            users,
            t.output_weight,
            sc.duration_secs,
            &stats,
        );
        report.batch = batch;
        tenants.push(report);
    }
    Ok(Report {
        target: sc.target.clone(),
        duration_secs: sc.duration_secs,
        tenants,
    })
}

/// One tenant's traffic as it is played.
#[derive(Clone)]
struct Player {
    load: Arc<TenantLoad>,
    key: Arc<str>,
    authority: Arc<str>,
    seed: u64,
    times: Times,
}

impl Player {
    /// This tenant's traffic as one batch ([`crate::batch`]).
    fn batch(self) -> crate::batch::BatchPlayer {
        crate::batch::BatchPlayer {
            load: self.load,
            key: self.key,
            authority: self.authority,
            seed: self.seed,
            start: self.times.start,
            window: self.times.window,
            end: self.times.end,
        }
    }

    /// Request `n`, intended at `intended`, on `conn` (opened or reopened as needed),
    /// counted in `stats` when it falls in the window; the next turn of `conv` (which it
    /// then continues, or ends: past `turns`, or when it failed).
    async fn one(
        &self,
        conn: &mut Option<Conn>,
        stats: &mut Stats,
        intended: Instant,
        n: u64,
        conv: &mut Conversation,
    ) {
        let measured = intended >= self.times.window;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = connect(&self.authority).await.ok();
        }
        let outcome = match conn.as_mut() {
            None => Some(Exchange::default()),
            Some(c) => {
                let (body, prompt) = self.load.turn(self.seed, n, conv);
                let x = exchange(c, &self.authority, self.load.path(), &self.key, body);
                let x = tokio::time::timeout_at(self.times.deadline, x).await.ok();
                match &x {
                    Some(x) if x.status == Some(200) && !x.stream_error => {
                        conv.turns.push((prompt, x.answer.clone()));
                        conv.previous = x.stored_id.clone();
                    }
                    _ => conv.turns.clear(),
                }
                if conv.turns.len() >= self.load.turns as usize || conv.turns.is_empty() {
                    *conv = Conversation::default();
                }
                x
            }
        };
        match outcome {
            Some(x) => {
                if x.status.is_none() {
                    *conn = None;
                }
                if measured {
                    stats.record(self.times.window, intended, &x);
                }
            }
            // Cut off by the drain's end: the connection is mid-answer.
            None => {
                *conn = None;
                if measured {
                    stats.unfinished(self.times.window, intended);
                }
            }
        }
    }

    async fn open_loop(self, rate: f64, arrival: Arrival) -> Stats {
        let (tx, rx) = async_channel::unbounded::<(Instant, u64)>();
        let times = self.times;
        let seed = self.seed;
        let pacer = std::thread::spawn(move || {
            // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64);
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut at = 0.0f64;
            for n in 0.. {
                let t = times.start + Duration::from_secs_f64(at);
                if t >= times.end {
                    break;
                }
                let now = Instant::now();
                if t > now {
                    std::thread::sleep(t - now);
                }
                if tx.send_blocking((t, n)).is_err() {
                    break;
                }
                at += match arrival {
                    Arrival::Uniform => 1.0 / rate,
                    Arrival::Poisson => -(1.0 - rng.gen::<f64>()).ln() / rate,
                };
            }
        });
        let mut tasks = Vec::new();
        for _ in 0..self.load.connections {
            let (rx, p) = (rx.clone(), self.clone());
            tasks.push(tokio::spawn(async move {
                let (mut stats, mut conn) = (Stats::default(), None);
                while let Ok((intended, n)) = rx.recv().await {
                    if Instant::now() >= p.times.deadline {
                        // Never sent: the drain is over.
                        if intended >= p.times.window {
                            stats.unfinished(p.times.window, intended);
                        }
                        continue;
                    }
                    let mut alone = Conversation::default();
                    p.one(&mut conn, &mut stats, intended, n, &mut alone).await;
                }
                stats
            }));
        }
        drop(rx);
        let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
        gather(tasks).await
    }

    async fn closed_loop(self, users: usize) -> Stats {
        let mut tasks = Vec::new();
        for u in 0..users {
            let p = self.clone();
            tasks.push(tokio::spawn(async move {
                let (mut stats, mut conn) = (Stats::default(), None);
                let mut conv = Conversation::default();
                tokio::time::sleep_until(p.times.start).await;
                let mut n = u as u64;
                loop {
                    let now = Instant::now();
                    if now >= p.times.end {
                        break;
                    }
                    p.one(&mut conn, &mut stats, now, n, &mut conv).await;
                    n += users as u64;
                    if p.load.think_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(p.load.think_ms)).await;
                    }
                }
                stats
            }));
        }
        gather(tasks).await
    }
}

async fn gather(tasks: Vec<tokio::task::JoinHandle<Stats>>) -> Stats {
    let mut all = Stats::default();
    for t in tasks {
        if let Ok(s) = t.await {
            all.merge(s);
        }
    }
    all
}
