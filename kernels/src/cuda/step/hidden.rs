//! A step's final hidden states (embeddings), read back: the residual after the last
//! layer through the output norm, on the host.

use super::{runs, Device};
use crate::cuda::exec::{Exec, ExecError};

impl<E: Exec> Device<E> {
    /// The final hidden states of logits rows `rows` of the step just run (waited for)
    /// with `padded` logits rows enqueued: the residual after the last layer, normalized
    /// by the output norm, `dim` f32s each, computed here from the device's rows. The
    /// step's last residual add went into `x` (`add_rmsnorm`), or (its final norm fused
    /// into the output head's `gemv_f16`, as [`Device::enqueue`] decides from `padded`)
    /// is the last down output in `o` still to add.
    pub fn final_hidden(&self, rows: &[usize], padded: usize) -> Result<Vec<f32>, ExecError> {
        let (e, b, d) = (&self.exec, &self.bufs, self.config.dim);
        let fused = self.fuses_final_norm(padded);
        let token_rows = e.download_at(&b.logit_rows, 0..padded)?;
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            let t = match token_rows.get(r) {
                Some(&t) if t >= 0 => t as usize,
                _ => {
                    return Err(ExecError::Bounds(format!(
                        "hidden state of logits row {r} of a step with {padded}"
                    )))
                }
            };
            let mut x = e.download_at(&b.x, t * d..(t + 1) * d)?;
            if fused {
                let o = e.download_at(&b.o, t * d..(t + 1) * d)?;
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            }
            self.normalize(&x, &mut out);
        }
        Ok(out)
    }

    /// Enqueues the copies back of what the final hidden states of the step just
    /// enqueued with `padded` logits rows are made of, for its token rows `tokens` (those
    /// of the logits rows wanted, [`Batch::logit_positions`]): into `h`, the rows of `x`
    /// (`dim` words each, in that order), then those of `o`, for [`Device::hidden_from`];
    /// one copy per run of consecutive token rows. Returns whether `o`'s rows are part of
    /// it (the final norm fused); only `x`'s are copied otherwise.
    ///
    /// [`Batch::logit_positions`]: crate::forward::Batch::logit_positions
    pub fn receive_hidden(
        &self,
        tokens: &[usize],
        padded: usize,
        h: &mut E::Host,
    ) -> Result<bool, ExecError> {
        let (e, b, d) = (&self.exec, &self.bufs, self.config.dim);
        let fused = self.fuses_final_norm(padded);
        let n = tokens.len();
        for (at, first, rows) in runs(tokens) {
            let r = first * d..(first + rows) * d;
            e.receive(&b.x, r.clone(), h, at * d)?;
            if fused {
                e.receive(&b.o, r, h, (n + at) * d)?;
            }
        }
        Ok(fused)
    }

    /// The final hidden states of `n` rows from the words [`Device::receive_hidden`]
    /// copied back (`fused`: what it returned), `dim` f32s each, as
    /// [`Device::final_hidden`] makes them.
    pub fn hidden_from(&self, words: &[u32], n: usize, fused: bool) -> Vec<f32> {
        let d = self.config.dim;
        let mut out = Vec::with_capacity(n * d);
        let mut x = vec![0f32; d];
        for k in 0..n {
            let xs = &words[k * d..(k + 1) * d];
            for (j, v) in x.iter_mut().enumerate() {
                *v = f32::from_bits(xs[j]);
                if fused {
                    *v += f32::from_bits(words[(n + k) * d + j]);
                }
            }
            self.normalize(&x, &mut out);
        }
        out
    }

    /// Appends `x` through the output norm (RMS norm, the model's weights) to `out`.
    fn normalize(&self, x: &[f32], out: &mut Vec<f32>) {
        let d = self.config.dim;
        let ss: f32 = x.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / d as f32 + self.config.rms_eps).sqrt();
        out.extend(
            x.iter()
                .zip(&self.output_norm_host)
                .map(|(v, w)| v * inv * w),
        );
    }
}
