//! The forward step's device work, enqueued on the GPU's stream: the CPU twins' chain
//! ([`super::twins::TwinModel::forward`]) launched kernel for kernel, with cuBLAS for the
//! matrix products. [`Device::enqueue`] only enqueues (no allocation, no copy, no
//! synchronization), so the same call runs eagerly or is captured into a CUDA graph.
//!
//! Weights are dequantized once at load to f16 (matrices) and f32 (norms) and stay on the
//! device; products run as `cublasGemmEx` with f16 inputs, f32 accumulation and output.
//! The KV cache is f16, paged, `[block][kv_head][slot][dim]` per layer, with one spare
//! block past the engine's (the `trash` block padded rows write into). Per layer (T rows):
//!
//! ```text
//! h[T,D]f16  = add_rmsnorm(x += previous layer's down output)
//! qkv[T,Q+2K] = gemm(h, Wq|Wk|Wv)                           f32, one product
//! rope_kv_write(qkv): rotate q, k in place; k, v → cache[slot_mapping]
//! a[T,Q]f16  = attention(q = qkv rows) over the paged cache
//! o[T,D]     = gemm(a, Wo);  h = add_rmsnorm(x += o)
//! gu[T,2F]   = gemm(h, Wgate|up);  g[T,F]f16 = swiglu(gu);  d[T,D] = gemm(g, Wdown)
//! ```
//!
//! then the final norm of the logits rows, the LM head, and (when asked) the `sample`
//! kernel over the logits rows with the parameters from the staging buffer.

use super::device::{attention_warps, Gpu, GpuError};
use super::staging::Layout;
use super::twins::TwinModel;
use crate::model::LlamaConfig;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::f16;
use std::sync::Arc;

/// cuBLAS workspace: set explicitly so that products captured into a graph use it rather
/// than allocating (32 MiB, NVIDIA's advice for Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

struct Layer {
    attn_norm: CudaSlice<f32>,
    wqkv: CudaSlice<f16>,
    wo: CudaSlice<f16>,
    ffn_norm: CudaSlice<f32>,
    w_gate_up: CudaSlice<f16>,
    w_down: CudaSlice<f16>,
    k_cache: CudaSlice<f16>,
    v_cache: CudaSlice<f16>,
}

/// Per-step buffers, sized once.
pub(super) struct Bufs {
    pub staging: CudaSlice<u32>,
    tokens: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    slots: CudaSlice<i32>,
    seq_of_row: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    logit_rows: CudaSlice<i32>,
    x: CudaSlice<f32>,
    h: CudaSlice<f16>,
    qkv: CudaSlice<f32>,
    att: CudaSlice<f16>,
    o: CudaSlice<f32>,
    gu: CudaSlice<f32>,
    g: CudaSlice<f16>,
    pub logits: CudaSlice<f32>,
    pub sampled: CudaSlice<u32>,
}

/// A model on one GPU, with its KV cache and step buffers.
pub(super) struct Device {
    pub gpu: Gpu,
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    pub config: LlamaConfig,
    embed: CudaSlice<f16>,
    layers: Vec<Layer>,
    output_norm: CudaSlice<f32>,
    output: CudaSlice<f16>,
    pub block_size: usize,
    /// KV blocks the engine may use (the cache holds one more, the spare).
    pub n_blocks: usize,
    /// The most warps per attention block this build allows (`MAX_WARPS`).
    att_warps: usize,
    pub max_blocks: usize,
    pub bufs: Bufs,
}

/// How big the KV cache is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCapacity {
    /// This many blocks.
    Blocks(usize),
    /// This share of the device memory free once the weights and step buffers are
    /// loaded, at most `max_blocks` blocks.
    FreeMemory { fraction: f64, max_blocks: usize },
}

/// Why a step failed on the device.
#[derive(Debug, thiserror::Error)]
pub(super) enum RunError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("{0}")]
    Gpu(#[from] GpuError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
}

/// `y[rows × n] = x[rows × k] · w[n × k]ᵀ`, with `w` starting `w_row0` rows in: f16
/// inputs, f32 accumulation and output.
#[allow(clippy::too_many_arguments)]
fn gemm(
    blas: &CudaBlas,
    s: &Arc<CudaStream>,
    x: &CudaSlice<f16>,
    w: &CudaSlice<f16>,
    w_row0: usize,
    y: &mut CudaSlice<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), RunError> {
    let (xp, _rx) = x.device_ptr(s);
    let (wp, _rw) = w.device_ptr(s);
    let (yp, _ry) = y.device_ptr_mut(s);
    let wp = wp + (w_row0 * k * 2) as u64;
    let (alpha, beta) = (1.0f32, 0.0f32);
    // Column-major view: Yᵀ[n × rows] = W[k × n]ᵀ · Xᵀ[k × rows].
    // SAFETY: the pointers are live device buffers of at least these extents (sized at
    // construction for max_tokens rows), and alpha/beta are host f32s.
    unsafe {
        blas::gemm_ex(
            *blas.handle(),
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            rows as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            wp as *const _,
            blas_sys::cudaDataType::CUDA_R_16F,
            k as i32,
            xp as *const _,
            blas_sys::cudaDataType::CUDA_R_16F,
            k as i32,
            (&beta) as *const f32 as *const _,
            yp as *mut _,
            blas_sys::cudaDataType::CUDA_R_32F,
            n as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }?;
    Ok(())
}

fn launch(n: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(block), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows(n: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Device {
    /// Uploads `twin`'s weights to GPU `device`; a KV cache of `kv` blocks (plus the spare)
    /// of `block_size` tokens; buffers for `max_tokens` rows and `max_seqs` sequences.
    pub fn new(
        twin: &TwinModel,
        device: usize,
        block_size: usize,
        kv: KvCapacity,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Self, GpuError> {
        let gpu = Gpu::open_for(device, &twin.config)?;
        let s = gpu.stream.clone();
        let c = twin.config.clone();
        let weights = twin
            .layers
            .iter()
            .map(|l| {
                Ok((
                    s.memcpy_stod(&l.attn_norm)?,
                    s.memcpy_stod(&l.wqkv)?,
                    s.memcpy_stod(&l.wo)?,
                    s.memcpy_stod(&l.ffn_norm)?,
                    s.memcpy_stod(&l.w_gate_up)?,
                    s.memcpy_stod(&l.w_down)?,
                ))
            })
            .collect::<Result<Vec<_>, cudarc::driver::DriverError>>()?;
        let max_blocks = c.context_len.div_ceil(block_size);
        let (t, d, qd, kvd, f) = (
            max_tokens,
            c.dim,
            c.n_heads * c.head_dim,
            c.kv_dim(),
            c.ffn_dim,
        );
        let bufs = Bufs {
            staging: s.alloc_zeros(Layout::new(max_seqs, t, max_blocks).len)?,
            tokens: s.alloc_zeros(t)?,
            positions: s.alloc_zeros(t)?,
            slots: s.alloc_zeros(t)?,
            seq_of_row: s.alloc_zeros(t)?,
            tables: s.alloc_zeros(max_seqs * max_blocks)?,
            logit_rows: s.alloc_zeros(max_seqs)?,
            x: s.alloc_zeros(t * d)?,
            h: s.alloc_zeros(t * d)?,
            qkv: s.alloc_zeros(t * (qd + 2 * kvd))?,
            att: s.alloc_zeros(t * qd)?,
            o: s.alloc_zeros(t * d)?,
            gu: s.alloc_zeros(t * 2 * f)?,
            g: s.alloc_zeros(t * f)?,
            logits: s.alloc_zeros(max_seqs * c.vocab)?,
            sampled: s.alloc_zeros(max_seqs)?,
        };
        let unavailable =
            |e: cudarc::cublas::result::CublasError| GpuError::Unavailable(e.to_string());
        let blas = CudaBlas::new(s.clone()).map_err(unavailable)?;
        let workspace: CudaSlice<u8> = s.alloc_zeros(BLAS_WORKSPACE)?;
        {
            let (wp, _rw) = workspace.device_ptr(&s);
            // SAFETY: the workspace outlives the handle (both fields of `Device`, the
            // handle dropped first); set after `CudaBlas::new`'s cublasSetStream, which
            // resets the workspace.
            unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), wp as *mut _, BLAS_WORKSPACE)
            }
            .result()
            .map_err(unavailable)?;
        }
        let embed = s.memcpy_stod(&twin.embed)?;
        let output_norm = s.memcpy_stod(&twin.output_norm)?;
        let output = s.memcpy_stod(&twin.output)?;
        // The KV cache last, from what is left: one spare block past the engine's.
        let block_bytes = 2 * c.n_layers * block_size * c.kv_dim() * std::mem::size_of::<f16>();
        let n_blocks = match kv {
            KvCapacity::Blocks(n) => n,
            KvCapacity::FreeMemory {
                fraction,
                max_blocks,
            } => {
                gpu.ctx.bind_to_thread()?;
                let (free, _) = cudarc::driver::result::mem_get_info()?;
                let n = ((free as f64 * fraction) as usize / block_bytes).saturating_sub(1);
                if n == 0 {
                    return Err(GpuError::Unavailable(format!(
                        "no GPU memory left for the KV cache ({free} bytes free after the weights)"
                    )));
                }
                n.min(max_blocks)
            }
        };
        let kv_len = (n_blocks + 1) * block_size * c.kv_dim();
        let layers = weights
            .into_iter()
            .map(|(attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down)| {
                Ok(Layer {
                    attn_norm,
                    wqkv,
                    wo,
                    ffn_norm,
                    w_gate_up,
                    w_down,
                    k_cache: s.alloc_zeros(kv_len)?,
                    v_cache: s.alloc_zeros(kv_len)?,
                })
            })
            .collect::<Result<Vec<_>, cudarc::driver::DriverError>>()?;
        let group = c.n_heads / c.n_kv_heads;
        Ok(Self {
            att_warps: super::device::attention_max_warps(group, c.head_dim / 32),
            embed,
            output_norm,
            output,
            n_blocks,
            gpu,
            blas,
            _blas_workspace: workspace,
            config: c,
            layers,
            block_size,
            max_blocks,
            bufs,
        })
    }

    /// Enqueues one step over the staging buffer (already on the device) laid out as
    /// `lay`, with `n_logits` logits rows; samples them when `sample`. Nothing is
    /// allocated, copied or awaited, and every launch's arguments depend only on `lay`,
    /// `n_logits` and `sample`: a captured graph replays it for any staging contents.
    pub fn enqueue(&mut self, lay: Layout, n_logits: usize, sample: bool) -> Result<(), RunError> {
        let Self {
            gpu: g,
            blas,
            config: c,
            embed,
            layers,
            output_norm,
            output,
            block_size,
            max_blocks,
            att_warps,
            bufs: b,
            ..
        } = self;
        let (t, n_seqs) = (lay.n_tokens, lay.n_seqs);
        let (d, qd, kvd, f) = (c.dim, c.n_heads * c.head_dim, c.kv_dim(), c.ffn_dim);
        let s = g.stream.clone();
        let (ti, si, mbi, bsi) = (
            t as i32,
            n_seqs as i32,
            *max_blocks as i32,
            *block_size as i32,
        );
        {
            let mut l = s.launch_builder(g.kernel("build_batch")?);
            l.arg(&b.staging)
                .arg(&si)
                .arg(&ti)
                .arg(&mbi)
                .arg(&bsi)
                .arg(&mut b.tokens)
                .arg(&mut b.positions)
                .arg(&mut b.slots)
                .arg(&mut b.seq_of_row)
                .arg(&mut b.tables)
                .arg(&mut b.logit_rows);
            let n = t.max(n_seqs * *max_blocks) as u32;
            unsafe { l.launch(launch(n, 256)) }?;
        }
        let (di, eps) = (d as i32, c.rms_eps);
        {
            let mut l = s.launch_builder(g.kernel("embed")?);
            l.arg(&*embed).arg(&b.tokens).arg(&mut b.x).arg(&di);
            unsafe { l.launch(rows(t as u32, 256)) }?;
        }
        let (nh, nkv, hd) = (c.n_heads as i32, c.n_kv_heads as i32, c.head_dim as i32);
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let (fi, base) = (f as i32, c.rope_base);
        let qkv_w = qd + 2 * kvd;
        let qkv_wi = qkv_w as i32;
        let null = 0u64;
        for (li, w) in layers.iter_mut().enumerate() {
            // h = rmsnorm(x += the previous layer's down output).
            {
                let mut l = s.launch_builder(g.kernel("add_rmsnorm")?);
                l.arg(&mut b.x);
                if li == 0 {
                    l.arg(&null);
                } else {
                    l.arg(&b.o);
                }
                l.arg(&w.attn_norm)
                    .arg(&mut b.h)
                    .arg(&null)
                    .arg(&di)
                    .arg(&eps);
                unsafe { l.launch(rows(t as u32, 256)) }?;
            }
            gemm(blas, &s, &b.h, &w.wqkv, 0, &mut b.qkv, t, d, qkv_w)?;
            {
                let mut l = s.launch_builder(g.kernel("rope_kv_write")?);
                l.arg(&mut b.qkv)
                    .arg(&qkv_wi)
                    .arg(&b.positions)
                    .arg(&b.slots)
                    .arg(&mut w.k_cache)
                    .arg(&mut w.v_cache)
                    .arg(&ti)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&hd)
                    .arg(&bsi)
                    .arg(&base);
                let n = (t * (c.n_heads + c.n_kv_heads) * c.head_dim / 2) as u32;
                unsafe { l.launch(launch(n, 256)) }?;
            }
            {
                let mut l = s.launch_builder(g.kernel("attention_prefill")?);
                l.arg(&b.qkv)
                    .arg(&qkv_wi)
                    .arg(&w.k_cache)
                    .arg(&w.v_cache)
                    .arg(&b.tables)
                    .arg(&b.seq_of_row)
                    .arg(&b.positions)
                    .arg(&mut b.att)
                    .arg(&mbi)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&hd)
                    .arg(&bsi)
                    .arg(&scale);
                let cfg = LaunchConfig {
                    grid_dim: (t as u32, c.n_kv_heads as u32, 1),
                    block_dim: (32 * attention_warps(t, *att_warps) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { l.launch(cfg) }?;
            }
            gemm(blas, &s, &b.att, &w.wo, 0, &mut b.o, t, qd, d)?;
            {
                let mut l = s.launch_builder(g.kernel("add_rmsnorm")?);
                l.arg(&mut b.x)
                    .arg(&b.o)
                    .arg(&w.ffn_norm)
                    .arg(&mut b.h)
                    .arg(&null)
                    .arg(&di)
                    .arg(&eps);
                unsafe { l.launch(rows(t as u32, 256)) }?;
            }
            gemm(blas, &s, &b.h, &w.w_gate_up, 0, &mut b.gu, t, d, 2 * f)?;
            {
                let mut l = s.launch_builder(g.kernel("swiglu")?);
                l.arg(&b.gu).arg(&mut b.g).arg(&ti).arg(&fi);
                unsafe { l.launch(launch((t * f) as u32, 256)) }?;
            }
            gemm(blas, &s, &b.g, &w.w_down, 0, &mut b.o, t, f, d)?;
        }
        if n_logits == 0 {
            return Ok(());
        }
        // x += the last down output, then the final norm of the rows that want logits
        // (packed by `logit_rows`).
        {
            let mut l = s.launch_builder(g.kernel("add_rmsnorm")?);
            l.arg(&mut b.x)
                .arg(&b.o)
                .arg(&*output_norm)
                .arg(&mut b.h)
                .arg(&b.logit_rows)
                .arg(&di)
                .arg(&eps);
            unsafe { l.launch(rows(n_logits as u32, 256)) }?;
        }
        gemm(
            blas,
            &s,
            &b.h,
            output,
            0,
            &mut b.logits,
            n_logits,
            d,
            c.vocab,
        )?;
        if sample {
            let st = &b.staging;
            let (temp, top_k, top_p, steps, seeds) = (
                st.slice(lay.temperature()),
                st.slice(lay.top_k()),
                st.slice(lay.top_p()),
                st.slice(lay.steps()),
                st.slice(lay.seeds()),
            );
            let vocab = c.vocab as i32;
            let mut l = s.launch_builder(g.kernel("sample")?);
            l.arg(&b.logits)
                .arg(&vocab)
                .arg(&temp)
                .arg(&top_k)
                .arg(&top_p)
                .arg(&seeds)
                .arg(&steps)
                .arg(&mut b.sampled);
            let threads = super::twins::SAMPLE_THREADS as u32;
            unsafe { l.launch(rows(n_logits as u32, threads)) }?;
        }
        Ok(())
    }
}
