//! One GPU with every kernel loaded: a context, its stream, and the kernels by name,
//! compiled (or read from the PTX cache) for the device's compute capability.
//!
//! Everything on a device runs on its one non-default stream, in order, with cudarc's
//! cross-stream event tracking turned off (see [`Gpu::open`]).

use super::compile::{self, CompileError};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::Arc;

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
}

/// A device with the kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: &'static str,
    kernels: HashMap<&'static str, CudaFunction>,
}

impl Gpu {
    /// Opens device `ordinal` (checking first that the CUDA libraries load).
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
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
        let mut kernels = HashMap::new();
        for (src, ptx) in compile::all(arch)? {
            let module = ctx.load_module(ptx)?;
            for &entry in src.entries {
                kernels.insert(entry, module.load_function(entry)?);
            }
        }
        // Not the legacy default stream: CUDA graphs cannot be captured on it.
        let stream = ctx.new_stream()?;
        Ok(Self {
            ctx,
            stream,
            arch,
            kernels,
        })
    }

    /// A loaded kernel.
    pub fn kernel(&self, name: &str) -> Result<&CudaFunction, GpuError> {
        self.kernels
            .get(name)
            .ok_or_else(|| GpuError::NoKernel(name.to_string()))
    }

    /// The device's name and memory, for reports.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("{name} ({})", self.arch)
    }
}
