//! One GPU with every kernel loaded: a context, its stream, and the kernels by name,
//! compiled (or read from the PTX cache) for the device's compute capability.
//!
//! Everything on a device runs on its one non-default stream, in order, with cudarc's
//! cross-stream event tracking turned off (see [`Gpu::open`]).

use super::compile::{self, CompileError};
use super::exec::{check_gemm, Arg, DevBuf, Elem, Exec, ExecError};
use super::launch::{self, Kernels, Slot};
use crate::model::LlamaConfig;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::sys::{
    CUdevice_attribute, CUfunction_attribute, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError,
    LaunchConfig, PinnedHostSlice,
};
use half::f16;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The most arguments a kernel takes (`gemv_f16_norm_rope`'s 20, with room).
const MAX_ARGS: usize = 24;

/// cuBLAS workspace: set explicitly so that products captured into a graph use it rather
/// than allocating (32 MiB, NVIDIA's advice for Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA is not usable: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("no kernel named {0}")]
    NoKernel(String),
    /// The CPU emulator is not built, turned off, or has no build for a model's shape.
    #[error("CUDA emulator: {0}")]
    Emulator(String),
}

/// A device with the kernels loaded, and a cuBLAS handle on its stream.
pub struct Gpu {
    // Dropped first: the handle before its workspace.
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: &'static str,
    kernels: Kernels,
    /// Multiprocessors, and the most shared memory a block may have.
    sms: usize,
    max_shared: usize,
    /// Whether kernels launch as programmatic dependent launches ([`super::launch`]),
    /// and whether the device has them (compute capability 9.0 on).
    dependent: AtomicBool,
    can_depend: AtomicBool,
}

impl Gpu {
    /// Opens device `ordinal` (checking first that the CUDA libraries load), with the
    /// kernels compiled for any model shape they support.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        Self::open_with(ordinal, &[])
    }

    /// Opens device `ordinal` with the kernels compiled for `config`'s attention shape
    /// (query heads per KV head, head dimension), or an error naming what the kernels do
    /// not support.
    pub fn open_for(ordinal: usize, config: &LlamaConfig) -> Result<Self, GpuError> {
        Self::open_with(ordinal, &attention_defines(config)?)
    }

    /// As [`Gpu::open_for`], with `extra` compile-time constants besides (a benchmark's
    /// variant of a kernel, e.g. another `CHUNK_KEYS`).
    pub fn open_for_with(
        ordinal: usize,
        config: &LlamaConfig,
        extra: compile::Defines,
    ) -> Result<Self, GpuError> {
        let mut defines = attention_defines(config)?;
        defines.extend_from_slice(extra);
        Self::open_with(ordinal, &defines)
    }

    fn open_with(ordinal: usize, defines: compile::Defines) -> Result<Self, GpuError> {
        let n = super::available().map_err(GpuError::Unavailable)?;
        if ordinal >= n {
            return Err(GpuError::Unavailable(format!(
                "device {ordinal} requested, the driver sees {n}"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream per device and nothing shared across streams: cudarc's per-buffer
        // events are not needed, and an event recorded outside a graph capture cannot be
        // waited on inside it. Turned off before any buffer exists.
        // SAFETY: every buffer of this context is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let arch = compile::arch_for(major, minor)?;
        let kernels = Kernels::load(&ctx, compile::all(arch, defines)?)?;
        // Dependent launches where the device has them (compute capability 9.0 on), unless
        // `TOLLGATE_DEPENDENT_LAUNCH=0`.
        let can_depend = major >= 9;
        let dependent =
            can_depend && std::env::var("TOLLGATE_DEPENDENT_LAUNCH").as_deref() != Ok("0");
        // Not the legacy default stream: CUDA graphs cannot be captured on it.
        let stream = ctx.new_stream()?;
        let unavailable = |e: blas::CublasError| GpuError::Unavailable(e.to_string());
        let blas = CudaBlas::new(stream.clone()).map_err(unavailable)?;
        let workspace: CudaSlice<u8> = stream.alloc_zeros(BLAS_WORKSPACE)?;
        {
            let (wp, _rw) = workspace.device_ptr(&stream);
            // SAFETY: the workspace outlives the handle (both fields of `Gpu`, the handle
            // dropped first); set after `CudaBlas::new`'s cublasSetStream, which resets the
            // workspace.
            unsafe {
                blas_sys::cublasSetWorkspace_v2(*blas.handle(), wp as *mut _, BLAS_WORKSPACE)
            }
            .result()
            .map_err(unavailable)?;
        }
        // Asked once: a launch of the `gemv` kernels sizes its grid and shared memory by them.
        let attr = |a| ctx.attribute(a).map(|v| v.max(0) as usize);
        let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1);
        let max_shared =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        Ok(Self {
            sms,
            max_shared,
            blas,
            _blas_workspace: workspace,
            ctx,
            stream,
            arch,
            kernels,
            dependent: AtomicBool::new(dependent),
            can_depend: AtomicBool::new(can_depend),
        })
    }

    /// A loaded kernel.
    fn kernel(&self, name: &str) -> Result<launch::Kernel, GpuError> {
        self.kernels
            .get(name)
            .ok_or_else(|| GpuError::NoKernel(name.to_string()))
    }

    /// Device-to-device copy of 1 GiB: seconds per copy, and GB/s with reads and writes
    /// counted (what "memory bandwidth" means in the kernels' benchmarks).
    pub fn copy_bandwidth(&self) -> Result<(f64, f64), DriverError> {
        let (s, n, iters) = (&self.stream, 1usize << 28, 20);
        let src = s.alloc_zeros::<f32>(n)?;
        let mut dst = s.alloc_zeros::<f32>(n)?;
        s.memcpy_dtod(&src, &mut dst)?;
        s.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            s.memcpy_dtod(&src, &mut dst)?;
        }
        s.synchronize()?;
        let secs = t.elapsed().as_secs_f64() / iters as f64;
        Ok((secs, 2.0 * 4.0 * n as f64 / secs / 1e9))
    }

    /// The device's name and memory, for reports.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("{name} ({})", self.arch)
    }
}

impl<T: Elem> DevBuf<T> for CudaSlice<T> {
    fn addr(&self) -> u64 {
        self.device_ptr(self.stream()).0
    }
    fn elems(&self) -> usize {
        self.len()
    }
}

/// A CUDA graph of one device.
pub struct GpuGraph(CudaGraph);

/// Page-locked host words, and an event recorded after the last copy into or out of them
/// (which [`Exec::host_words`] waits for).
pub struct PinnedWords {
    words: PinnedHostSlice<u32>,
    copied: CudaEvent,
}

// SAFETY: a `CudaGraph` holds raw CUDA handles and is not to be used from two threads at
// once; its owner (the backend) launches it only through `&mut self`, so at most one
// thread touches a graph at any time (CUDA allows a graph to be used from any thread with
// its context current, which cudarc makes so on every call).
unsafe impl Send for GpuGraph {}

impl Exec for Gpu {
    type Buf<T: Elem> = CudaSlice<T>;
    type Host = PinnedWords;
    type Graph = GpuGraph;

    fn host(&self, n: usize) -> Result<PinnedWords, ExecError> {
        // SAFETY: every word a step copies is written first (`staging::write`), and words
        // are read back only after a copy into them.
        let words = unsafe { self.ctx.alloc_pinned::<u32>(n) }?;
        let copied = self.ctx.new_event(None)?;
        Ok(PinnedWords { words, copied })
    }

    fn host_words<'a>(&self, h: &'a mut PinnedWords) -> Result<&'a mut [u32], ExecError> {
        h.copied.synchronize()?;
        Ok(h.words.as_mut_slice()?)
    }

    fn send(
        &self,
        h: &PinnedWords,
        r: std::ops::Range<usize>,
        dst: &mut CudaSlice<u32>,
    ) -> Result<(), ExecError> {
        super::exec::check_send(&r, dst.len(), h.words.len())?;
        let s = &self.stream;
        let (base, _sync) = dst.device_ptr_mut(s);
        let at = base + (r.start * 4) as u64;
        let src = h.words.as_slice()?;
        // SAFETY: both sides hold words `r` (checked above); the host side is page-locked
        // and its owner writes it again only through `host_words`, which waits for the
        // event recorded after this copy.
        unsafe { cudarc::driver::result::memcpy_htod_async(at, &src[r], s.cu_stream()) }?;
        h.copied.record(s)?;
        Ok(())
    }

    fn receive<T: Elem>(
        &self,
        src: &CudaSlice<T>,
        r: std::ops::Range<usize>,
        h: &mut PinnedWords,
        to: usize,
    ) -> Result<(), ExecError> {
        super::exec::check_receive::<T>(&r, src.len(), h.words.len(), to)?;
        let s = &self.stream;
        let (base, _sync) = src.device_ptr(s);
        let dst = h.words.as_mut_slice()?;
        let at = base + (r.start * std::mem::size_of::<T>()) as u64;
        // SAFETY: the source holds elements `r`, of a word each, and the host side at
        // least as many words from `to` (`check_receive`); the host side is page-locked and
        // read only through `host_words`, which waits for the event recorded after this
        // copy.
        unsafe {
            let dst = &mut dst[to..to + r.len()];
            cudarc::driver::result::memcpy_dtoh_async(dst, at, s.cu_stream())
        }?;
        h.copied.record(s)?;
        Ok(())
    }

    fn begin_capture(&self) -> Result<(), ExecError> {
        Ok(self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?)
    }

    fn end_capture(&self) -> Result<GpuGraph, ExecError> {
        self.stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)?
            .map(GpuGraph)
            .ok_or_else(|| {
                ExecError::Gpu(GpuError::Unavailable("the capture gave no graph".into()))
            })
    }

    fn replay(&self, g: &GpuGraph) -> Result<(), ExecError> {
        Ok(g.0.launch()?)
    }

    fn zeros<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>, ExecError> {
        Ok(self.stream.alloc_zeros(n)?)
    }

    fn upload<T: Elem>(&self, v: &[T]) -> Result<CudaSlice<T>, ExecError> {
        Ok(self.stream.memcpy_stod(v)?)
    }

    fn download<T: Elem>(&self, b: &CudaSlice<T>, n: usize) -> Result<Vec<T>, ExecError> {
        if n > b.len() {
            return Err(ExecError::Bounds(format!(
                "{n} elements of a buffer of {}",
                b.len()
            )));
        }
        Ok(self.stream.memcpy_dtov(&b.slice(0..n))?)
    }

    fn download_at<T: Elem>(
        &self,
        b: &CudaSlice<T>,
        r: std::ops::Range<usize>,
    ) -> Result<Vec<T>, ExecError> {
        if r.start > r.end || r.end > b.len() {
            return Err(ExecError::Bounds(format!(
                "elements {r:?} of a buffer of {}",
                b.len()
            )));
        }
        Ok(self.stream.memcpy_dtov(&b.slice(r))?)
    }

    fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<(), ExecError> {
        let f = self.kernel(kernel)?;
        // On the stack: a step's direct launches allocate nothing.
        if args.len() > MAX_ARGS {
            return Err(ExecError::Bounds(format!(
                "{kernel}: {} arguments, more than {MAX_ARGS}",
                args.len()
            )));
        }
        let mut slots = [0 as Slot; MAX_ARGS];
        for (slot, a) in slots.iter_mut().zip(args) {
            *slot = match *a {
                Arg::Ptr { addr, .. } => addr,
                Arg::Null => 0,
                Arg::I32(v) => u64::from(v as u32),
                Arg::U32(v) => u64::from(v),
                Arg::F32(v) => u64::from(v.to_bits()),
                Arg::U64(v) => v,
            };
        }
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for (p, slot) in params.iter_mut().zip(slots.iter_mut()) {
            *p = slot as *mut Slot as *mut c_void;
        }
        let params = &mut params[..args.len()];
        self.ctx.bind_to_thread()?;
        // SAFETY: the argument list is the kernel's (the emulator checks every launch of
        // `step/` and the parity tests against the kernels' signatures), pointers are
        // live buffers of this device of the extents the launch implies, the stream is
        // this context's, made current above; `slots` outlives the call.
        let go = |dependent: bool, params: &mut [*mut c_void]| unsafe {
            launch::launch(f, self.stream.cu_stream(), cfg, params, dependent)
        };
        let dependent = self.dependent_launch();
        match go(dependent, params) {
            // A driver that refuses the attribute: plain launches from here on (the
            // launch failed before it was enqueued, so it is simply made again).
            Err(e) if dependent => {
                self.dependent.store(false, Ordering::Relaxed);
                self.can_depend.store(false, Ordering::Relaxed);
                tracing::warn!(device = %self.describe(), kernel,
                    "a dependent launch failed ({e}); launching plainly from now on");
                go(false, params)?;
            }
            r => r?,
        }
        Ok(())
    }

    fn dependent_launch(&self) -> bool {
        self.dependent.load(Ordering::Relaxed)
    }

    fn set_dependent_launch(&self, on: bool) -> bool {
        let on = on && self.can_depend.load(Ordering::Relaxed);
        self.dependent.store(on, Ordering::Relaxed);
        on
    }

    fn gemm(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        w_row0: usize,
        y: &mut CudaSlice<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), ExecError> {
        check_gemm((x.len(), w.len(), y.len()), w_row0, rows, k, n)?;
        let s = &self.stream;
        let (xp, _rx) = x.device_ptr(s);
        let (wp, _rw) = w.device_ptr(s);
        let (yp, _ry) = y.device_ptr_mut(s);
        let wp = wp + (w_row0 * k * 2) as u64;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: Yᵀ[n × rows] = W[k × n]ᵀ · Xᵀ[k × rows].
        // SAFETY: the extents were just checked against the buffers, and alpha/beta are
        // host f32s.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
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

    fn free_memory(&self) -> Result<usize, ExecError> {
        self.ctx.bind_to_thread()?;
        Ok(cudarc::driver::result::mem_get_info()?.0)
    }

    fn make_current(&self) -> Result<(), ExecError> {
        Ok(self.ctx.bind_to_thread()?)
    }

    fn max_threads(&self, kernel: &str) -> Result<usize, ExecError> {
        let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK;
        Ok(self.kernels.attribute(self.kernel(kernel)?, attr)? as usize)
    }

    fn max_shared_bytes(&self) -> Result<usize, ExecError> {
        Ok(self.max_shared)
    }

    fn multiprocessors(&self) -> Result<usize, ExecError> {
        Ok(self.sms)
    }

    fn synchronize(&self) -> Result<(), ExecError> {
        Ok(self.stream.synchronize()?)
    }

    fn describe(&self) -> String {
        Gpu::describe(self)
    }
}

/// The attention kernel's limits: query heads per KV head, and head dimension (a multiple
/// of 32, one warp's lanes times `MAX_DPL`).
pub const MAX_GROUP: usize = 8;
pub const MAX_HEAD_DIM: usize = 256;
/// The widest heads `attention_tc` takes (its staged keys and values in 48 KB of shared
/// memory); wider ones take `attention_prefill`.
pub const MAX_TC_HEAD_DIM: usize = 128;

/// `MAX_GROUP`, `MAX_DPL` and `MAX_WARPS` for a model (its group, head_dim / 32, and the
/// most warps whose state fits in shared memory), or why the CUDA kernels cannot run it.
pub fn attention_defines(c: &LlamaConfig) -> Result<Vec<(&'static str, usize)>, GpuError> {
    if let Some(moe) = &c.moe {
        let most = super::step::MAX_EXPERTS;
        if moe.count > most || !c.dim.is_multiple_of(8) || !moe.ffn.is_multiple_of(8) {
            return Err(GpuError::Unavailable(format!(
                "a mixture of {} experts {} wide over {} dimensions: the CUDA expert kernels take \
                 up to {most} experts, of widths in multiples of 8",
                moe.count, moe.ffn, c.dim
            )));
        }
    }
    let group = c.n_heads / c.n_kv_heads.max(1);
    if c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) || group > MAX_GROUP {
        return Err(GpuError::Unavailable(format!(
            "{} query heads over {} KV heads: the CUDA attention supports groups of up to {MAX_GROUP}",
            c.n_heads, c.n_kv_heads
        )));
    }
    if !c.head_dim.is_multiple_of(32) || c.head_dim > MAX_HEAD_DIM || c.head_dim == 0 {
        return Err(GpuError::Unavailable(format!(
            "head dimension {}: the CUDA attention supports multiples of 32 up to {MAX_HEAD_DIM}",
            c.head_dim
        )));
    }
    let dpl = c.head_dim / 32;
    Ok(vec![
        ("MAX_GROUP", group),
        ("MAX_DPL", dpl),
        ("MAX_WARPS", attention_max_warps(group, dpl)),
    ])
}

/// Shared memory the attention kernel's merge may use, per block.
const ATTENTION_SMEM: usize = 32 << 10;

/// The most warps (16, 8 or 4) whose per-warp attention state (`group` heads of
/// `dpl × 32` floats, plus two floats each) fits in `ATTENTION_SMEM`: the build's
/// `MAX_WARPS`. The step launches no more warps than the loaded kernels' registers allow
/// ([`Exec::max_threads`]): a narrower launch runs several slices per warp.
pub fn attention_max_warps(group: usize, dpl: usize) -> usize {
    let per_warp = group * (dpl * 32 * 4 + 8);
    [16, 8, 4]
        .into_iter()
        .find(|w| w * per_warp <= ATTENTION_SMEM)
        .unwrap_or(4)
}

/// Keys per attention chunk (`CHUNK_KEYS` in `kernels/cuda/attention.cu`): a row's keys
/// are attended chunk by chunk, and a split launch spreads a row's chunks over blocks.
pub const ATTENTION_CHUNK_KEYS: usize = 512;

/// Blocks per (row, KV head) for an attention launch of `rows` rows (the grid's z): enough
/// that the launch has about one block per multiprocessor when rows are few (a long row's
/// chunks then run side by side), at most `max_chunks` (a row's most chunks), and 1 when
/// the rows alone fill the device. The output has the same bits for any value.
pub fn attention_splits(rows: usize, n_kv_heads: usize, sms: usize, max_chunks: usize) -> usize {
    let blocks = (rows * n_kv_heads).max(1);
    sms.div_ceil(blocks).clamp(1, max_chunks.max(1))
}

/// Warps per attention block for a step of `rows` rows: few rows (decode at small batch)
/// get more warps each, so that a row's keys are split further; at most `max`.
pub fn attention_warps(rows: usize, max: usize) -> usize {
    let w = if rows <= 16 {
        16
    } else if rows <= 64 {
        8
    } else {
        4
    };
    w.min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_builds_fit_the_model_and_shared_memory() {
        let smol = LlamaConfig::smollm2_135m();
        assert_eq!(
            attention_defines(&smol).unwrap(),
            [("MAX_GROUP", 3), ("MAX_DPL", 2), ("MAX_WARPS", 16)]
        );
        // The general limits (groups of 8, head_dim 128) leave room for 4 warps only.
        assert_eq!(attention_max_warps(8, 4), 4);
        assert_eq!(attention_max_warps(4, 4), 8);
        let wide = LlamaConfig {
            n_heads: 32,
            n_kv_heads: 2,
            ..smol.clone()
        };
        assert!(attention_defines(&wide)
            .unwrap_err()
            .to_string()
            .contains("groups of up to 8"));
        // Gemma's heads 256 wide, in pairs: 8 lanes' dimensions each, 8 warps.
        let gemma = LlamaConfig {
            n_heads: 8,
            n_kv_heads: 4,
            head_dim: 256,
            ..smol.clone()
        };
        assert_eq!(
            attention_defines(&gemma).unwrap(),
            [("MAX_GROUP", 2), ("MAX_DPL", 8), ("MAX_WARPS", 8)]
        );
        let odd = LlamaConfig {
            head_dim: 80,
            ..smol
        };
        assert!(attention_defines(&odd)
            .unwrap_err()
            .to_string()
            .contains("head dimension 80"));
    }

    #[test]
    fn few_rows_get_more_warps_each_within_the_build() {
        let source = include_str!("../../cuda/attention.cu");
        assert!(
            source.contains(&format!("#define CHUNK_KEYS {ATTENTION_CHUNK_KEYS}\n")),
            "ATTENTION_CHUNK_KEYS is the kernel's CHUNK_KEYS"
        );
        // H100 (132 SMs), SmolLM2 (3 KV heads), context 8192 (16 chunks).
        assert_eq!(attention_splits(1, 3, 132, 16), 16);
        assert_eq!(attention_splits(4, 3, 132, 16), 11);
        assert_eq!(attention_splits(16, 3, 132, 16), 3);
        assert_eq!(attention_splits(44, 3, 132, 16), 1);
        assert_eq!(attention_splits(256, 3, 132, 16), 1);
        assert_eq!(attention_splits(0, 3, 132, 0), 1);
        assert_eq!(attention_warps(1, 16), 16);
        assert_eq!(attention_warps(16, 16), 16);
        assert_eq!(attention_warps(64, 16), 8);
        assert_eq!(attention_warps(256, 16), 4);
        assert_eq!(attention_warps(1, 4), 4, "capped by MAX_WARPS");
    }
}
