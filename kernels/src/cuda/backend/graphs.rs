//! The decode steps' CUDA graphs: one captured at load per batch-size bucket, sampled and
//! without its sampling, replayed for every decode step its bucket holds (the step padded
//! with dummy rows); captured again whenever the step's launches change, and each replayed
//! once on dummy rows after capture so that one that cannot launch fails at load. And the
//! drafts' graphs: a step of one sequence whose rows all want logits (its last token and
//! the drafts proposed after it) replays a graph of exactly its row count, captured the
//! first time that count comes (up to [`MAX_DRAFT_ROWS`]), so that speculative decoding's
//! steps cost the launches of a decode step rather than a prefill chunk's.

use super::enqueue::{logits, Sampling};
use super::CudaBackend;
use crate::cuda::exec::{Exec, ExecError};
use crate::cuda::staging::Layout;
use crate::forward::Batch;

/// Decode batch sizes that get a graph (capped at the backend's largest step).
const BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];

/// Rows of the largest one-sequence step that gets a drafts' graph: a last token and the
/// 16 drafts `speculative_tokens` allows at most.
pub const MAX_DRAFT_ROWS: usize = 17;

/// The rows of `batch` where it is a drafts' step: one sequence whose rows all want
/// logits, 2 to [`MAX_DRAFT_ROWS`] of them.
fn draft_rows(batch: &Batch) -> Option<usize> {
    let rows = batch.tokens.len();
    let one = batch.seqs.len() == 1 && batch.seqs[0].logits == rows;
    (one && (2..=MAX_DRAFT_ROWS).contains(&rows)).then_some(rows)
}

/// A captured step of `bucket` sequences over `rows` rows, each wanting logits (a decode
/// step's one row each, or a sequence's last token and drafts): sampled, and without its
/// sampling (for a step whose adjustments come later,
/// [`crate::backend::Backend::submit_forward`]).
pub(super) struct Graph<E: Exec> {
    pub(super) bucket: usize,
    pub(super) rows: usize,
    pub(super) graph: E::Graph,
    pub(super) forward: E::Graph,
}

impl<E: Exec> CudaBackend<E> {
    /// Captures every decode graph again (after the step's launches changed); the drafts'
    /// graphs are captured again as their steps come.
    pub(super) fn recapture_all(&mut self) -> Result<(), ExecError> {
        self.draft_graphs.clear();
        for i in 0..self.graphs.len() {
            self.recapture(i)?;
        }
        Ok(())
    }

    /// Captures decode graph `i` again (after the step's launches changed), and replays it
    /// once.
    pub(super) fn recapture(&mut self, i: usize) -> Result<(), ExecError> {
        let bucket = self.graphs[i].bucket;
        self.graphs[i] = self.capture(bucket, bucket)?;
        self.try_graph(i)
    }

    /// Graph `i`: a decode graph, or past them a drafts' graph.
    pub(super) fn graph(&self, i: usize) -> &Graph<E> {
        match i.checked_sub(self.graphs.len()) {
            Some(j) => &self.draft_graphs[j],
            None => &self.graphs[i],
        }
    }

    /// The row counts of the drafts' graphs captured so far.
    pub fn draft_graph_rows(&self) -> Vec<usize> {
        self.draft_graphs.iter().map(|g| g.rows).collect()
    }

    /// Captures the drafts' graph of `batch`'s row count, where `batch` is one sequence
    /// whose every row wants logits (2 to [`MAX_DRAFT_ROWS`] rows), decode graphs are on
    /// and none of that count is held yet. A capture that fails turns the drafts' graphs
    /// off with one log line: their steps launch directly, as before.
    pub(super) fn capture_draft_graph(&mut self, batch: &Batch) {
        let Some(rows) = draft_rows(batch).filter(|&r| r <= self.max_tokens) else {
            return;
        };
        if self.graphs.is_empty()
            || self.draft_graphs_off.is_some()
            || self.draft_graphs.iter().any(|g| g.rows == rows)
        {
            return;
        }
        match self.capture(1, rows) {
            Ok(g) => self.draft_graphs.push(g),
            Err(e) => {
                let why = format!("capturing a drafts' graph of {rows} rows failed ({e})");
                tracing::warn!(backend = %self.name, "{why}; drafts' steps launch directly");
                self.draft_graphs_off = Some(why);
            }
        }
    }

    /// Replays graph `i`'s two forms once on dummy rows: a graph that cannot launch fails
    /// here, at load.
    fn try_graph(&mut self, i: usize) -> Result<(), ExecError> {
        self.run(&Batch::default(), 0, Some(i), Sampling::No, logits)?;
        // The staging buffer still holds those dummy rows.
        self.dev.exec.replay(&self.graphs[i].forward)?;
        self.dev.exec.synchronize()
    }

    /// The device the backend runs on.
    pub fn exec(&self) -> &E {
        &self.dev.exec
    }

    /// The decode buckets that have a graph (empty when graphs are off).
    pub fn graph_buckets(&self) -> Vec<usize> {
        self.graphs.iter().map(|g| g.bucket).collect()
    }

    /// Why graphs are off, if they are.
    pub fn graphs_off(&self) -> Option<&str> {
        self.graphs_off.as_deref()
    }

    /// Turns graphs on or off (for comparisons; they are on by default).
    pub fn set_graphs(&mut self, on: bool) -> Result<(), String> {
        if !on {
            self.graphs.clear();
            self.draft_graphs.clear();
            self.graphs_off = Some("turned off".into());
            return Ok(());
        }
        if self.graphs.is_empty() {
            self.capture_all().map_err(|e| e.to_string())?;
            self.graphs_off = None;
        }
        Ok(())
    }

    pub(super) fn capture_all(&mut self) -> Result<(), ExecError> {
        let cap = self.max_seqs.min(self.max_tokens);
        let mut sizes: Vec<usize> = BUCKETS.iter().copied().filter(|&b| b < cap).collect();
        sizes.push(cap);
        for bucket in sizes {
            let graph = self.capture(bucket, bucket)?;
            self.graphs.push(graph);
            self.try_graph(self.graphs.len() - 1)?;
        }
        Ok(())
    }

    /// The graphs of a step of `bucket` sequences over `rows` rows, each a logits row,
    /// sampled and not.
    fn capture(&mut self, bucket: usize, rows: usize) -> Result<Graph<E>, ExecError> {
        let windowed = self.dev.window_blocks.is_some();
        let lay = Layout::with_window(bucket, rows, self.dev.max_blocks, rows, windowed);
        self.dev.exec.make_current()?;
        let mut one = |sample: bool| {
            self.dev.exec.begin_capture()?;
            let enqueued = self.dev.enqueue(lay, rows, sample);
            // Always end the capture, so that the stream leaves capture mode.
            let graph = self.dev.exec.end_capture();
            enqueued?;
            graph
        };
        Ok(Graph {
            bucket,
            rows,
            graph: one(true)?,
            forward: one(false)?,
        })
    }

    /// The graph for a decode step of `n` sequences, or for one sequence's last token and
    /// drafts, if there is one.
    pub(super) fn graph_for(&self, batch: &Batch) -> Option<usize> {
        let n = batch.seqs.len();
        let rows = batch.tokens.len();
        let decode = n > 0 && rows == n && batch.seqs.iter().all(|s| s.logits == 1);
        if decode {
            return self.graphs.iter().position(|g| g.bucket >= n);
        }
        let rows = draft_rows(batch)?;
        let j = self.draft_graphs.iter().position(|g| g.rows == rows)?;
        Some(self.graphs.len() + j)
    }
}
