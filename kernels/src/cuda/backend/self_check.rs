//! The load-time self-check: a prefill and a decode step on the device against the CPU
//! twin of the same weights, retried without dependent launches where it fails with them.

use super::CudaBackend;
use crate::backend::Backend;
use crate::cuda::exec::Exec;
use crate::cuda::twins::{self, SampleParams, TwinModel};
use crate::forward::Batch;

impl<E: Exec> CudaBackend<E> {
    /// Checks this GPU's step against the twin chain on the CPU (`twin`: the weights this
    /// backend was loaded from): a 6-token prefill's logits within 2 % (relative to the
    /// largest), then a decode step through the graph path whose greedy token must be one
    /// the twin scores as its best (within 1 % for near-ties). Returns the prefill's
    /// relative error. Writes KV blocks 0.. (the engine overwrites what it uses).
    pub fn self_check(&mut self, twin: &TwinModel) -> Result<f32, String> {
        let c = self.dev.config.clone();
        let bs = self.dev.block_size;
        let prompt: Vec<u32> = (0..6u32).map(|i| (17 + 101 * i) % c.vocab as u32).collect();
        let blocks: Vec<u32> = (0..(prompt.len() + 1).div_ceil(bs) as u32).collect();
        let room = self.dev.window_blocks.unwrap_or(usize::MAX);
        if blocks.len() > self.dev.n_blocks.min(room) {
            return Err("the KV cache is too small for the self-check".into());
        }
        // The windowed layers' own pool, where they keep one: the same blocks there (the
        // twin reads the one table).
        let window = match self.dev.window_blocks {
            Some(_) => blocks.clone(),
            None => Vec::new(),
        };
        let mut kv = twin.kv(bs, blocks.len());
        let mut prefill = Batch::default();
        prefill.push(&prompt, 0, blocks.clone(), true);
        prefill.set_window_table(window.clone());
        let got = self.step(&prefill).map_err(|e| e.to_string())?;
        let want = twin.forward(&prefill, &mut kv);
        let err = twins::rel_err(&got, &want);
        if err > 2e-2 {
            return Err(format!(
                "prefill logits differ from the CPU twin by {err:.3e} (relative)"
            ));
        }
        let next = twins::sample(&want, SampleParams::GREEDY);
        let mut decode = Batch::default();
        decode.push(&[next], prompt.len(), blocks, true);
        decode.set_window_table(window);
        let token = self
            .step_sample(&decode, &[SampleParams::GREEDY], &[])
            .map_err(|e| e.to_string())?;
        let want = twin.forward(&decode, &mut kv);
        let best = want.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let scale = want.iter().fold(1e-6f32, |a, &b| a.max(b.abs()));
        let ok = token
            .first()
            .and_then(|&t| want.get(t as usize))
            .is_some_and(|&v| best - v <= 1e-2 * scale);
        if !ok {
            return Err(format!(
                "the decode step's greedy token {token:?} is not the CPU twin's best"
            ));
        }
        Ok(err)
    }

    /// [`CudaBackend::self_check`]; if it fails with dependent launches on, once more with
    /// them off (logged), which they then stay.
    pub fn verify(&mut self, twin: &TwinModel) -> Result<f32, String> {
        match self.self_check(twin) {
            Err(e) if self.dependent_launch() => {
                tracing::warn!(backend = %self.name,
                    "self-check failed with dependent launches ({e}); checking without them");
                self.set_dependent_launch(false)
                    .map_err(|e| format!("turning dependent launches off: {e}"))?;
                self.self_check(twin)
            }
            r => r,
        }
    }
}
