//! What a scenario run measured, per tenant: requests by outcome, admitted rates in
//! requests and tokens (weighted as the gateway charges them, set against the contract the
//! gateway states in `RateLimit-Policy`), latency percentiles (time to first token, whole
//! answer, gaps between a stream's pieces), and the same counts second by second (so that a
//! limit changed during the run shows when it took effect), as a table and as JSON.

use crate::exchange::{Exchange, Tokens};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use tokio::time::Instant;

/// Latencies are kept in microseconds, up to 10 minutes.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// One tenant's measured requests, gathered as they end. Requests by outcome and tokens
/// are counted per second ([`Stats::seconds`]); the totals are their sums.
pub struct Stats {
    pub other: BTreeMap<u16, u64>,
    pub transport: u64,
    pub stream_errors: u64,
    pub unfinished: u64,
    pub ttft: Histogram<u64>,
    pub e2e: Histogram<u64>,
    pub gaps: Histogram<u64>,
    /// The latest `RateLimit-Policy` tokens quota and window seen, and when.
    pub policy: Option<(Instant, (f64, f64))>,
    /// Per second of the window (by each request's intended or sending time).
    pub seconds: Vec<SecondCounts>,
}

/// One second's requests of one tenant.
#[derive(Debug, Default, Clone, Copy)]
pub struct SecondCounts {
    pub sent: u64,
    pub ok: u64,
    pub limited: u64,
    pub saturated: u64,
    pub tokens: Tokens,
}

impl SecondCounts {
    fn add(&mut self, o: &SecondCounts) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.limited += o.limited;
        self.saturated += o.saturated;
        self.tokens.add(o.tokens);
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            other: BTreeMap::new(),
            transport: 0,
            stream_errors: 0,
            unfinished: 0,
            ttft: histogram(),
            e2e: histogram(),
            gaps: histogram(),
            policy: None,
            seconds: Vec::new(),
        }
    }
}

fn us(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_micros().max(1) as u64
}

impl Stats {
    /// The counts of second `at − window`.
    fn second(&mut self, window: Instant, at: Instant) -> &mut SecondCounts {
        let i = at.saturating_duration_since(window).as_secs() as usize;
        if self.seconds.len() <= i {
            self.seconds.resize(i + 1, SecondCounts::default());
        }
        &mut self.seconds[i]
    }

    /// Counts one measured request, intended (or sent) at `intended`, in the window that
    /// began at `window`.
    pub fn record(&mut self, window: Instant, intended: Instant, x: &Exchange) {
        self.second(window, intended).sent += 1;
        if let (Some(p), Some(end)) = (x.policy, x.end) {
            self.policy = Some((end, p));
        }
        match x.status {
            None => self.transport += 1,
            Some(200) => {
                let sec = self.second(window, intended);
                sec.ok += 1;
                if let Some(u) = x.usage {
                    sec.tokens.add(u);
                }
                if x.stream_error {
                    self.stream_errors += 1;
                }
                if let Some(end) = x.end {
                    let _ = self.e2e.record(us(intended, end).min(600_000_000));
                }
                if let Some(first) = x.first {
                    let _ = self.ttft.record(us(intended, first).min(600_000_000));
                }
                for &g in &x.gaps_us {
                    let _ = self.gaps.record(g.clamp(1, 600_000_000));
                }
            }
            Some(429) => self.second(window, intended).limited += 1,
            Some(503) => self.second(window, intended).saturated += 1,
            Some(s) => *self.other.entry(s).or_default() += 1,
        }
    }

    /// Counts what a batch finished since its last reading (`done` requests, `ok` of them
    /// answered 2xx, and their tokens), read at `at`, in the window that began at
    /// `window`.
    pub fn batch_progress(
        &mut self,
        window: Instant,
        at: Instant,
        done: u64,
        ok: u64,
        tokens: Tokens,
    ) {
        let sec = self.second(window, at);
        sec.sent += done;
        sec.ok += ok;
        sec.tokens.add(tokens);
    }

    /// A measured request that was never answered (cut off, or never sent, at the drain's
    /// end).
    pub fn unfinished(&mut self, window: Instant, intended: Instant) {
        self.unfinished += 1;
        self.second(window, intended).sent += 1;
    }

    /// Adds another part of the same tenant's requests.
    pub fn merge(&mut self, o: Stats) {
        for (s, n) in o.other {
            *self.other.entry(s).or_default() += n;
        }
        self.transport += o.transport;
        self.stream_errors += o.stream_errors;
        self.unfinished += o.unfinished;
        if self.seconds.len() < o.seconds.len() {
            self.seconds
                .resize(o.seconds.len(), SecondCounts::default());
        }
        for (a, b) in self.seconds.iter_mut().zip(&o.seconds) {
            a.add(b);
        }
        let _ = self.ttft.add(&o.ttft);
        let _ = self.e2e.add(&o.e2e);
        let _ = self.gaps.add(&o.gaps);
        self.policy = match (self.policy, o.policy) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
    }
}

/// Percentiles in milliseconds (`null` where nothing was measured).
#[derive(Debug, Serialize, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let q = |p: f64| (!h.is_empty()).then(|| h.value_at_quantile(p) as f64 / 1000.0);
        Self {
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: (!h.is_empty()).then(|| h.max() as f64 / 1000.0),
        }
    }
}

/// One tenant's line of the report.
#[derive(Debug, Serialize)]
pub struct TenantReport {
    pub name: String,
    /// Open loop: requests per second offered; closed loop: `null`.
    pub offered_rps: Option<f64>,
    pub users: Option<usize>,
    /// A batch tenant: its requests (`sent` and `ok` then count those the batch finished
    /// in the window, and answered 2xx).
    pub batch: Option<usize>,
    pub sent: u64,
    pub ok: u64,
    /// 429: past the tenant's contract.
    pub limited: u64,
    /// 503: the fleet was saturated (not charged to the tenant).
    pub saturated: u64,
    /// Other statuses, by status.
    pub other: BTreeMap<u16, u64>,
    /// No answer (connection failures).
    pub transport_errors: u64,
    /// 200s whose stream carried an error or broke off.
    pub stream_errors: u64,
    /// Still running when the drain time was over.
    pub unfinished: u64,
    pub ok_rps: f64,
    pub prompt_tokens_per_s: f64,
    pub cached_tokens_per_s: f64,
    pub completion_tokens_per_s: f64,
    /// `prompt + output_weight × completion` per second, as the gateway charges.
    pub weighted_tokens_per_s: f64,
    /// The contract as the gateway states it: `RateLimit-Policy`'s tokens quota over its
    /// window, the latest seen.
    pub contract_tokens_per_s: Option<f64>,
    /// Weighted tokens admitted per second, as a share of the contract.
    pub share_of_contract: Option<f64>,
    pub ttft: Percentiles,
    pub e2e: Percentiles,
    /// Gaps between a stream's pieces of text.
    pub inter_token: Percentiles,
    /// Second by second.
    pub timeline: Vec<Second>,
}

/// One second of a tenant's window: its requests by outcome, and the weighted tokens of
/// those served.
#[derive(Debug, Serialize, Clone, Copy, PartialEq)]
pub struct Second {
    pub second: usize,
    pub sent: u64,
    pub ok: u64,
    pub limited: u64,
    pub saturated: u64,
    pub weighted_tokens: f64,
}

impl TenantReport {
    pub fn new(
        name: &str,
        offered_rps: Option<f64>,
        users: Option<usize>,
        output_weight: f64,
        seconds: f64,
        s: &Stats,
    ) -> Self {
        let per_s = |n: u64| n as f64 / seconds;
        let total = s.seconds.iter().fold(SecondCounts::default(), |mut t, x| {
            t.add(x);
            t
        });
        let weighted = per_s(total.tokens.prompt) + output_weight * per_s(total.tokens.completion);
        let contract = s
            .policy
            .map(|(_, p)| p)
            .filter(|p| p.1 > 0.0)
            .map(|(q, w)| q / w);
        Self {
            name: name.to_string(),
            offered_rps,
            users,
            batch: None,
            sent: total.sent,
            ok: total.ok,
            limited: total.limited,
            saturated: total.saturated,
            other: s.other.clone(),
            transport_errors: s.transport,
            stream_errors: s.stream_errors,
            unfinished: s.unfinished,
            ok_rps: per_s(total.ok),
            prompt_tokens_per_s: per_s(total.tokens.prompt),
            cached_tokens_per_s: per_s(total.tokens.cached),
            completion_tokens_per_s: per_s(total.tokens.completion),
            weighted_tokens_per_s: weighted,
            contract_tokens_per_s: contract,
            share_of_contract: contract.filter(|c| *c > 0.0).map(|c| weighted / c),
            ttft: Percentiles::of(&s.ttft),
            e2e: Percentiles::of(&s.e2e),
            inter_token: Percentiles::of(&s.gaps),
            timeline: s
                .seconds
                .iter()
                .enumerate()
                .map(|(second, c)| Second {
                    second,
                    sent: c.sent,
                    ok: c.ok,
                    limited: c.limited,
                    saturated: c.saturated,
                    weighted_tokens: c.tokens.prompt as f64
                        + output_weight * c.tokens.completion as f64,
                })
                .collect(),
        }
    }
}

/// A whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    /// Seconds of the measured window (the rates' denominator).
    pub duration_secs: f64,
    pub tenants: Vec<TenantReport>,
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        if v < 10.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.0}")
        }
    })
}

impl Report {
    /// The report as a table, one line per tenant.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} for {} s\n{:<12} {:>9} {:>7} {:>7} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>15} {:>15} {:>13}",
            self.target,
            self.duration_secs,
            "tenant",
            "offered",
            "sent",
            "ok",
            "429",
            "503",
            "other",
            "ok/s",
            "in tok/s",
            "cached/s",
            "out tok/s",
            "weighted/s",
            "contract/s",
            "share",
            "ttft p50/p99 ms",
            "e2e p50/p99 ms",
            "itl p50/p99",
        );
        for t in &self.tenants {
            let offered = match (t.offered_rps, t.users, t.batch) {
                (Some(r), _, _) => format!("{r}/s"),
                (_, Some(u), _) => format!("{u} users"),
                (_, _, Some(n)) => format!("batch {n}"),
                _ => "-".into(),
            };
            let other: u64 =
                t.other.values().sum::<u64>() + t.transport_errors + t.stream_errors + t.unfinished;
            let _ = writeln!(
                s,
                "{:<12} {:>9} {:>7} {:>7} {:>6} {:>6} {:>6} {:>8.1} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>10} {:>7} {:>15} {:>15} {:>13}",
                t.name,
                offered,
                t.sent,
                t.ok,
                t.limited,
                t.saturated,
                other,
                t.ok_rps,
                t.prompt_tokens_per_s,
                t.cached_tokens_per_s,
                t.completion_tokens_per_s,
                t.weighted_tokens_per_s,
                t.contract_tokens_per_s.map_or("-".into(), |c| format!("{c:.0}")),
                t.share_of_contract
                    .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
                format!("{}/{}", ms(t.ttft.p50_ms), ms(t.ttft.p99_ms)),
                format!("{}/{}", ms(t.e2e.p50_ms), ms(t.e2e.p99_ms)),
                format!("{}/{}", ms(t.inter_token.p50_ms), ms(t.inter_token.p99_ms)),
            );
        }
        s
    }

    /// Each tenant's timeline as a table: a line per second.
    pub fn timeline(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:>6} {:>7} {:>7} {:>6} {:>6} {:>10}",
            "tenant", "second", "sent", "ok", "429", "503", "weighted"
        );
        for t in &self.tenants {
            for x in &t.timeline {
                let _ = writeln!(
                    s,
                    "{:<12} {:>6} {:>7} {:>7} {:>6} {:>6} {:>10.0}",
                    t.name, x.second, x.sent, x.ok, x.limited, x.saturated, x.weighted_tokens
                );
            }
        }
        s
    }
}
