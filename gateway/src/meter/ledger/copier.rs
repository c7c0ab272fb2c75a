//! The ledger thread: every tick it reads what was appended to the live segments since its
//! last pass and commits it, with the audit entries and the new read positions, in one
//! transaction; it swaps a segment past its size for a new one, removes one copied whole
//! once no writer holds it, answers `full` synchronous requests with one `fdatasync` per
//! segment, and checkpoints the WAL from a thread of its own.

use super::recovery::remove_copied;
use super::*;

/// A segment being copied: a reader of its own, the position committed, and bytes read
/// past it that are not a whole frame yet.
pub(super) struct Tail {
    seg: Arc<Segment>,
    reader: File,
    copied: u64,
    pending: Vec<u8>,
    /// The shard it is the live segment of, until retired.
    shard: usize,
    /// No more appends are coming: copied whole, it is removed.
    retired: bool,
}

impl Tail {
    pub(super) fn new(seg: Arc<Segment>, shard: usize) -> std::io::Result<Self> {
        let reader = File::open(&seg.path)?;
        Ok(Self {
            seg,
            reader,
            copied: 0,
            pending: Vec::new(),
            shard,
            retired: false,
        })
    }

    /// Whether appends may still be under way into it (handles the ledger does not own).
    fn in_use(&self) -> bool {
        !self.retired || Arc::strong_count(&self.seg) > 1
    }
}

/// The ledger thread's state.
pub(super) struct Copier {
    pub(super) conn: Connection,
    pub(super) db: PathBuf,
    pub(super) rx: mpsc::Receiver<Msg>,
    pub(super) counters: Arc<Counters>,
    pub(super) shards: Shards,
    /// Segments being copied: the shards' live ones and retired ones.
    pub(super) tails: Vec<Tail>,
    pub(super) audits: Vec<AuditEntry>,
    pub(super) segment_bytes: u64,
    pub(super) next_segment: u64,
}

impl Copier {
    pub(super) fn run(&mut self) {
        let mut next = Instant::now() + TICK;
        loop {
            let mut msgs = Vec::new();
            match self
                .rx
                .recv_timeout(next.saturating_duration_since(Instant::now()))
            {
                Ok(m) => {
                    msgs.push(m);
                    msgs.extend(self.rx.try_iter());
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Every handle is gone.
                Err(RecvTimeoutError::Disconnected) => {
                    self.copy();
                    return;
                }
            }
            let (mut syncs, mut flushes, mut closes) = (Vec::new(), Vec::new(), Vec::new());
            for m in msgs {
                match m {
                    Msg::Audit(e) => self.audits.push(e),
                    Msg::Sync(seg, ack) => syncs.push((seg, ack)),
                    Msg::Flush(ack) => flushes.push(ack),
                    Msg::Close(ack) => closes.push(ack),
                }
            }
            // First the fsyncs: requests' last bytes wait for them.
            sync(syncs);
            if Instant::now() < next && flushes.is_empty() && closes.is_empty() {
                continue;
            }
            if !closes.is_empty() {
                for shard in self.shards.iter() {
                    shard.store(None);
                }
                for t in &mut self.tails {
                    t.retired = true;
                }
            }
            let mut ok = self.copy();
            if !closes.is_empty() {
                let deadline = Instant::now() + CLOSE_WAIT;
                while ok && !self.tails.is_empty() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                    ok = self.copy();
                }
                ok &= self.tails.is_empty();
            }
            for ack in flushes.into_iter().chain(closes) {
                let _ = ack.send(ok);
            }
            let full: Vec<usize> = self
                .tails
                .iter()
                .filter(|t| !t.retired && t.copied >= self.segment_bytes)
                .map(|t| t.shard)
                .collect();
            for shard in full {
                self.rotate(shard);
            }
            next = Instant::now() + TICK;
        }
    }

    /// Reads what was appended since the last pass and commits it with the audit entries
    /// and the new positions; removes the retired segments copied whole. `false`: the
    /// commit failed (retried next pass).
    fn copy(&mut self) -> bool {
        let mut records = Vec::new();
        let mut positions = Vec::new();
        // Per tail: (bytes parsed, damaged frames, copied whole).
        let mut parsed = Vec::with_capacity(self.tails.len());
        for t in &mut self.tails {
            // A retired segment is read to its end once no append can be under way.
            let complete = !t.in_use();
            if let Err(e) = t.reader.read_to_end(&mut t.pending) {
                tracing::error!(error = %e, segment = %t.seg.name, "usage journal: read failed");
                parsed.push((0, 0, false));
                continue;
            }
            let p = journal::parse(&t.pending, complete);
            if p.used > 0 {
                positions.push((t.seg.name.clone(), t.copied + p.used as u64));
            }
            records.extend(p.records);
            parsed.push((p.used, p.damaged, complete));
        }
        if !records.is_empty() || !self.audits.is_empty() || !positions.is_empty() {
            if let Err(e) = commit(&mut self.conn, &records, &self.audits, &positions) {
                tracing::error!(error = %e, records = records.len(), "usage ledger: commit failed");
                return false;
            }
            self.audits.clear();
            self.counters
                .written
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
        let mut keep = Vec::with_capacity(self.tails.len());
        for (mut t, (used, damaged, complete)) in self.tails.drain(..).zip(parsed) {
            t.pending.drain(..used);
            t.copied += used as u64;
            if damaged > 0 {
                self.counters.failed.fetch_add(damaged, Ordering::Relaxed);
                tracing::error!(
                    damaged,
                    segment = %t.seg.name,
                    "usage journal: damaged records skipped"
                );
            }
            if !complete {
                keep.push(t);
                continue;
            }
            // Copied whole: removed (the lock, held until `t` drops, keeps others off it
            // meanwhile).
            if let Err(e) = remove_copied(&self.conn, &t.seg.name, &t.seg.path) {
                tracing::error!(error = %e, segment = %t.seg.name, "usage journal: a copied segment or its row stays");
            }
        }
        self.tails = keep;
        true
    }

    /// Swaps `shard`'s live segment for a new one; the old one is copied to its end and
    /// removed by the passes that follow, once its last appends are done.
    fn rotate(&mut self, shard: usize) {
        let seg = match Segment::create(&self.db, crate::meter::unix_ms(), self.next_segment) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "usage journal: cannot start a new segment; the old one goes on");
                return;
            }
        };
        self.next_segment += 1;
        let tail = match Tail::new(seg.clone(), shard) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "usage journal: cannot read a new segment; the old one goes on");
                return;
            }
        };
        for t in &mut self.tails {
            if t.shard == shard {
                t.retired = true;
            }
        }
        self.shards[shard].store(Some(seg));
        self.tails.push(tail);
    }
}

/// fsyncs each segment asked for once, then answers every request.
fn sync(syncs: Vec<(Arc<Segment>, oneshot::Sender<bool>)>) {
    let mut done: Vec<(Arc<Segment>, bool)> = Vec::new();
    for (seg, ack) in syncs {
        let ok = match done.iter().find(|(s, _)| Arc::ptr_eq(s, &seg)) {
            Some((_, ok)) => *ok,
            None => {
                let ok = match seg.sync() {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(error = %e, segment = %seg.name, "usage journal: fsync failed");
                        false
                    }
                };
                done.push((seg, ok));
                ok
            }
        };
        let _ = ack.send(ok);
    }
}

/// A passive checkpoint every second (it never blocks the ledger thread), for as long as
/// the process runs.
pub(super) fn checkpoints(conn: Connection) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "usage ledger: checkpoint failed");
        }
    }
}

/// One transaction: the records, the audit entries and the segments' new positions.
pub(super) fn commit(
    conn: &mut Connection,
    records: &[UsageRecord],
    audits: &[AuditEntry],
    positions: &[(String, u64)],
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut usage = tx.prepare_cached(
            "INSERT INTO usage (ts_ms, request_id, tenant, model, worker, input_tokens, output_tokens, weighted_tokens, status, ttft_ms, duration_ms, best_effort, cached_tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        for r in records {
            usage.execute(params![
                r.ts_ms,
                r.request_id,
                r.tenant,
                r.model,
                r.worker,
                r.input_tokens,
                r.output_tokens,
                r.weighted_tokens,
                r.status,
                r.ttft_ms,
                r.duration_ms,
                r.best_effort,
                r.cached_tokens,
            ])?;
        }
        let mut audit = tx.prepare_cached(
            "INSERT INTO audit (ts_ms, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for e in audits {
            audit.execute(params![e.ts_ms, e.actor, e.action, e.detail])?;
        }
        let mut position = tx.prepare_cached(
            "INSERT INTO usage_log (segment, copied) VALUES (?1, ?2)
             ON CONFLICT (segment) DO UPDATE SET copied = excluded.copied",
        )?;
        for (name, copied) in positions {
            position.execute(params![name, *copied as i64])?;
        }
    }
    tx.commit()
}
