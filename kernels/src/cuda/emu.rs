//! The CUDA emulator's Rust side: [`Emu`] runs the kernel sources themselves
//! (`kernels/cuda/*.cu`, built for the host by `build.rs` against `kernels/emu/`) on the
//! CPU, one block at a time, each CUDA thread a fiber (a device's launches one after
//! another; different devices' at once, from their own threads). It is an [`Exec`], so the
//! parity tests and the whole step (`step/`) run on it where there is no GPU: what it
//! checks is the kernels' own index arithmetic, reductions, barriers and shuffles, and the
//! launches' grids and argument lists (count and types, against each kernel's signature,
//! and no buffer passed twice where the kernel writes through one of its restrict
//! pointers).
//!
//! Buffers end against an inaccessible page, so a kernel writing or reading past the end
//! of one faults. Within a block, threads run between synchronization points in an order
//! shuffled per launch (`TOLLGATE_EMU_SEED` fixes the sequence), so a result that depends
//! on a missing barrier changes from run to run. Math functions are the host's (`expf`,
//! `sincosf`, …), which differ from CUDA's in the last bits.

use super::device::{attention_defines, GpuError};
use super::exec::{check_gemm, Arg, DevBuf, Elem, Exec, ExecError};
use crate::model::LlamaConfig;
use cudarc::driver::LaunchConfig;
use half::f16;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Whether the emulator can run, or why not: `build.rs` leaves it out without a C++
/// compiler or off x86-64 Linux, and `TOLLGATE_EMU=0` turns it off (the GPU script does,
/// to spend device time on the GPU).
pub fn available() -> Result<(), String> {
    if !cfg!(tollgate_emu) {
        Err("this build has no CUDA emulator (no C++ compiler, or not x86-64 Linux)".into())
    } else if std::env::var("TOLLGATE_EMU").as_deref() == Ok("0") {
        Err("TOLLGATE_EMU=0".into())
    } else if cfg!(tollgate_emu_fma_f16c) && !host_has_fma_f16c() {
        Err("this build's CUDA emulator uses FMA and F16C, which this CPU lacks".into())
    } else {
        Ok(())
    }
}

/// Whether this CPU has FMA and F16C (`build.rs` builds the emulator with them where the
/// building CPU has them).
fn host_has_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The emulator's tables (`emu::Entry`, `emu::Variant` in `kernels/emu/emu.h`).
mod ffi_types {
    use std::ffi::{c_char, c_void};

    #[repr(C)]
    pub struct Entry {
        pub name: *const c_char,
        pub sig: *const c_char,
        pub access: *const c_char,
        pub call: *const c_void,
    }

    #[repr(C)]
    pub struct Variant {
        pub name: *const c_char,
        pub max_group: u32,
        pub max_dpl: u32,
        pub max_warps: u32,
        pub entries: *const Entry,
        pub n_entries: u32,
    }
}

#[cfg(tollgate_emu)]
mod ffi {
    use std::ffi::{c_char, c_void};

    use super::ffi_types::Variant;

    extern "C" {
        pub fn tollgate_emu_variant(i: u32) -> *const Variant;
        pub fn tollgate_emu_init();
        pub fn tollgate_emu_launch(
            name: *const c_char,
            call: *const c_void,
            grid: *const u32,
            block: *const u32,
            dynamic_shared: u32,
            args: *mut *mut c_void,
            seed: u64,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn tollgate_emu_alloc(
            bytes: usize,
            map: *mut *mut c_void,
            map_len: *mut usize,
        ) -> *mut c_void;
        pub fn tollgate_emu_free(map: *mut c_void, map_len: usize);
    }
}

/// Without the emulator: the same entry points, reporting that nothing is built (never
/// reached past [`available`], which every constructor checks first).
#[cfg(not(tollgate_emu))]
#[allow(clippy::missing_safety_doc)]
mod ffi {
    use std::ffi::{c_char, c_void};

    use super::ffi_types::Variant;

    pub unsafe fn tollgate_emu_init() {}
    pub unsafe fn tollgate_emu_variant(_: u32) -> *const Variant {
        std::ptr::null()
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tollgate_emu_launch(
        _: *const c_char,
        _: *const c_void,
        _: *const u32,
        _: *const u32,
        _: u32,
        _: *mut *mut c_void,
        _: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32 {
        let msg = b"no emulator in this build\0";
        let n = msg.len().min(err_len);
        std::ptr::copy_nonoverlapping(msg.as_ptr().cast(), err, n);
        if n > 0 {
            *err.add(n - 1) = 0;
        }
        -1
    }
    pub unsafe fn tollgate_emu_alloc(_: usize, _: *mut *mut c_void, _: *mut usize) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn tollgate_emu_free(_: *mut c_void, _: usize) {}
}

/// One kernel of an emulator build.
#[derive(Clone)]
struct Kernel {
    /// Its name, NUL-terminated (for the fault handler's message).
    name: std::ffi::CString,
    sig: Vec<u8>,
    /// Per parameter: `r` a pointer to const, `w` a pointer it may write through, `-` a
    /// value.
    access: Vec<u8>,
    call: *const c_void,
}

/// The CPU emulator with one build of the kernels (one set of attention constants).
pub struct Emu {
    build: String,
    kernels: HashMap<String, Kernel>,
    /// The launches recorded since `begin_capture`, while capturing.
    capturing: Mutex<Option<Vec<Recorded>>>,
    /// [`FAULTS`] when it was opened: once that moves on, every call fails.
    epoch: u64,
    /// Launches run per kernel (graph replays included).
    runs: Mutex<HashMap<String, u64>>,
    /// The shared memory a block may have ([`Emu::with_shared_bytes`]).
    shared_bytes: usize,
    /// Held through each launch: a device runs its launches one after another, as a
    /// stream does (other devices' launches run at once, each on its OS thread's shared
    /// memory).
    stream: Mutex<()>,
}

/// The multiprocessors the emulator reports: a small GPU's.
const EMU_MULTIPROCESSORS: usize = 8;
/// The shared memory a block may have: Hopper's (the `gemv` kernels' dynamic area is one
/// slot of this size on the emulator, `gemv_smem` in gemv.cuh).
const EMU_SHARED_BYTES: usize = 227 * 1024;

/// Injected device faults so far (see [`fault_open_devices`]).
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// Fault injection, for the tests of what the engine does when its device fails: every
/// emulated device open now fails each later call, as a GPU does after a sticky error (an
/// illegal address, an Xid); a device opened afterwards is healthy, as one is after its
/// context is torn down and made again. Process-wide: a test that calls it runs in a test
/// binary of its own.
pub fn fault_open_devices() {
    FAULTS.fetch_add(1, Ordering::SeqCst);
}

/// Microseconds each launch waits before it runs (see [`stall_launches`]).
static STALL_US: AtomicU64 = AtomicU64::new(0);

/// Fault injection: each launch on any emulated device waits `wait` first (zero: none),
/// as launches on a GPU stuck in a kernel do; process-wide, as [`fault_open_devices`].
pub fn stall_launches(wait: std::time::Duration) {
    STALL_US.store(wait.as_micros() as u64, Ordering::SeqCst);
}

/// Whether opening an emulated device fails (fault injection, as [`fault_open_devices`]):
/// a device that cannot be brought back yet.
static REFUSE: AtomicBool = AtomicBool::new(false);

/// Fault injection: while `on`, opening an emulated device fails, as opening a GPU does
/// while it is lost; process-wide, as [`fault_open_devices`].
pub fn refuse_opens(on: bool) {
    REFUSE.store(on, Ordering::SeqCst);
}

/// One recorded launch or product of a captured graph.
#[derive(Debug, Clone)]
pub enum Recorded {
    Launch {
        kernel: String,
        cfg: LaunchConfig,
        args: Vec<Arg>,
    },
    Gemm(RawGemm),
}

/// A product by address: `y[rows × n] = x[rows × k] · w[n × k]ᵀ`.
#[derive(Debug, Clone, Copy)]
pub struct RawGemm {
    x: *const f16,
    w: *const f16,
    y: *mut f32,
    rows: usize,
    k: usize,
    n: usize,
}

// SAFETY: addresses of emulator buffers, valid on any thread while the buffers live (the
// graph's owner keeps them, as a CUDA graph's owner keeps its device buffers).
unsafe impl Send for RawGemm {}

// SAFETY: `call` pointers are functions of the linked emulator, callable from any thread;
// a launch keeps all its state on the calling thread.
unsafe impl Send for Emu {}
unsafe impl Sync for Emu {}

/// Seeds the launches' thread orders: `TOLLGATE_EMU_SEED` (default 1), then one more per
/// launch.
fn next_seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = std::env::var("TOLLGATE_EMU_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1u64);
    base.wrapping_add(N.fetch_add(1, Ordering::Relaxed))
}

impl Emu {
    /// The build with the sources' general constants (any model the kernels support, with
    /// at most 4 attention warps per block).
    pub fn open() -> Result<Self, GpuError> {
        Self::open_build(&[("MAX_GROUP", 8), ("MAX_DPL", 4), ("MAX_WARPS", 4)])
    }

    /// The build with `config`'s attention constants, as [`super::device::Gpu::open_for`]
    /// compiles them, or why there is none.
    pub fn open_for(config: &LlamaConfig) -> Result<Self, GpuError> {
        let defines = attention_defines(config).map_err(|e| GpuError::Emulator(e.to_string()))?;
        Self::open_build(&defines)
    }

    /// The same device with at most `bytes` of shared memory a block (at most Hopper's
    /// 227 KB, the emulator's `gemv_smem` slot): an A100's 163 KB, an L4's or
    /// RTX's 99 KB, where the `gemv` kernels read rows of fewer columns whole
    /// ([`super::gemv::column_run`]).
    pub fn with_shared_bytes(mut self, bytes: usize) -> Self {
        self.shared_bytes = bytes.min(EMU_SHARED_BYTES);
        self
    }

    fn open_build(defines: &[(&'static str, usize)]) -> Result<Self, GpuError> {
        available().map_err(GpuError::Emulator)?;
        if REFUSE.load(Ordering::SeqCst) {
            return Err(GpuError::Emulator(
                "injected fault: the device cannot be opened".into(),
            ));
        }
        let want = |k: &str| defines.iter().find(|d| d.0 == k).map_or(0, |d| d.1);
        let (g, d, w) = (want("MAX_GROUP"), want("MAX_DPL"), want("MAX_WARPS"));
        builds()
            .into_iter()
            .find(|b| b.defines == (g, d, w))
            .map(|b| Self {
                build: b.name,
                kernels: b.kernels,
                capturing: Mutex::new(None),
                stream: Mutex::new(()),
                epoch: FAULTS.load(Ordering::SeqCst),
                runs: Mutex::default(),
                shared_bytes: EMU_SHARED_BYTES,
            })
            .ok_or_else(|| {
                GpuError::Emulator(format!(
                    "no build for MAX_GROUP={g} MAX_DPL={d} MAX_WARPS={w} \
                     (add it to VARIANTS in kernels/build.rs)"
                ))
            })
    }
}

/// For tests: `opened`, or `None` with the reason printed where the emulator is missing;
/// under `TOLLGATE_REQUIRE_EMU=1` (as `scripts/test.sh` sets) a missing emulator panics
/// instead, so that a suite cannot pass by skipping it.
pub fn or_skip(opened: Result<Emu, GpuError>) -> Option<Emu> {
    match opened {
        Ok(e) => Some(e),
        Err(e) if std::env::var("TOLLGATE_REQUIRE_EMU").as_deref() == Ok("1") => {
            panic!("TOLLGATE_REQUIRE_EMU=1: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED on the emulator: {e}");
            None
        }
    }
}

/// One emulator build: its name, attention constants and kernels by name.
struct Build {
    name: String,
    defines: (usize, usize, usize),
    kernels: HashMap<String, Kernel>,
}

fn builds() -> Vec<Build> {
    let text = |p: *const c_char| {
        // SAFETY: the emulator's tables hold static NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    static INIT: std::sync::Once = std::sync::Once::new();
    // SAFETY: installs a signal handler once, before any launch.
    INIT.call_once(|| unsafe { ffi::tollgate_emu_init() });
    let mut out: Vec<Build> = Vec::new();
    for i in 0.. {
        // SAFETY: returns a static table, or null past the last build.
        let v = unsafe { ffi::tollgate_emu_variant(i) };
        if v.is_null() {
            break;
        }
        // SAFETY: non-null tables are static and `entries` holds `n_entries` entries.
        let v = unsafe { &*v };
        let entries = unsafe { std::slice::from_raw_parts(v.entries, v.n_entries as usize) };
        let kernels = entries
            .iter()
            .map(|e| {
                let k = Kernel {
                    // SAFETY: a static NUL-terminated string of the emulator's table.
                    name: unsafe { CStr::from_ptr(e.name) }.to_owned(),
                    sig: text(e.sig).into_bytes(),
                    access: text(e.access).into_bytes(),
                    call: e.call,
                };
                (text(e.name), k)
            })
            .collect::<HashMap<String, Kernel>>();
        let name = text(v.name);
        match out.iter_mut().find(|b| b.name == name) {
            // Each of a build's sources is compiled apart (kernels/build.rs): one table each.
            Some(b) => b.kernels.extend(kernels),
            None => out.push(Build {
                name,
                defines: (
                    v.max_group as usize,
                    v.max_dpl as usize,
                    v.max_warps as usize,
                ),
                kernels,
            }),
        }
    }
    // Builds past the first hold the kernels that read their constants (the attention
    // kernels: kernels/build.rs); every other kernel is the first build's.
    if let Some((first, rest)) = out.split_first_mut() {
        for b in rest {
            for (n, k) in &first.kernels {
                b.kernels.entry(n.clone()).or_insert_with(|| k.clone());
            }
        }
    }
    out
}

/// Checks a launch's arguments against a kernel's signature.
fn check_args(kernel: &str, sig: &[u8], args: &[Arg]) -> Result<(), ExecError> {
    if sig.len() != args.len() {
        return Err(ExecError::Emu(format!(
            "{kernel} takes {} arguments, the launch passes {}",
            sig.len(),
            args.len()
        )));
    }
    for (i, (&want, a)) in sig.iter().zip(args).enumerate() {
        let ok = match *a {
            Arg::Ptr { elem, .. } => want == elem.to_ascii_uppercase(),
            Arg::Null => want.is_ascii_uppercase(),
            Arg::I32(_) => want == b'i',
            Arg::U32(_) => want == b'u',
            Arg::F32(_) => want == b'f',
            Arg::U64(_) => want == b'l',
        };
        if !ok {
            return Err(ExecError::Emu(format!(
                "{kernel} argument {i}: the kernel takes `{}`, the launch passes {a:?} \
                 (signature {})",
                want as char,
                String::from_utf8_lossy(sig)
            )));
        }
    }
    Ok(())
}

/// Checks a launch's block against the most threads [`super::LAUNCH_THREADS`] declares for
/// its kernel (the emulator's self-tests have none): what `cuda_compile` has `ptxas` check
/// its registers for, and, for the `gemv` kernels, their `__launch_bounds__`. On a GPU a
/// block past what the registers allow fails to launch.
fn check_threads(kernel: &str, cfg: LaunchConfig) -> Result<(), ExecError> {
    let (x, y, z) = cfg.block_dim;
    let threads = x as u64 * y as u64 * z as u64;
    match super::LAUNCH_THREADS
        .iter()
        .find(|(name, _)| *name == kernel)
    {
        Some(&(_, most)) if threads > most as u64 => Err(ExecError::Emu(format!(
            "{kernel}: a block of {threads} threads, past the {most} that LAUNCH_THREADS \
             declares (what ptxas checked its registers for: a GPU may refuse the launch)"
        ))),
        _ => Ok(()),
    }
}

/// Checks that no buffer is passed for two pointer parameters of which the kernel writes
/// through one (`access`: per parameter, `r`, `w` or `-`). The kernels' pointers are all
/// `__restrict__`: such a launch is undefined, and on a GPU the compiler may load through
/// the pointer to const from the non-coherent read-only cache, which does not see the
/// kernel's own writes.
fn check_aliasing(kernel: &str, access: &[u8], args: &[Arg]) -> Result<(), ExecError> {
    let ptrs: Vec<(usize, u64, u8)> = args
        .iter()
        .zip(access)
        .enumerate()
        .filter_map(|(i, (a, &acc))| match *a {
            Arg::Ptr { addr, .. } if addr != 0 => Some((i, addr, acc)),
            _ => None,
        })
        .collect();
    for (n, &(i, a, ai)) in ptrs.iter().enumerate() {
        for &(j, b, bj) in &ptrs[n + 1..] {
            if a == b && (ai == b'w' || bj == b'w') {
                return Err(ExecError::Emu(format!(
                    "{kernel}: arguments {i} and {j} are the same buffer, and the kernel \
                     writes through argument {}: its pointers are `__restrict__`, so the \
                     launch is undefined (a GPU may read the other through its read-only \
                     cache)",
                    if ai == b'w' { i } else { j }
                )));
            }
        }
    }
    Ok(())
}

/// An emulator buffer: host memory ending against an inaccessible page.
pub struct EmuBuf<T> {
    ptr: *mut T,
    len: usize,
    map: *mut c_void,
    map_len: usize,
}

// SAFETY: the buffer owns its mapping; access goes through `&self`/`&mut self` or kernel
// launches, which run on the launching thread.
unsafe impl<T: Send> Send for EmuBuf<T> {}
unsafe impl<T: Sync> Sync for EmuBuf<T> {}

impl<T> Drop for EmuBuf<T> {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` are the mapping `tollgate_emu_alloc` made for this buffer.
        unsafe { ffi::tollgate_emu_free(self.map, self.map_len) };
    }
}

impl<T: Elem> DevBuf<T> for EmuBuf<T> {
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
    fn elems(&self) -> usize {
        self.len
    }
}

impl<T> EmuBuf<T> {
    fn as_slice(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialized (zeroed or written) elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Exec for Emu {
    type Buf<T: Elem> = EmuBuf<T>;
    type Host = Vec<u32>;
    type Graph = Vec<Recorded>;

    fn zeros<T: Elem>(&self, n: usize) -> Result<EmuBuf<T>, ExecError> {
        let (mut map, mut map_len) = (std::ptr::null_mut(), 0usize);
        let bytes = n * std::mem::size_of::<T>();
        // SAFETY: plain allocation; the result is checked for null.
        let ptr = unsafe { ffi::tollgate_emu_alloc(bytes, &mut map, &mut map_len) };
        if ptr.is_null() {
            return Err(ExecError::Emu(format!("cannot allocate {bytes} bytes")));
        }
        Ok(EmuBuf {
            ptr: ptr.cast(),
            len: n,
            map,
            map_len,
        })
    }

    fn upload<T: Elem>(&self, v: &[T]) -> Result<EmuBuf<T>, ExecError> {
        let mut b = self.zeros(v.len())?;
        b.as_mut_slice().copy_from_slice(v);
        Ok(b)
    }

    fn download<T: Elem>(&self, b: &EmuBuf<T>, n: usize) -> Result<Vec<T>, ExecError> {
        self.sticky()?;
        b.as_slice()
            .get(..n)
            .map(<[T]>::to_vec)
            .ok_or_else(|| ExecError::Bounds(format!("{n} elements of a buffer of {}", b.len)))
    }

    fn download_at<T: Elem>(
        &self,
        b: &EmuBuf<T>,
        r: std::ops::Range<usize>,
    ) -> Result<Vec<T>, ExecError> {
        self.sticky()?;
        b.as_slice()
            .get(r.clone())
            .map(<[T]>::to_vec)
            .ok_or_else(|| ExecError::Bounds(format!("elements {r:?} of a buffer of {}", b.len)))
    }

    fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<(), ExecError> {
        self.sticky()?;
        if let Some(rec) = self.recording()?.as_mut() {
            // Checked now, as a CUDA capture checks a launch's configuration.
            self.check_launch(kernel, cfg, args)?;
            rec.push(Recorded::Launch {
                kernel: kernel.to_string(),
                cfg,
                args: args.to_vec(),
            });
            return Ok(());
        }
        self.run_launch(kernel, cfg, args)
    }

    fn gemm(
        &self,
        x: &EmuBuf<f16>,
        w: &EmuBuf<f16>,
        w_row0: usize,
        y: &mut EmuBuf<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), ExecError> {
        self.sticky()?;
        check_gemm((x.len, w.len, y.len), w_row0, rows, k, n)?;
        let g = RawGemm {
            x: x.ptr,
            // SAFETY: within `w` (checked above).
            w: unsafe { w.ptr.add(w_row0 * k) },
            y: y.ptr,
            rows,
            k,
            n,
        };
        match self.recording()?.as_mut() {
            Some(rec) => rec.push(Recorded::Gemm(g)),
            // SAFETY: the extents were checked against live buffers.
            None => unsafe { run_gemm(g) },
        }
        Ok(())
    }

    fn host(&self, n: usize) -> Result<Vec<u32>, ExecError> {
        Ok(vec![0; n])
    }

    fn host_words<'a>(&self, h: &'a mut Vec<u32>) -> Result<&'a mut [u32], ExecError> {
        Ok(h.as_mut_slice())
    }

    fn send(
        &self,
        h: &Vec<u32>,
        r: std::ops::Range<usize>,
        dst: &mut EmuBuf<u32>,
    ) -> Result<(), ExecError> {
        self.sticky()?;
        super::exec::check_send(&r, dst.len, h.len())?;
        dst.as_mut_slice()[r.clone()].copy_from_slice(&h[r]);
        Ok(())
    }

    fn receive<T: Elem>(
        &self,
        src: &EmuBuf<T>,
        r: std::ops::Range<usize>,
        h: &mut Vec<u32>,
        at: usize,
    ) -> Result<(), ExecError> {
        self.sticky()?;
        super::exec::check_receive::<T>(&r, src.len, h.len(), at)?;
        let n = r.len();
        let from = src.as_slice()[r].as_ptr().cast::<u32>();
        // SAFETY: `check_receive` holds `T` to 4 bytes, so the `n` elements are `n` words,
        // aligned as the buffer's elements (every `Elem` of 4 bytes is aligned to 4).
        let words = unsafe { std::slice::from_raw_parts(from, n) };
        h[at..at + n].copy_from_slice(words);
        Ok(())
    }

    fn begin_capture(&self) -> Result<(), ExecError> {
        let mut r = self.recording()?;
        if r.is_some() {
            return Err(ExecError::Emu("already capturing".into()));
        }
        *r = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<Vec<Recorded>, ExecError> {
        self.recording()?
            .take()
            .ok_or_else(|| ExecError::Emu("end of a capture that was not begun".into()))
    }

    fn replay(&self, g: &Vec<Recorded>) -> Result<(), ExecError> {
        self.sticky()?;
        for r in g {
            match r {
                Recorded::Launch { kernel, cfg, args } => self.launch(kernel, *cfg, args)?,
                // SAFETY: recorded from checked extents of buffers the graph's owner keeps.
                Recorded::Gemm(g) => unsafe { run_gemm(*g) },
            }
        }
        Ok(())
    }

    fn free_memory(&self) -> Result<usize, ExecError> {
        Err(ExecError::Emu(
            "sizing the KV cache from free memory is for GPUs; give a number of blocks".into(),
        ))
    }

    fn make_current(&self) -> Result<(), ExecError> {
        self.sticky()
    }

    fn max_threads(&self, kernel: &str) -> Result<usize, ExecError> {
        // Any kernel of the build may run 1024 threads a block (no register file here).
        match self.kernels.get(kernel) {
            Some(_) => Ok(1024),
            None => Err(ExecError::Gpu(GpuError::NoKernel(kernel.to_string()))),
        }
    }

    fn max_shared_bytes(&self) -> Result<usize, ExecError> {
        Ok(self.shared_bytes)
    }

    fn multiprocessors(&self) -> Result<usize, ExecError> {
        // Blocks run one at a time here; a GPU-like count, so that launches take the
        // shapes they take on a small GPU (a step with few rows splits its attention).
        Ok(EMU_MULTIPROCESSORS)
    }

    fn synchronize(&self) -> Result<(), ExecError> {
        self.sticky()
    }

    fn describe(&self) -> String {
        format!("CUDA emulator ({} build)", self.build)
    }
}

impl Emu {
    /// How many launches of `kernel` this emulator has run (graph replays included): how a
    /// test knows a step took the path it means to check.
    pub fn launches(&self, kernel: &str) -> u64 {
        self.runs
            .lock()
            .map_or(0, |r| r.get(kernel).copied().unwrap_or(0))
    }

    /// Err once a fault was injected after this device was opened ([`fault_open_devices`]).
    fn sticky(&self) -> Result<(), ExecError> {
        if FAULTS.load(Ordering::SeqCst) == self.epoch {
            Ok(())
        } else {
            Err(ExecError::Emu(
                "injected device fault: every call fails until the device is opened again".into(),
            ))
        }
    }

    /// The kernel `kernel`, with `args` checked against its signature and `cfg`'s block
    /// against the threads [`super::LAUNCH_THREADS`] declares for it.
    fn check_launch(
        &self,
        kernel: &str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<&Kernel, ExecError> {
        let k = self
            .kernels
            .get(kernel)
            .ok_or_else(|| ExecError::Gpu(GpuError::NoKernel(kernel.to_string())))?;
        check_threads(kernel, cfg)?;
        check_args(kernel, &k.sig, args)?;
        check_aliasing(kernel, &k.access, args)?;
        Ok(k)
    }

    /// The capture state.
    fn recording(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<Recorded>>>, ExecError> {
        self.capturing
            .lock()
            .map_err(|_| ExecError::Emu("a capture panicked".into()))
    }

    /// Runs one launch to completion.
    fn run_launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<(), ExecError> {
        let stall = STALL_US.load(Ordering::SeqCst);
        if stall > 0 {
            std::thread::sleep(std::time::Duration::from_micros(stall));
        }
        let k = self.check_launch(kernel, cfg, args)?;
        if let Ok(mut runs) = self.runs.lock() {
            *runs.entry(kernel.to_string()).or_default() += 1;
        }
        // Dynamic shared memory: only the gemv kernels (and the experts' products on their
        // device code, moe_tc_*) take it, from their static area.
        let gemv = kernel.starts_with("gemv_") || kernel.starts_with("moe_tc_");
        if cfg.shared_mem_bytes != 0 && (!gemv || cfg.shared_mem_bytes as usize > self.shared_bytes)
        {
            return Err(ExecError::Emu(format!(
                "{kernel}: {} bytes of dynamic shared memory (only gemv kernels have it, up \
                 to {})",
                cfg.shared_mem_bytes, self.shared_bytes
            )));
        }
        // Each argument's value in its own 8-byte slot, as cuLaunchKernel's kernelParams.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr { addr, .. } => addr,
                Arg::Null => 0,
                Arg::I32(v) => v as u32 as u64,
                Arg::U32(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::U64(v) => v,
            })
            .collect();
        let mut params: Vec<*mut c_void> =
            slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
        let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
        let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
        let mut err = [0 as c_char; 512];
        let _stream = self
            .stream
            .lock()
            .map_err(|_| ExecError::Emu("a launch panicked".into()))?;
        // SAFETY: `call` is this build's launcher for `kernel`, whose parameter list the
        // arguments were just checked against; pointer arguments are the caller's buffers
        // (as on a GPU, the kernel trusts the extents it is given).
        let rc = unsafe {
            ffi::tollgate_emu_launch(
                k.name.as_ptr(),
                k.call,
                grid.as_ptr(),
                block.as_ptr(),
                cfg.shared_mem_bytes,
                params.as_mut_ptr(),
                next_seed(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: the runtime wrote a NUL-terminated message into `err`.
            let why = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            return Err(ExecError::Emu(format!("{kernel}: {why}")));
        }
        Ok(())
    }
}

/// Runs a product on the CPU (the twins' arithmetic).
///
/// # Safety
/// The addresses must hold `rows × k`, `n × k` and `rows × n` elements.
unsafe fn run_gemm(g: RawGemm) {
    let x = std::slice::from_raw_parts(g.x, g.rows * g.k);
    let w = std::slice::from_raw_parts(g.w, g.n * g.k);
    let out = super::twins::gemm(x, w, g.rows, g.k, g.n);
    std::slice::from_raw_parts_mut(g.y, g.rows * g.n).copy_from_slice(&out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: 0,
        }
    }

    fn emu() -> Option<Emu> {
        or_skip(Emu::open())
    }

    #[test]
    fn every_build_has_every_kernel_of_the_sources() {
        let Some(_) = emu() else { return };
        let names: Vec<&str> = super::super::SOURCES
            .iter()
            .flat_map(|s| s.entries.iter().copied())
            .collect();
        for b in builds() {
            for n in &names {
                assert!(b.kernels.contains_key(*n), "build {} lacks {n}", b.name);
            }
        }
        let smol = LlamaConfig::smollm2_135m();
        assert!(Emu::open_for(&smol).is_ok());
        let odd = LlamaConfig {
            n_heads: 12,
            n_kv_heads: 3,
            ..smol
        };
        let e = Emu::open_for(&odd).err().expect("no build for groups of 4");
        assert!(e.to_string().contains("MAX_GROUP=4"), "{e}");
    }

    #[test]
    fn blocks_and_threads_get_their_indices_and_meet_at_barriers() {
        let Some(e) = emu() else { return };
        let (grid, block) = ((3, 2, 2), (8, 4, 2));
        let n = 8 * 4 * 2;
        let out = e.upload(&vec![u32::MAX; 12 * n]).unwrap();
        e.launch("emu_selftest_ids", cfg(grid, block), &[out.arg()])
            .unwrap();
        let got = e.download(&out, 12 * n).unwrap();
        for bz in 0..2u32 {
            for by in 0..2u32 {
                for bx in 0..3u32 {
                    for tz in 0..2u32 {
                        for ty in 0..4u32 {
                            for tx in 0..8u32 {
                                let b = bx + 3 * (by + 2 * bz);
                                let t = tx + 8 * (ty + 4 * tz);
                                let want = (bz << 28)
                                    | (by << 24)
                                    | (bx << 16)
                                    | (tz << 12)
                                    | (ty << 8)
                                    | t;
                                assert_eq!(got[(b * n as u32 + t) as usize], want);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Emulated devices on their own threads launch at once, each block on its thread's own
    /// shared memory: the barrier kernel's neighbours (a block size per device) stay each
    /// launch's own.
    #[test]
    fn devices_launch_at_once_each_on_its_own_shared_memory() {
        let Some(_) = emu() else { return };
        std::thread::scope(|s| {
            for n in [32u32, 64, 96, 128] {
                s.spawn(move || {
                    let e = Emu::open().expect("the emulator opens");
                    let out = e.zeros::<u32>(4 * n as usize).unwrap();
                    for _ in 0..50 {
                        e.launch("emu_selftest_ids", cfg((4, 1, 1), (n, 1, 1)), &[out.arg()])
                            .unwrap();
                        let got = e.download(&out, 4 * n as usize).unwrap();
                        for (i, g) in got.iter().enumerate() {
                            assert_eq!(g & 0xff, i as u32 % n, "blocks of {n}");
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn warp_shuffles_add_up_each_warp() {
        let Some(e) = emu() else { return };
        let input: Vec<f32> = (0..128).map(|i| (i % 37) as f32 * 0.5).collect();
        let (a, out) = (e.upload(&input).unwrap(), e.zeros::<f32>(128).unwrap());
        e.launch(
            "emu_selftest_warp_sum",
            cfg((2, 1, 1), (64, 1, 1)),
            &[a.arg(), out.arg()],
        )
        .unwrap();
        let got = e.download(&out, 128).unwrap();
        for (i, g) in got.iter().enumerate() {
            let w = i / 32 * 32;
            let want: f32 = input[w..w + 32].iter().sum();
            assert_eq!(*g, want, "thread {i}");
        }
    }

    #[test]
    fn shared_memory_is_poisoned_before_every_block() {
        let Some(e) = emu() else { return };
        let out = e.zeros::<f32>(3 * 64).unwrap();
        for _ in 0..2 {
            e.launch(
                "emu_selftest_unwritten_shared",
                cfg((3, 1, 1), (64, 1, 1)),
                &[out.arg()],
            )
            .unwrap();
            let got = e.download(&out, 3 * 64).unwrap();
            assert!(got.iter().all(|v| v.is_nan()), "{got:?}");
        }
    }

    #[test]
    fn misuse_fails_the_launch_with_a_reason() {
        let Some(e) = emu() else { return };
        let out = e.zeros::<f32>(64).unwrap();
        // Threads that never meet, meet at different barriers (named by their places), or
        // read an exited lane.
        for (kernel, threads, want) in [
            ("emu_selftest_deadlock", 64, &["deadlock"][..]),
            (
                "emu_selftest_divergent_barrier",
                64,
                &["divergent barriers", "selftest.cu:"],
            ),
            ("emu_selftest_exited_lane", 32, &["did not take part"]),
        ] {
            let err = e
                .launch(kernel, cfg((1, 1, 1), (threads, 1, 1)), &[out.arg()])
                .unwrap_err()
                .to_string();
            for part in want {
                assert!(err.contains(part), "{kernel}: {part:?} not in {err}");
            }
        }
        // What faults or is undefined on a GPU, with the kernel, thread and line: a
        // misaligned vector load, an index past a thread's array, a shift past the word.
        let input = e.zeros::<f32>(4 * 64 + 4).unwrap();
        let words = e.zeros::<u32>(64).unwrap();
        for (kernel, args, threads, want) in [
            (
                "emu_selftest_misaligned",
                vec![input.arg(), out.arg()],
                1,
                "needs 16-byte alignment",
            ),
            (
                "emu_selftest_past_bounds",
                vec![out.arg()],
                5,
                "index 4 out of the bounds of 'float [4]'",
            ),
            (
                "emu_selftest_wide_shift",
                vec![words.arg()],
                5,
                "shift of 1 ('unsigned int') by 32",
            ),
        ] {
            let err = e
                .launch(kernel, cfg((1, 1, 1), (threads, 1, 1)), &args)
                .unwrap_err()
                .to_string();
            for part in [kernel, "selftest.cu:", want] {
                assert!(err.contains(part), "{kernel}: {part:?} not in {err}");
            }
        }
        // Launches refused before anything runs: arguments against the signature, the
        // kernel's name, the block's size (against LAUNCH_THREADS, and CUDA's 1024), one
        // buffer as the input and the output of a kernel whose pointers are restrict.
        let (both, ids) = (e.zeros::<f32>(64).unwrap(), e.zeros::<u32>(2048).unwrap());
        for (kernel, threads, args, want) in [
            ("embed", 32, vec![out.arg()], "takes 5 arguments"),
            ("no_such_kernel", 32, vec![], "no_such_kernel"),
            (
                "embed",
                512,
                vec![],
                "past the 256 that LAUNCH_THREADS declares",
            ),
            (
                "emu_selftest_warp_sum",
                64,
                vec![both.arg(), both.arg()],
                "arguments 0 and 1 are the same buffer",
            ),
            ("emu_selftest_ids", 2048, vec![ids.arg()], "1 to 1024"),
        ] {
            let err = e
                .launch(kernel, cfg((1, 1, 1), (threads, 1, 1)), &args)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{kernel}: {want:?} not in {err}");
        }
        // The emulator still works after failed launches.
        blocks_and_threads_get_their_indices_and_meet_at_barriers();
    }

    /// Racecheck (`TOLLGATE_EMU_RACECHECK=1` builds): a thread reading a slot another
    /// writes with no barrier between fails the launch, naming the variable, also two lanes
    /// of one warp; with a barrier, or for two lanes a shuffle of their warp, it runs.
    /// Other builds run the races through.
    #[test]
    fn racecheck_reports_shared_memory_read_and_written_with_no_barrier_between() {
        let Some(e) = emu() else { return };
        let out = e.zeros::<u32>(128).unwrap();
        let race = |mode: i32| {
            let args = [out.arg(), Arg::I32(mode)];
            e.launch(
                "emu_selftest_shared_race",
                cfg((2, 1, 1), (64, 1, 1)),
                &args,
            )
        };
        // Ordered: by a barrier (the next thread's slot), by a shuffle (the next lane's).
        for (mode, next) in [
            (1, (|t| (t + 1) % 64) as fn(u32) -> u32),
            (2, |t| (t & !31) | ((t + 1) & 31)),
        ] {
            race(mode).unwrap();
            let want: Vec<u32> = (0..128).map(|i| next(i % 64)).collect();
            assert_eq!(e.download(&out, 128).unwrap(), want, "mode {mode}");
        }
        for mode in [0, 3] {
            if cfg!(tollgate_emu_racecheck) {
                let err = race(mode).unwrap_err().to_string();
                assert!(err.contains("shared-memory race on `slots`"), "{err}");
                assert!(err.contains("no barrier between"), "{err}");
            } else {
                race(mode).unwrap();
            }
        }
        // The emulator still works after them.
        race(1).unwrap();
    }

    /// Racecheck on global memory: a block reading what another block of the launch wrote
    /// fails the launch unless an atomic orders them (`last_to_arrive`), and two threads of
    /// one block unless a barrier does. Other builds run the races through.
    #[test]
    fn racecheck_reports_global_memory_shared_by_blocks_that_nothing_orders() {
        let Some(e) = emu() else { return };
        let (blocks, n) = (4u32, 64u32);
        let parts = e.zeros::<f32>((blocks * n) as usize).unwrap();
        let count = e.zeros::<i32>(1).unwrap();
        let run = |mode: i32| {
            let out = e.zeros::<f32>((blocks * n) as usize).unwrap();
            let args = [parts.arg(), count.arg(), out.arg(), Arg::I32(mode)];
            e.launch(
                "emu_selftest_global_race",
                cfg((blocks, 1, 1), (n, 1, 1)),
                &args,
            )
            .map(|()| e.download(&out, (blocks * n) as usize).unwrap())
        };
        // Ordered: the last block to arrive adds up every block's slots; a barrier.
        for _ in 0..3 {
            let out = run(1).unwrap();
            let merged: Vec<u32> = (0..blocks)
                .filter(|b| {
                    (0..n).all(|t| {
                        let want: u32 = (0..blocks).map(|i| i * n + t).sum();
                        out[(b * n + t) as usize] == want as f32
                    })
                })
                .collect();
            assert_eq!(merged.len(), 1, "one block merges: {out:?}");
            assert_eq!(e.download(&count, 1).unwrap(), [0], "the count is reset");
        }
        let out = run(3).unwrap();
        let want: Vec<f32> = (0..blocks * n).map(|i| (i ^ 1) as f32).collect();
        assert_eq!(out, want);
        for (mode, says) in [
            (0, "no atomic orders the two blocks"),
            (2, "no atomic orders the two blocks"),
            (4, "with no barrier between"),
        ] {
            if cfg!(tollgate_emu_racecheck) {
                let err = run(mode).unwrap_err().to_string();
                assert!(
                    err.contains("global-memory race at byte"),
                    "mode {mode}: {err}"
                );
                assert!(err.contains(says), "mode {mode}: {err}");
            } else {
                run(mode).unwrap();
            }
        }
        // The emulator still works after them.
        run(1).unwrap();
    }

    #[test]
    fn arguments_are_checked_against_the_signature_and_for_aliasing() {
        let sig = b"FiH";
        let p = |elem| Arg::Ptr { addr: 8, elem };
        assert!(check_args("k", sig, &[p(b'f'), Arg::I32(1), p(b'h')]).is_ok());
        assert!(check_args("k", sig, &[p(b'f'), Arg::I32(1), Arg::Null]).is_ok());
        let e = check_args("k", sig, &[p(b'f'), Arg::I32(1)]).unwrap_err();
        assert!(e.to_string().contains("takes 3 arguments"), "{e}");
        let e = check_args("k", sig, &[p(b'h'), Arg::I32(1), p(b'h')]).unwrap_err();
        assert!(e.to_string().contains("argument 0"), "{e}");
        let e = check_args("k", sig, &[p(b'f'), Arg::F32(1.0), p(b'h')]).unwrap_err();
        assert!(e.to_string().contains("argument 1"), "{e}");
        assert!(check_args("k", b"i", &[Arg::Null]).is_err());
        // The same buffer twice: fine where both are read, not where one is written.
        let (x, y) = (
            p(b'f'),
            Arg::Ptr {
                addr: 16,
                elem: b'f',
            },
        );
        assert!(check_aliasing("k", b"rr-", &[x, x, Arg::I32(1)]).is_ok());
        assert!(check_aliasing("k", b"rw-", &[x, y, Arg::I32(1)]).is_ok());
        assert!(check_aliasing("k", b"ww", &[Arg::Null, Arg::Null]).is_ok());
        let e = check_aliasing("k", b"-rw", &[Arg::I32(1), x, x]).unwrap_err();
        assert!(e.to_string().contains("arguments 1 and 2"), "{e}");
        assert!(e.to_string().contains("writes through argument 2"), "{e}");
    }
}
