//! The CUDA side of the kernels: CUDA C sources (`kernels/cuda/*.cu`), their run-time
//! compilation by NVRTC ([`compile`]), the CPU twin of every kernel ([`twins`]: the same
//! arithmetic, the reference for parity tests), a device handle with every kernel loaded
//! ([`device`]), the step's device work (`step`), its one host-to-device copy
//! ([`staging`]), and the backend that runs the forward step on a GPU ([`backend`]): CUDA
//! graphs for decode steps, sampling on the device.
//!
//! The step and the backend are written against [`exec::Exec`], which a GPU
//! ([`device::Gpu`]) and the CPU emulator ([`emu::Emu`]: the same `.cu` sources built for
//! the host, each CUDA thread a fiber) both implement: the parity tests, the backend tests
//! and the engine's tests run the GPU code path on the emulator wherever there is no GPU.
//!
//! Nothing here touches CUDA unless [`available`] said the driver library is present
//! (cudarc loads libraries dynamically; calling into a missing one panics), so one binary
//! built without CUDA runs everywhere.

pub mod backend;
pub mod bench;
pub mod compile;
pub mod device;
pub mod emu;
pub mod exec;
pub mod gemv;
pub mod launch;
pub mod staging;
mod step;
pub mod twins;

/// A kernel source file.
pub struct Source {
    pub name: &'static str,
    pub code: &'static str,
    /// The `extern "C"` entry points it defines.
    pub entries: &'static [&'static str],
}

/// Helpers prepended to every source.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// The `gemv` kernels' device code (its headers, in the order of build.rs's HEADERS), which
/// the programs of `gemv.cu`'s and `moe_tc.cu`'s entry points open with.
macro_rules! gemv_device_code {
    () => {
        concat!(
            "#line 1 \"gemv.cuh\"\n",
            include_str!("../../cuda/gemv.cuh"),
            "#line 1 \"gemv_blocks.cuh\"\n",
            include_str!("../../cuda/gemv_blocks.cuh"),
            "#line 1 \"gemv_product.cuh\"\n",
            include_str!("../../cuda/gemv_product.cuh"),
        )
    };
}

/// Every kernel source.
pub const SOURCES: &[Source] = &[
    Source {
        name: "batch",
        code: include_str!("../../cuda/batch.cu"),
        entries: &["build_batch"],
    },
    Source {
        name: "embed",
        code: include_str!("../../cuda/embed.cu"),
        entries: &["embed"],
    },
    Source {
        name: "norm",
        code: include_str!("../../cuda/norm.cu"),
        entries: &["add_rmsnorm", "head_rmsnorm"],
    },
    Source {
        name: "rope_kv",
        code: include_str!("../../cuda/rope_kv.cu"),
        entries: &["rope_kv_write"],
    },
    Source {
        name: "attention",
        code: include_str!("../../cuda/attention.cu"),
        entries: &["attention_prefill", "attention_decode"],
    },
    Source {
        name: "attention_tc",
        code: include_str!("../../cuda/attention_tc.cu"),
        entries: &["attention_tc"],
    },
    Source {
        name: "swiglu",
        code: include_str!("../../cuda/swiglu.cu"),
        entries: &["swiglu", "geglu", "softcap"],
    },
    Source {
        name: "gemv",
        // The device code (in the order of build.rs's HEADERS), then the entry points: one
        // program.
        code: concat!(
            gemv_device_code!(),
            "#line 1 \"gemv.cu\"\n",
            include_str!("../../cuda/gemv.cu")
        ),
        entries: &[
            "gemv_f16",
            "gemv_f16_norm",
            "gemv_f16_norm_rope",
            "gemv_f16_swiglu",
            "gemv_q4",
            "gemv_q4_norm",
            "gemv_q4_norm_rope",
            "gemv_q4_swiglu",
            "gemv_q8",
            "gemv_q8_norm",
            "gemv_q8_norm_rope",
            "gemv_q8_swiglu",
            "gemv_q4f",
            "gemv_q4f_norm",
            "gemv_q4f_norm_rope",
            "gemv_q4f_swiglu",
            "gemv_q8f",
            "gemv_q8f_norm",
            "gemv_q8f_norm_rope",
            "gemv_q8f_swiglu",
            "gemv_q8h",
            "gemv_q8h_norm",
            "gemv_q8h_norm_rope",
            "gemv_q8h_swiglu",
            "gemv_q4f32",
            "gemv_q4f32_norm",
            "gemv_q4f32_norm_rope",
            "gemv_q4f32_swiglu",
            "gemv_q8f32",
            "gemv_q8f32_norm",
            "gemv_q8f32_norm_rope",
            "gemv_q8f32_swiglu",
            "gemv_q8h32",
            "gemv_q8h32_norm",
            "gemv_q8h32_norm_rope",
            "gemv_q8h32_swiglu",
            "gemv_iq4",
            "gemv_iq4_norm",
            "gemv_iq4_norm_rope",
            "gemv_iq4_swiglu",
            "gemv_iq4f",
            "gemv_iq4f_norm",
            "gemv_iq4f_norm_rope",
            "gemv_iq4f_swiglu",
            "gemv_q5",
            "gemv_q5_norm",
            "gemv_q5_norm_rope",
            "gemv_q5_swiglu",
            "gemv_q5f",
            "gemv_q5f_norm",
            "gemv_q5f_norm_rope",
            "gemv_q5f_swiglu",
            "gemv_q6h",
            "gemv_q6h_norm",
            "gemv_q6h_norm_rope",
            "gemv_q6h_swiglu",
            "gemv_q4s",
            "gemv_q4s_norm",
            "gemv_q4s_norm_rope",
            "gemv_q4s_swiglu",
            "gemv_q5s",
            "gemv_q5s_norm",
            "gemv_q5s_norm_rope",
            "gemv_q5s_swiglu",
            "gemv_q8s",
            "gemv_q8s_norm",
            "gemv_q8s_norm_rope",
            "gemv_q8s_swiglu",
            "gemv_iq4s",
            "gemv_iq4s_norm",
            "gemv_iq4s_norm_rope",
            "gemv_iq4s_swiglu",
            "gemv_q4h",
            "gemv_q4h_norm",
            "gemv_q4h_norm_rope",
            "gemv_q4h_swiglu",
            "gemv_q2h",
            "gemv_q2h_norm",
            "gemv_q2h_norm_rope",
            "gemv_q2h_swiglu",
        ],
    },
    Source {
        name: "moe",
        code: include_str!("../../cuda/moe.cu"),
        entries: &[
            "moe_route",
            "moe_sort",
            "moe_gemv",
            "moe_gemv_q8",
            "moe_combine",
        ],
    },
    Source {
        name: "moe_tc",
        // On gemv's device code (its headers, in order): one program.
        code: concat!(
            gemv_device_code!(),
            "#line 1 \"moe_tc.cu\"\n",
            include_str!("../../cuda/moe_tc.cu")
        ),
        entries: &[
            "moe_tc_q4",
            "moe_tc_q4_swiglu",
            "moe_tc_q4s",
            "moe_tc_q4s_swiglu",
            "moe_tc_q4f",
            "moe_tc_q4f_swiglu",
            "moe_tc_q4h",
            "moe_tc_q4h_swiglu",
            "moe_tc_q2h",
            "moe_tc_q2h_swiglu",
            "moe_tc_q5f",
            "moe_tc_q5f_swiglu",
            "moe_tc_q6h",
            "moe_tc_q6h_swiglu",
            "moe_tc_q8s",
            "moe_tc_q8s_swiglu",
            "moe_tc_iq4f",
            "moe_tc_iq4f_swiglu",
        ],
    },
    Source {
        name: "sample",
        code: include_str!("../../cuda/sample.cu"),
        entries: &["sample", "logprobs"],
    },
];

/// The most threads per block each entry point is launched with (`step/`, the benches
/// and the parity tests; attention: 4 to 16 warps by the step's rows, the tensor-core
/// kernel's 4 in a step and 8 in its parity test): `cuda_compile` checks with `ptxas` that
/// each fits its registers at that size on sm_90, and the emulator refuses a launch past
/// it.
pub const LAUNCH_THREADS: &[(&str, u32)] = &[
    ("build_batch", 256),
    ("embed", 256),
    ("add_rmsnorm", 256),
    ("head_rmsnorm", 256),
    ("rope_kv_write", 256),
    ("attention_prefill", 512),
    ("attention_decode", 512),
    ("attention_tc", 256),
    ("swiglu", 256),
    ("geglu", 256),
    ("softcap", 256),
    ("moe_route", 256),
    ("moe_sort", 256),
    ("moe_gemv", 256),
    ("moe_gemv_q8", 256),
    ("moe_combine", 256),
    ("sample", 1024),
    ("logprobs", 1024),
    ("gemv_f16", 256),
    ("gemv_f16_norm", 256),
    ("gemv_f16_norm_rope", 256),
    ("gemv_f16_swiglu", 256),
    ("gemv_q4", 256),
    ("gemv_q4_norm", 256),
    ("gemv_q4_norm_rope", 256),
    ("gemv_q4_swiglu", 256),
    ("gemv_q8", 256),
    ("gemv_q8_norm", 256),
    ("gemv_q8_norm_rope", 256),
    ("gemv_q8_swiglu", 256),
    ("gemv_q4f", 256),
    ("gemv_q4f_norm", 256),
    ("gemv_q4f_norm_rope", 256),
    ("gemv_q4f_swiglu", 256),
    ("gemv_q8f", 256),
    ("gemv_q8f_norm", 256),
    ("gemv_q8f_norm_rope", 256),
    ("gemv_q8f_swiglu", 256),
    ("gemv_q8h", 256),
    ("gemv_q8h_norm", 256),
    ("gemv_q8h_norm_rope", 256),
    ("gemv_q8h_swiglu", 256),
    ("gemv_q4f32", 256),
    ("gemv_q4f32_norm", 256),
    ("gemv_q4f32_norm_rope", 256),
    ("gemv_q4f32_swiglu", 256),
    ("gemv_q8f32", 256),
    ("gemv_q8f32_norm", 256),
    ("gemv_q8f32_norm_rope", 256),
    ("gemv_q8f32_swiglu", 256),
    ("gemv_q8h32", 256),
    ("gemv_q8h32_norm", 256),
    ("gemv_q8h32_norm_rope", 256),
    ("gemv_q8h32_swiglu", 256),
    ("gemv_iq4", 256),
    ("gemv_iq4_norm", 256),
    ("gemv_iq4_norm_rope", 256),
    ("gemv_iq4_swiglu", 256),
    ("gemv_iq4f", 256),
    ("gemv_iq4f_norm", 256),
    ("gemv_iq4f_norm_rope", 256),
    ("gemv_iq4f_swiglu", 256),
    ("gemv_q5", 256),
    ("gemv_q5_norm", 256),
    ("gemv_q5_norm_rope", 256),
    ("gemv_q5_swiglu", 256),
    ("gemv_q5f", 256),
    ("gemv_q5f_norm", 256),
    ("gemv_q5f_norm_rope", 256),
    ("gemv_q5f_swiglu", 256),
    ("gemv_q6h", 256),
    ("gemv_q6h_norm", 256),
    ("gemv_q6h_norm_rope", 256),
    ("gemv_q6h_swiglu", 256),
    ("gemv_q4s", 256),
    ("gemv_q4s_norm", 256),
    ("gemv_q4s_norm_rope", 256),
    ("gemv_q4s_swiglu", 256),
    ("gemv_q5s", 256),
    ("gemv_q5s_norm", 256),
    ("gemv_q5s_norm_rope", 256),
    ("gemv_q5s_swiglu", 256),
    ("gemv_q8s", 256),
    ("gemv_q8s_norm", 256),
    ("gemv_q8s_norm_rope", 256),
    ("gemv_q8s_swiglu", 256),
    ("gemv_iq4s", 256),
    ("gemv_iq4s_norm", 256),
    ("gemv_iq4s_norm_rope", 256),
    ("gemv_iq4s_swiglu", 256),
    ("gemv_q4h", 256),
    ("gemv_q4h_norm", 256),
    ("gemv_q4h_norm_rope", 256),
    ("gemv_q4h_swiglu", 256),
    ("gemv_q2h", 256),
    ("gemv_q2h_norm", 256),
    ("gemv_q2h_norm_rope", 256),
    ("gemv_q2h_swiglu", 256),
    ("moe_tc_q4", 256),
    ("moe_tc_q4_swiglu", 256),
    ("moe_tc_q4s", 256),
    ("moe_tc_q4s_swiglu", 256),
    ("moe_tc_q4f", 256),
    ("moe_tc_q4f_swiglu", 256),
    ("moe_tc_q4h", 256),
    ("moe_tc_q4h_swiglu", 256),
    ("moe_tc_q2h", 256),
    ("moe_tc_q2h_swiglu", 256),
    ("moe_tc_q5f", 256),
    ("moe_tc_q5f_swiglu", 256),
    ("moe_tc_q6h", 256),
    ("moe_tc_q6h_swiglu", 256),
    ("moe_tc_q8s", 256),
    ("moe_tc_q8s_swiglu", 256),
    ("moe_tc_iq4f", 256),
    ("moe_tc_iq4f_swiglu", 256),
];

/// The launch of `add_rmsnorm` for `n_out` output rows: one warp per row, 8 rows per
/// block of 256 threads.
pub fn norm_launch(n_out: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: ((n_out as u32).div_ceil(8), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The launch of `swiglu` over `n_rows` rows of `ffn` columns: 256 columns a block, a
/// row of blocks per row (at most 65,535 rows of blocks; each then takes several rows).
pub fn swiglu_launch(n_rows: usize, ffn: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (
            (ffn as u32).div_ceil(256),
            (n_rows as u32).clamp(1, 65535),
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What is missing for CUDA, or `Ok` when the driver, NVRTC and cuBLAS libraries load.
pub fn libraries() -> Result<(), String> {
    // SAFETY: these only try to open the shared libraries; they call nothing in them.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    let mut missing = Vec::new();
    if !driver {
        missing.push("the CUDA driver (libcuda)");
    }
    if !nvrtc {
        missing.push("NVRTC (libnvrtc)");
    }
    if !cublas {
        missing.push("cuBLAS (libcublas)");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("not found: {}", missing.join(", ")))
    }
}

/// Whether NVRTC alone loads (enough to compile kernels to PTX, without a GPU).
pub fn nvrtc_present() -> bool {
    // SAFETY: only opens the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// How many GPUs the driver sees, or why CUDA cannot be used.
pub fn available() -> Result<usize, String> {
    libraries()?;
    let n = cudarc::driver::CudaContext::device_count().map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the CUDA driver sees no device".into());
    }
    Ok(n as usize)
}
