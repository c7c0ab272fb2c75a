//! Batches: created, started, their results recorded as each request ends, cancelled,
//! and ended (output and error files written, result rows dropped, in one transaction).

use super::{
    batch_row, listed, now_s, put_file, BatchRow, BatchStore, Ending, LineResult, Listing, Result,
    BATCH_COLUMNS, RUNNING,
};
use rusqlite::{params, OptionalExtension, TransactionBehavior};

impl BatchStore {
    /// Records a new batch (its `id`, `tenant`, `created_at` and request fields set); its
    /// input file is kept at least as long as the batch may run.
    pub fn create_batch(&self, b: &BatchRow) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE files SET expires_at = MAX(expires_at, ?3) WHERE id = ?1 AND tenant = ?2",
            params![b.input_file_id, b.tenant, b.expires_at],
        )?;
        tx.execute(
            "INSERT INTO batches (id, tenant, created_at, purge_at, endpoint, input_file_id,
                 completion_window, status, metadata, expires_at, output_keep_s)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                b.id,
                b.tenant,
                b.created_at,
                i64::MAX,
                b.endpoint,
                b.input_file_id,
                b.completion_window,
                b.status,
                b.metadata,
                b.expires_at,
                b.output_keep_s
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// One of `tenant`'s batches.
    pub fn batch(&self, tenant: &str, id: &str) -> Result<Option<BatchRow>> {
        Ok(self
            .conn()?
            .query_row(
                &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND tenant = ?2"),
                params![id, tenant],
                batch_row,
            )
            .optional()?)
    }

    /// A page of `tenant`'s batches, and whether more follow.
    pub fn batches(&self, tenant: &str, page: &Listing<'_>) -> Result<(Vec<BatchRow>, bool)> {
        let conn = self.conn()?;
        listed(
            &conn,
            &format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE tenant = ?1 AND purge_at > ?2
                 AND ?3 = ''"
            ),
            "batches",
            tenant,
            page,
            "",
            batch_row,
        )
    }

    /// Batches that have not ended, oldest first (to resume at start).
    pub fn unfinished(&self) -> Result<Vec<BatchRow>> {
        let conn = self.conn()?;
        let mut q = conn.prepare(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE status IN {RUNNING} ORDER BY created_at, id"
        ))?;
        let rows = q.query_map([], batch_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Its input checked: `total` requests, run from now (`in_progress`, unless it was
    /// cancelled meanwhile).
    pub fn start(&self, id: &str, total: usize, model: Option<&str>) -> Result<()> {
        self.conn()?.execute(
            "UPDATE batches SET total = ?2, model = ?4,
                 status = CASE status WHEN 'validating' THEN 'in_progress' ELSE status END,
                 in_progress_at = CASE status WHEN 'validating' THEN ?3 ELSE in_progress_at END
             WHERE id = ?1",
            params![id, total as i64, now_s(), model],
        )?;
        Ok(())
    }

    /// Its input refused: `errors` (a JSON array) says why.
    pub fn fail(&self, id: &str, errors: &str) -> Result<()> {
        let now = now_s();
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE batches SET status = 'failed', errors = ?2, failed_at = ?3, purge_at = ?4
             WHERE id = ?1",
            params![id, errors, now, self.kept_until(now)],
        )?;
        tx.execute("DELETE FROM batch_results WHERE batch = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Asks `tenant`'s batch `id` to stop: `cancelling` where it runs (the batch as it is
    /// now, after the change; `None` where there is none).
    pub fn cancel(&self, tenant: &str, id: &str) -> Result<Option<BatchRow>> {
        let conn = self.conn()?;
        conn.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = ?3
             WHERE id = ?1 AND tenant = ?2 AND status IN ('validating', 'in_progress')",
            params![id, tenant, now_s()],
        )?;
        Ok(conn
            .query_row(
                &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND tenant = ?2"),
                params![id, tenant],
                batch_row,
            )
            .optional()?)
    }

    /// The status of batch `id` now.
    pub fn status(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .conn()?
            .query_row("SELECT status FROM batches WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The lines of batch `id` already done.
    pub fn done_lines(&self, id: &str) -> Result<Vec<usize>> {
        let conn = self.conn()?;
        let mut q = conn.prepare("SELECT line FROM batch_results WHERE batch = ?1")?;
        let rows = q.query_map([id], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|l| l.map(|l| l as usize))
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Records one finished request of batch `id`, and counts it (once: a line recorded
    /// again is ignored).
    pub fn record(&self, id: &str, r: &LineResult) -> Result<()> {
        self.record_all(&[(id, r)])
    }

    /// Records finished requests (each of its batch), in one transaction.
    pub fn record_all(&self, results: &[(&str, &LineResult)]) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR IGNORE INTO batch_results (batch, line, ok, output) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut count = tx.prepare_cached(
                "UPDATE batches SET completed = completed + ?2, failed = failed + ?3,
                     input_tokens = input_tokens + ?4, cached_tokens = cached_tokens + ?5,
                     output_tokens = output_tokens + ?6, reasoning_tokens = reasoning_tokens + ?7
                 WHERE id = ?1",
            )?;
            for (id, r) in results {
                if put.execute(params![id, r.line as i64, r.ok, r.output])? > 0 {
                    count.execute(params![
                        id,
                        r.ok as i64,
                        !r.ok as i64,
                        r.input_tokens,
                        r.cached_tokens,
                        r.output_tokens,
                        r.reasoning_tokens
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks batch `id` as writing its files (`finalizing`).
    pub fn finalizing(&self, id: &str) -> Result<()> {
        self.conn()?.execute(
            "UPDATE batches SET finalizing_at = COALESCE(finalizing_at, ?2),
                 status = CASE status WHEN 'in_progress' THEN 'finalizing' ELSE status END
             WHERE id = ?1",
            params![id, now_s()],
        )?;
        Ok(())
    }

    /// Ends batch `id`: its results (output lines in line order) become its output file
    /// and its error file (each only where it has lines), its result rows go, and its
    /// status becomes `ending`'s; all in one transaction.
    pub fn finish(&self, id: &str, ending: Ending) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some((tenant, keep_s)) = tx
            .query_row(
                "SELECT tenant, output_keep_s FROM batches WHERE id = ?1",
                [id],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
            .optional()?
        else {
            // Deleted while it ran (its tenant's data deleted): what it did since goes too.
            tx.execute("DELETE FROM batch_results WHERE batch = ?1", [id])?;
            tx.commit()?;
            return Ok(());
        };
        let now = now_s();
        let kept = self.kept_until(now);
        let outputs_kept = keep_s.map_or(kept, |k| now.saturating_add(k));
        let file_of = |ok: bool| -> Result<Option<String>> {
            let mut q = tx.prepare(
                "SELECT output FROM batch_results WHERE batch = ?1 AND ok = ?2 ORDER BY line",
            )?;
            let mut content = Vec::new();
            for line in q.query_map(params![id, ok], |r| r.get::<_, String>(0))? {
                content.extend_from_slice(line?.as_bytes());
                content.push(b'\n');
            }
            if content.is_empty() {
                return Ok(None);
            }
            let (name, purpose) = match ok {
                true => (format!("{id}_output.jsonl"), "batch_output"),
                false => (format!("{id}_error.jsonl"), "batch_output"),
            };
            Ok(Some(
                put_file(&tx, &tenant, &name, purpose, &content, outputs_kept)?.id,
            ))
        };
        let output = file_of(true)?;
        let errors = file_of(false)?;
        let at = match ending {
            Ending::Completed => "completed_at",
            Ending::Cancelled => "cancelled_at",
            Ending::Expired => "expired_at",
        };
        tx.execute(
            &format!(
                "UPDATE batches SET status = ?2, output_file_id = ?3, error_file_id = ?4,
                     {at} = ?5, finalizing_at = COALESCE(finalizing_at, ?5), purge_at = ?6
                 WHERE id = ?1"
            ),
            params![id, ending.status(), output, errors, now, kept],
        )?;
        tx.execute("DELETE FROM batch_results WHERE batch = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }
}
