//! The kernels' modules, loaded and launched through the CUDA driver API itself
//! (`cuModuleLoadData`, `cuLaunchKernelEx`): cudarc keeps a loaded function's handle
//! private, and a launch that carries attributes needs it.
//!
//! The attribute the step's launches carry is *programmatic stream serialization*
//! (Hopper and later): a kernel may be scheduled while the one before it on the stream is
//! still running, and waits inside, at its first statement (`pdl_begin()` in
//! `common.cuh`), for that one to finish. The launch latency and the blocks' start-up
//! then overlap the previous kernel's tail, which at small batch is most of a decode
//! step's time between its few-microsecond kernels; the products also ask L2 for their
//! weights before they wait. Every entry point starts with `pdl_begin` (`cuda_compile`
//! checks the sources), so stream order holds as before.

use super::Source;
use cudarc::driver::sys::{
    self, CUfunction, CUfunction_attribute, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchConfig,
    CUmodule, CUstream,
};
use cudarc::driver::{CudaContext, DriverError, LaunchConfig};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// Every kernel of the compiled sources, by entry point, in modules of one context.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    modules: Vec<CUmodule>,
    functions: HashMap<&'static str, Kernel>,
}

/// One loaded kernel: only [`Kernels`] makes them, valid while it lives.
#[derive(Debug, Clone, Copy)]
pub struct Kernel(CUfunction);

// SAFETY: module and function handles are plain driver handles, valid from any thread
// that has their context current (every use makes it so first).
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}
unsafe impl Send for Kernel {}
unsafe impl Sync for Kernel {}

impl Kernels {
    /// Loads each source's PTX (the driver compiles it for the device) and finds its
    /// entry points.
    pub fn load(
        ctx: &Arc<CudaContext>,
        compiled: Vec<(&'static Source, Ptx)>,
    ) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let mut k = Self {
            ctx: ctx.clone(),
            modules: Vec::new(),
            functions: HashMap::new(),
        };
        for (src, ptx) in compiled {
            // PTX text has no NUL byte; one would be a compiler bug, reported as such.
            let text = CString::new(ptx.to_src())
                .map_err(|_| DriverError(sys::cudaError_enum::CUDA_ERROR_INVALID_PTX))?;
            let mut module: CUmodule = std::ptr::null_mut();
            // SAFETY: `text` is a NUL-terminated PTX image that outlives the call.
            unsafe { sys::cuModuleLoadData(&mut module, text.as_ptr() as *const c_void) }
                .result()?;
            k.modules.push(module);
            for &entry in src.entries {
                let name = CString::new(entry)
                    .map_err(|_| DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_FOUND))?;
                let mut f: CUfunction = std::ptr::null_mut();
                // SAFETY: `module` was loaded above; `name` is NUL-terminated.
                unsafe { sys::cuModuleGetFunction(&mut f, module, name.as_ptr()) }.result()?;
                k.allow_dynamic_shared(Kernel(f))?;
                k.functions.insert(entry, Kernel(f));
            }
        }
        Ok(k)
    }

    /// Lets launches of `f` have as much dynamic shared memory as the device allows a
    /// block beside its static shared memory (above 48 KB a kernel must opt in; the
    /// `gemv` kernels' staged rows are dynamic).
    fn allow_dynamic_shared(&self, f: Kernel) -> Result<(), DriverError> {
        let optin = self.ctx.attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?;
        let fixed = self.attribute(f, CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
        let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        // SAFETY: `f` is a function of a module this value keeps loaded.
        unsafe { sys::cuFuncSetAttribute(f.0, attr, (optin - fixed).max(0)) }.result()
    }

    /// The kernel `name`, if a source defines it.
    pub fn get(&self, name: &str) -> Option<Kernel> {
        self.functions.get(name).copied()
    }

    /// An attribute of kernel `k`, one of these (e.g. the most threads a block of it may
    /// have).
    pub fn attribute(&self, k: Kernel, a: CUfunction_attribute) -> Result<i32, DriverError> {
        self.ctx.bind_to_thread()?;
        let mut v = 0i32;
        // SAFETY: `k` is a function of a module this value keeps loaded.
        unsafe { sys::cuFuncGetAttribute(&mut v, a, k.0) }.result()?;
        Ok(v)
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        for &m in &self.modules {
            // SAFETY: loaded by `load`, unloaded once; no launch of it is pending once
            // its owner (the device) is dropped. An error here leaves nothing to undo.
            let _ = unsafe { sys::cuModuleUnload(m) };
        }
    }
}

/// A kernel argument's bytes, as the driver reads them: from the start of an 8-byte slot
/// (4-byte values in its first 4 bytes: x86-64 and aarch64 are little-endian).
#[cfg(target_endian = "little")]
pub type Slot = u64;

/// Launches `k` on `stream` with `params` (one pointer per argument, to its value), as a
/// programmatic dependent launch when `dependent`.
///
/// # Safety
/// `k` must be of a live [`Kernels`]; `params` must match its parameter list in count and
/// sizes, every pointer argument must be a live allocation of its context of the extent
/// the launch touches, and `stream` a live stream of that context, which must be current.
pub unsafe fn launch(
    k: Kernel,
    stream: CUstream,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
    dependent: bool,
) -> Result<(), DriverError> {
    // SAFETY (zeroed): a plain C struct of integers and a union, all-zero valid.
    let mut attr: CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream,
        attrs: if dependent {
            &mut attr
        } else {
            std::ptr::null_mut()
        },
        numAttrs: u32::from(dependent),
    };
    // SAFETY: as the caller promises; `config` and `attr` outlive the call.
    unsafe { sys::cuLaunchKernelEx(&config, k.0, params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
}
