//! `gateway usage`: per-tenant, per-minute totals from the ledger, as CSV or JSON.

use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One tenant's totals over one minute.
#[derive(Debug, Serialize, PartialEq)]
pub struct MinuteTotal {
    /// Start of the minute, RFC 3339 (UTC).
    pub minute: String,
    pub tenant: String,
    pub requests: u64,
    /// Requests that completed (status 200).
    pub completed: u64,
    pub input_tokens: u64,
    /// Of the input tokens, those served from a worker's prefix cache.
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub weighted_tokens: f64,
}

/// Parses `--since`: an RFC 3339 time (`2026-11-27T10:00:00Z`), or a duration ago (`15m`,
/// `2h`, `7d`). Returns Unix milliseconds.
pub fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .map_err(|e| e.to_string());
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        format!("--since {s:?}: expected an RFC 3339 time (2026-11-27T10:00:00Z) or a duration ago (15m, 2h, 7d)")
    })?;
    let t = SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| format!("--since {s:?} is before the epoch"))?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}

/// Totals per tenant and minute since `since_ms`, oldest first.
pub fn totals(
    db: &Path,
    since_ms: i64,
    tenant: Option<&str>,
) -> Result<Vec<MinuteTotal>, rusqlite::Error> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = conn.prepare(
        "SELECT (ts_ms / 60000) * 60000 AS minute, tenant, COUNT(*), SUM(status = '200'),
                SUM(input_tokens), SUM(output_tokens), SUM(weighted_tokens), SUM(cached_tokens)
         FROM usage WHERE ts_ms >= ?1 AND (?2 IS NULL OR tenant = ?2)
         GROUP BY minute, tenant ORDER BY minute, tenant",
    )?;
    let rows = stmt.query_map(params![since_ms, tenant], |r| {
        let minute_ms: i64 = r.get(0)?;
        Ok(MinuteTotal {
            minute: humantime::format_rfc3339_seconds(
                UNIX_EPOCH + Duration::from_millis(minute_ms.max(0) as u64),
            )
            .to_string(),
            tenant: r.get(1)?,
            requests: r.get::<_, i64>(2)? as u64,
            completed: r.get::<_, i64>(3)? as u64,
            input_tokens: r.get::<_, i64>(4)? as u64,
            output_tokens: r.get::<_, i64>(5)? as u64,
            weighted_tokens: r.get(6)?,
            cached_tokens: r.get::<_, i64>(7)? as u64,
        })
    })?;
    rows.collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV with a header line.
pub fn to_csv(rows: &[MinuteTotal]) -> String {
    let mut out = String::from(
        "minute,tenant,requests,completed,input_tokens,output_tokens,weighted_tokens,cached_tokens\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            r.minute,
            csv_field(&r.tenant),
            r.requests,
            r.completed,
            r.input_tokens,
            r.output_tokens,
            r.weighted_tokens,
            r.cached_tokens
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parses_times_and_durations() {
        assert_eq!(parse_since("1970-01-01T00:01:00Z").unwrap(), 60_000);
        let ago = parse_since("2h").unwrap();
        let now = super::super::unix_ms();
        assert!((now - ago - 7_200_000).abs() < 5_000);
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn csv_quotes_odd_tenant_ids() {
        let rows = vec![MinuteTotal {
            minute: "1970-01-01T00:00:00Z".into(),
            tenant: "a,\"b\"".into(),
            requests: 1,
            completed: 1,
            input_tokens: 2,
            cached_tokens: 1,
            output_tokens: 3,
            weighted_tokens: 11.0,
        }];
        assert!(to_csv(&rows).ends_with("1970-01-01T00:00:00Z,\"a,\"\"b\"\"\",1,1,2,3,11,1\n"));
    }
}
