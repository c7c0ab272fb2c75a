//! Rate-limit response headers, from a scope's buckets.
//!
//! OpenAI style: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`: `limit` is the
//! bucket depth (what a full bucket allows at once), `remaining` what could be spent now,
//! `reset` the time until the bucket is full again (`"1.5s"`, `"250ms"`, `"2m5s"`).
//! IETF draft (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy: "tokens";q=Q;w=W`
//! (a quota of Q per window of W seconds: the depth refills in `burst_seconds`) and
//! `RateLimit: "tokens";r=R;t=T` (R remaining, full again in T seconds). Only the buckets
//! the contract limits appear.

use super::gcra::Snapshot;
use super::{Buckets, Contract};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::fmt::Write;

/// `"1.5s"`, `"250ms"`, `"2m5s"`.
pub fn duration(ns: u64) -> String {
    let ms = ns.div_ceil(1_000_000);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = format!("{:.3}", ms as f64 / 1000.0);
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    } else {
        let secs = ms.div_ceil(1000);
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

fn set(h: &mut HeaderMap, name: &'static str, v: String) {
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// Adds the rate-limit headers for `buckets` under `contract`.
pub fn apply(h: &mut HeaderMap, contract: &Contract, buckets: &Buckets) {
    let named: [(&str, Option<Snapshot>); 2] =
        [("requests", buckets.requests), ("tokens", buckets.tokens)];
    let mut policy = String::new();
    let mut state = String::new();
    for (name, snap) in named {
        let Some(s) = snap else { continue };
        let (limit, remaining, reset) = match name {
            "requests" => (
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ),
            _ => (
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ),
        };
        set(h, limit, format!("{}", s.limit.floor() as u64));
        set(h, remaining, format!("{}", s.remaining.floor() as u64));
        set(h, reset, duration(s.reset_ns));
        let sep = if policy.is_empty() { "" } else { ", " };
        let _ = write!(
            policy,
            "{sep}\"{name}\";q={};w={}",
            s.limit.floor() as u64,
            contract.burst_seconds.ceil() as u64
        );
        let _ = write!(
            state,
            "{sep}\"{name}\";r={};t={}",
            s.remaining.floor() as u64,
            s.reset_ns.div_ceil(1_000_000_000)
        );
    }
    if !policy.is_empty() {
        set(h, "ratelimit-policy", policy);
        set(h, "ratelimit", state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration(0), "0ms");
        assert_eq!(duration(250_000_000), "250ms");
        assert_eq!(duration(1_500_000_000), "1.5s");
        assert_eq!(duration(125_000_000_000), "2m5s");
    }
}
