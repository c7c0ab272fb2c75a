//! The decode steps' CUDA graphs: one captured at load per batch-size bucket, sampled and
//! without its sampling, replayed for every decode step its bucket holds (the step padded
//! with dummy rows); captured again whenever the step's launches change, and each replayed
//! once on dummy rows after capture so that one that cannot launch fails at load.

use super::enqueue::{logits, Sampling};
use super::CudaBackend;
use crate::cuda::exec::{Exec, ExecError};
use crate::cuda::staging::Layout;
use crate::forward::Batch;

/// Decode batch sizes that get a graph (capped at the backend's largest step).
const BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];

/// A captured decode step for `bucket` sequences: sampled, and without its sampling (for
/// a step whose adjustments come later, [`crate::backend::Backend::submit_forward`]).
pub(super) struct Graph<E: Exec> {
    pub(super) bucket: usize,
    pub(super) graph: E::Graph,
    pub(super) forward: E::Graph,
}

impl<E: Exec> CudaBackend<E> {
    /// Captures every decode graph again (after the step's launches changed).
    pub(super) fn recapture_all(&mut self) -> Result<(), ExecError> {
        for i in 0..self.graphs.len() {
            self.recapture(i)?;
        }
        Ok(())
    }

    /// Captures graph `i` again (after the step's launches changed), and replays it once.
    pub(super) fn recapture(&mut self, i: usize) -> Result<(), ExecError> {
        self.graphs[i] = self.capture(self.graphs[i].bucket)?;
        self.try_graph(i)
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
            let graph = self.capture(bucket)?;
            self.graphs.push(graph);
            self.try_graph(self.graphs.len() - 1)?;
        }
        Ok(())
    }

    /// The decode graphs of `bucket` sequences, sampled and not.
    fn capture(&mut self, bucket: usize) -> Result<Graph<E>, ExecError> {
        let windowed = self.dev.window_blocks.is_some();
        let lay = Layout::with_window(bucket, bucket, self.dev.max_blocks, bucket, windowed);
        self.dev.exec.make_current()?;
        let mut one = |sample: bool| {
            self.dev.exec.begin_capture()?;
            let enqueued = self.dev.enqueue(lay, bucket, sample);
            // Always end the capture, so that the stream leaves capture mode.
            let graph = self.dev.exec.end_capture();
            enqueued?;
            graph
        };
        Ok(Graph {
            bucket,
            graph: one(true)?,
            forward: one(false)?,
        })
    }

    /// The graph for a decode step of `n` sequences, if there is one.
    pub(super) fn graph_for(&self, batch: &Batch) -> Option<usize> {
        let n = batch.seqs.len();
        let decode = n > 0 && batch.tokens.len() == n && batch.seqs.iter().all(|s| s.logits == 1);
        if !decode {
            return None;
        }
        self.graphs.iter().position(|g| g.bucket >= n)
    }
}
