//! Building an engine's backend — CPU, CUDA on a GPU, or CUDA on the emulator — at start
//! and again after a device fault, with the CUDA backend's self-check before it serves.

use crate::config::{AttentionKind, BackendKind, EngineConfig, EngineSizes};
use kernels::backend::{Backend, CpuBackend};
use kernels::cuda::backend::{gpu_name, AttentionKernel, CudaBackend, KvCapacity, KvRequest};
use kernels::cuda::device::Gpu;
use kernels::cuda::emu::Emu;
use kernels::cuda::exec::Exec;
use kernels::cuda::twins::TwinModel;
use kernels::forward::Model;
use kernels::matmul::ActPrecision;
use std::sync::Arc;

/// What builds an engine's backend: at start, and again after a device fault.
pub(super) struct Factory {
    pub(super) model: Arc<Model>,
    pub(super) cfg: EngineConfig,
    /// The GPU ordinal, for the CUDA backend.
    pub(super) device: usize,
    pub(super) name: String,
    /// The KV cache's blocks once the first backend is built: a backend built again gets
    /// the same number, so that the engine's limits still hold.
    pub(super) kv_blocks: Option<usize>,
}

impl Factory {
    /// A backend of `kind` (not `Auto`: the caller chose) and its sizes.
    pub(super) fn build(
        &self,
        kind: BackendKind,
    ) -> Result<(Box<dyn Backend>, EngineSizes), String> {
        let cfg = &self.cfg;
        let model = &self.model;
        // The emulator's and the CPU's KV cache: a number of blocks.
        let blocks = |kv_tokens: Option<usize>| {
            let n = kv_tokens.unwrap_or(65536).div_ceil(cfg.block_size);
            self.kv_blocks.unwrap_or(n)
        };
        match kind {
            BackendKind::Cuda | BackendKind::Auto => {
                let device = self.device;
                let fail = |e: String| format!("backend = \"cuda\" on device {device}: {e}");
                let sizes = cfg.sizes(true);
                let kv = match (self.kv_blocks, sizes.kv_tokens) {
                    (Some(n), _) => KvCapacity::Blocks(n),
                    (None, Some(k)) => KvCapacity::Blocks(k.div_ceil(cfg.block_size)),
                    // Enough for every sequence slot at the model's full context, at most.
                    (None, None) => KvCapacity::FreeMemory {
                        fraction: cfg.gpu_memory_fraction,
                        max_blocks: sizes.max_seqs
                            * model.config.context_len.div_ceil(cfg.block_size),
                    },
                };
                // The windowed layers' own pool, where the model has such layers: beside
                // the blocks asked for, or out of the free memory before the others'.
                let most = match kv {
                    KvCapacity::Blocks(n) => n,
                    KvCapacity::FreeMemory { max_blocks, .. } => max_blocks,
                };
                let kv = KvRequest {
                    capacity: kv,
                    window_blocks: window_blocks(cfg, &sizes, &model.config, most),
                };
                // The device first: what its kernels cannot run (a mixture of experts) is
                // refused before the weights are converted.
                let gpu = Gpu::open_for(device, &model.config).map_err(|e| fail(e.to_string()))?;
                let twin = TwinModel::from_model(model);
                let label = gpu_name(device, &gpu);
                let b = cuda_backend(gpu, label, &twin, cfg, &sizes, kv, &self.name, true)
                    .map_err(fail)?;
                Ok((b, sizes))
            }
            // The CUDA path on the CPU emulator, with the CPU backend's sizes.
            BackendKind::Emulator => {
                let fail = |e: String| format!("backend = \"emulator\": {e}");
                let sizes = cfg.sizes(false);
                let n = blocks(sizes.kv_tokens);
                let kv = KvRequest {
                    capacity: KvCapacity::Blocks(n),
                    window_blocks: window_blocks(cfg, &sizes, &model.config, n),
                };
                let emu = Emu::open_for(&model.config).map_err(|e| fail(e.to_string()))?;
                let twin = TwinModel::from_model(model);
                let label = emu.describe();
                let b = cuda_backend(emu, label, &twin, cfg, &sizes, kv, &self.name, false)
                    .map_err(fail)?;
                Ok((b, sizes))
            }
            BackendKind::Cpu => {
                let sizes = cfg.sizes(false);
                let mut n_blocks = blocks(sizes.kv_tokens);
                let window = window_blocks(cfg, &sizes, &model.config, n_blocks);
                if let Some(w) = window.filter(|_| cfg.kv_tokens.is_none()) {
                    // The default cache is a memory budget: what the windowed layers do
                    // not hold, the others hold more positions with (built again after a
                    // fault: the same blocks, `self.kv_blocks`).
                    let cap = sizes.max_seqs * model.config.context_len.div_ceil(cfg.block_size);
                    n_blocks = self
                        .kv_blocks
                        .unwrap_or_else(|| same_memory(&model.config, n_blocks, w, cap));
                }
                let precision = match cfg.activations {
                    crate::config::Activations::I16 => ActPrecision::I16,
                    crate::config::Activations::Q8 => ActPrecision::Q8,
                    crate::config::Activations::F32 => ActPrecision::F32,
                };
                let mut b = CpuBackend::new(model.clone(), cfg.block_size, n_blocks, cfg.threads)?
                    .with_precision(precision);
                if let Some(w) = window {
                    b = b.with_window_blocks(w);
                    tracing::info!(
                        worker = %self.name,
                        kv_blocks = n_blocks,
                        window_kv_blocks = w,
                        kv_mib = b.kv_bytes() >> 20,
                        "the model's windowed layers keep a KV pool of their own: each \
                         sequence's blocks before its window go back to it"
                    );
                }
                Ok((Box::new(b), sizes))
            }
        }
    }
}

/// Blocks for the other layers of a model whose windowed layers hold `window` blocks of
/// their own, in the memory that `n_blocks` on every layer takes: at least `n_blocks`, at
/// most `cap` (every sequence slot at the model's context) unless `n_blocks` is more.
fn same_memory(
    c: &kernels::model::LlamaConfig,
    n_blocks: usize,
    window: usize,
    cap: usize,
) -> usize {
    let windowed = (0..c.n_layers)
        .filter(|&l| c.window_at(l).is_some())
        .count();
    let others = c.n_layers - windowed;
    let n = match others {
        // Every layer windowed: the others' pool is bookkeeping alone.
        0 => cap,
        _ => (c.n_layers * n_blocks).saturating_sub(windowed * window) / others,
    };
    n.min(cap).max(n_blocks)
}

/// Blocks of the windowed layers' own KV pool, where the model has such layers
/// and the pool would be smaller than the others' (`n_blocks`): `window_kv_tokens`, or
/// enough for every sequence slot's window, the block partly before it and the one its
/// next rows start, and a step's rows besides; at least one sequence's window and a
/// step's rows (else a long prompt could never run).
fn window_blocks(
    cfg: &EngineConfig,
    sizes: &EngineSizes,
    c: &kernels::model::LlamaConfig,
    n_blocks: usize,
) -> Option<usize> {
    let w = c.window_size()?;
    let bs = cfg.block_size;
    let per_seq = w.saturating_sub(1).div_ceil(bs) + 2;
    let step = sizes.max_batch_tokens.div_ceil(bs);
    let n = match cfg.window_kv_tokens {
        Some(0) => return None,
        Some(k) => k.div_ceil(bs).max(per_seq + step),
        None => sizes.max_seqs * per_seq + step,
    };
    (n < n_blocks).then_some(n)
}

/// The CUDA backend on `exec` (a GPU or the emulator), sized by `sizes` and `kv`, with its
/// products of few rows placed by their timings when `timed` (a GPU's timings mean
/// something; the emulator's do not), after its self-check: one prefill and one graph
/// decode step against the CPU twin, before it serves.
#[allow(clippy::too_many_arguments)]
fn cuda_backend<E: Exec + 'static>(
    exec: E,
    label: String,
    twin: &TwinModel,
    cfg: &EngineConfig,
    sizes: &EngineSizes,
    kv: KvRequest,
    worker: &str,
    timed: bool,
) -> Result<Box<dyn Backend>, String> {
    let (tokens, seqs) = (sizes.max_batch_tokens, sizes.max_seqs);
    let mut b = CudaBackend::on(exec, label, twin, cfg.block_size, kv, tokens, seqs)
        .map_err(|e| e.to_string())?;
    let attention = match cfg.attention {
        AttentionKind::Simt => AttentionKernel::Simt,
        AttentionKind::Tensor => AttentionKernel::Tensor,
    };
    b.set_attention(attention).map_err(|e| e.to_string())?;
    // An operator's fixed choice applies on the emulator too (nothing is timed then).
    if timed || kernels::cuda::backend::FixedSmall::from_env().is_some() {
        b.choose_small_products();
    }
    let err = b
        .verify(twin)
        .map_err(|e| format!("self-check against the CPU failed: {e}"))?;
    tracing::info!(
        worker,
        backend = b.name(),
        graphs = ?b.graph_buckets(),
        graphs_off = b.graphs_off().unwrap_or(""),
        small_products_on_gemv = b.small_products().0,
        small_products_on_file_blocks = b.quant_small().0,
        dependent_launch = b.dependent_launch(),
        attention = ?b.attention(),
        self_check_rel_err = err,
        kv_blocks = b.kv_geometry().1,
        window_kv_blocks = b.kv_window_blocks(),
        "engine on the CUDA backend"
    );
    Ok(Box::new(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::model::{LlamaConfig, SlidingWindow};

    #[test]
    fn the_windowed_layers_pool_holds_every_slots_window_and_a_steps_rows() {
        let mut c = LlamaConfig::smollm2_135m();
        let cfg = EngineConfig::default();
        let sizes = cfg.sizes(false);
        assert_eq!((sizes.max_seqs, sizes.max_batch_tokens), (64, 128));
        assert_eq!(window_blocks(&cfg, &sizes, &c, 4096), None, "no window");
        c.window = Some(SlidingWindow {
            size: 512,
            period: 6,
            rope_base: None,
        });
        // 64 slots × (32 blocks of window + 2) + 8 blocks of a step's rows.
        assert_eq!(window_blocks(&cfg, &sizes, &c, 4096), Some(64 * 34 + 8));
        assert_eq!(
            window_blocks(&cfg, &sizes, &c, 64 * 34 + 8),
            None,
            "no smaller"
        );
        let with = |tokens| EngineConfig {
            window_kv_tokens: Some(tokens),
            ..EngineConfig::default()
        };
        assert_eq!(window_blocks(&with(0), &sizes, &c, 4096), None, "off");
        assert_eq!(window_blocks(&with(16000), &sizes, &c, 4096), Some(1000));
        // Never less than one sequence's window and a step's rows.
        assert_eq!(window_blocks(&with(16), &sizes, &c, 4096), Some(34 + 8));
        // SmolLM2's 30 layers as Gemma 3's, 25 windowed: what they do not hold of 4,096
        // blocks each, the other 5 hold more positions with, up to every slot's context.
        let w = 64 * 34 + 8;
        assert_eq!(same_memory(&c, 4096, w, 1 << 20), (30 * 4096 - 25 * w) / 5);
        assert_eq!(same_memory(&c, 4096, w, 8192), 8192);
        assert_eq!(same_memory(&c, 4096, w, 1024), 4096, "never fewer");
        c.window = Some(SlidingWindow {
            size: 2047,
            period: 0,
            rope_base: None,
        });
        assert_eq!(
            same_memory(&c, 4096, w, 16384),
            16384,
            "every layer windowed"
        );
    }
}
