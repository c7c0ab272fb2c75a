//! A scenario tenant whose traffic is one batch (`batch = N`): its N requests written as a
//! batch input file (each the body the tenant would send, not streamed), uploaded to
//! `/v1/files` and run as a batch (`/v1/batches`) when the run starts; then the batch is
//! read four times a second until the window's end, and what it finished between two
//! readings (requests, and their tokens from the batch's `usage`) is counted in the
//! second of the later one. A batch that has not ended by then is cancelled.

use crate::exchange::{connect, Conn, Tokens};
use crate::report::Stats;
use crate::scenario::TenantLoad;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often the batch is read.
const POLL: Duration = Duration::from_millis(250);

/// What a batch tenant needs: its load, key, the gateway, the seed of its prompts, and
/// when the run starts, its window begins and ends.
pub struct BatchPlayer {
    pub load: Arc<TenantLoad>,
    pub key: Arc<str>,
    pub authority: Arc<str>,
    pub seed: u64,
    pub start: Instant,
    pub window: Instant,
    pub end: Instant,
}

/// A batch's counts at one reading: requests finished (all, and answered 2xx) and the
/// tokens of their answers.
#[derive(Clone, Copy, Default, PartialEq)]
struct Reading {
    done: u64,
    ok: u64,
    tokens: Tokens,
    ended: bool,
}

impl BatchPlayer {
    /// Plays the batch; a failure to make or read it is reported on stderr and counted as
    /// a transport error.
    pub async fn play(self, requests: usize) -> Stats {
        let mut stats = Stats::default();
        if let Err(e) = self.run(requests, &mut stats).await {
            eprintln!("tenant {}: the batch: {e}", self.load.name);
            stats.transport += 1;
        }
        stats
    }

    async fn run(&self, requests: usize, stats: &mut Stats) -> Result<(), String> {
        tokio::time::sleep_until(self.start).await;
        let mut conn = connect(&self.authority).await?;
        let file = self.input(requests)?;
        let boundary = "loadtest-batch-file-5b1e";
        let mut form = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n",
            self.load.name
        )
        .into_bytes();
        form.extend_from_slice(&file);
        form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let kind = format!("multipart/form-data; boundary={boundary}");
        let uploaded = self
            .call(&mut conn, "POST", "/v1/files", Some(&kind), form)
            .await?;
        let create = json!({
            "input_file_id": uploaded["id"],
            "endpoint": self.load.path(),
            "completion_window": "24h",
            "metadata": {"loadtest": self.load.name},
        });
        let json = Some("application/json");
        let body = create.to_string().into_bytes();
        let batch = self
            .call(&mut conn, "POST", "/v1/batches", json, body)
            .await?;
        let id = batch["id"]
            .as_str()
            .ok_or("the batch has no id")?
            .to_string();
        let path = format!("/v1/batches/{id}");
        let mut last: Option<Reading> = None;
        let ended = loop {
            let now = Instant::now();
            let at_end = now >= self.end;
            let reading = read(&self.call(&mut conn, "GET", &path, None, Vec::new()).await?);
            if now >= self.window {
                if let Some(before) = last {
                    stats.batch_progress(
                        self.window,
                        now.min(self.end - Duration::from_millis(1)),
                        reading.done - before.done.min(reading.done),
                        reading.ok - before.ok.min(reading.ok),
                        minus(reading.tokens, before.tokens),
                    );
                }
                last = Some(reading);
            }
            if at_end || reading.ended {
                break reading.ended;
            }
            tokio::time::sleep_until((Instant::now() + POLL).min(self.end)).await;
        };
        if !ended {
            let cancel = format!("/v1/batches/{id}/cancel");
            self.call(&mut conn, "POST", &cancel, None, Vec::new())
                .await?;
        }
        Ok(())
    }

    /// The batch's input file: request `n`'s body as the tenant sends it, not streamed.
    fn input(&self, requests: usize) -> Result<Vec<u8>, String> {
        let mut file = Vec::new();
        for n in 0..requests as u64 {
            let mut body: Value = serde_json::from_slice(&self.load.body(self.seed, n))
                .map_err(|e| format!("request {n}: {e}"))?;
            if let Some(o) = body.as_object_mut() {
                o.remove("stream");
                o.remove("stream_options");
            }
            let line = json!({
                "custom_id": format!("r{n}"),
                "method": "POST",
                "url": self.load.path(),
                "body": body,
            });
            file.extend_from_slice(line.to_string().as_bytes());
            file.push(b'\n');
        }
        Ok(file)
    }

    /// `method path` on `conn` (reopened once if it closed), its 2xx answer as JSON.
    async fn call(
        &self,
        conn: &mut Conn,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Value, String> {
        if conn.is_closed() {
            *conn = connect(&self.authority).await?;
        }
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &*self.authority)
            .header("authorization", format!("Bearer {}", self.key));
        if let Some(k) = content_type {
            req = req.header("content-type", k);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        conn.ready().await.map_err(|e| e.to_string())?;
        let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{method} {path}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("{method} {path}: {e}"))
    }
}

/// A batch object's counts.
fn read(b: &Value) -> Reading {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let counts = &b["request_counts"];
    let usage = &b["usage"];
    let (completed, failed) = (n(&counts["completed"]), n(&counts["failed"]));
    Reading {
        done: completed + failed,
        ok: completed,
        tokens: Tokens {
            prompt: n(&usage["input_tokens"]),
            completion: n(&usage["output_tokens"]),
            cached: n(&usage["input_tokens_details"]["cached_tokens"]),
        },
        ended: matches!(
            b["status"].as_str(),
            Some("completed" | "failed" | "expired" | "cancelled")
        ),
    }
}

/// `a − b`, each count at least 0.
fn minus(a: Tokens, b: Tokens) -> Tokens {
    Tokens {
        prompt: a.prompt.saturating_sub(b.prompt),
        completion: a.completion.saturating_sub(b.completion),
        cached: a.cached.saturating_sub(b.cached),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_object_reads_as_its_counts() {
        let b = json!({
            "status": "in_progress",
            "request_counts": {"total": 10, "completed": 4, "failed": 1},
            "usage": {"input_tokens": 50, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 20},
        });
        let r = read(&b);
        assert_eq!((r.done, r.ok, r.ended), (5, 4, false));
        assert_eq!(
            r.tokens,
            Tokens {
                prompt: 50,
                completion: 20,
                cached: 8
            }
        );
        assert!(read(&json!({"status": "cancelled"})).ended);
        let less = minus(
            r.tokens,
            Tokens {
                prompt: 60,
                completion: 5,
                cached: 0,
            },
        );
        assert_eq!((less.prompt, less.completion, less.cached), (0, 15, 8));
    }
}
