//! The `gemv_f16` kernel's launch (`kernels/cuda/gemv.cu`): the step's product for a few
//! rows, a candidate against cuBLAS at decode batch 1–4: the backend times whole decode
//! steps both ways at load and keeps the faster (`step::SmallProducts`).

use super::exec::{check_gemm, Arg, DevBuf, Exec, ExecError};
use cudarc::driver::LaunchConfig;
use half::f16;

/// The kernel's limits (`GEMV_MAX_ROWS`, `GEMV_MAX_K` in gemv.cu).
pub const MAX_ROWS: usize = 4;
pub const MAX_K: usize = 2048;

/// Whether `gemv_f16` takes a product of `rows` rows over `k` (16-byte weight rows).
pub fn fits(rows: usize, k: usize) -> bool {
    (1..=MAX_ROWS).contains(&rows) && k <= MAX_K && k.is_multiple_of(8)
}

/// `y[rows × n] = x[rows × k] · w[n × k]ᵀ` with `w` starting `w_row0` rows in, as
/// [`Exec::gemm`], by `gemv_f16`: 8 warps per block, one output column per warp at a time.
#[allow(clippy::too_many_arguments)]
pub fn gemv<E: Exec>(
    e: &E,
    x: &E::Buf<f16>,
    w: &E::Buf<f16>,
    w_row0: usize,
    y: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    if !fits(rows, k) {
        return Err(ExecError::Bounds(format!(
            "gemv_f16 takes 1 to {MAX_ROWS} rows and k a multiple of 8 up to {MAX_K}, not \
             {rows} rows of {k}"
        )));
    }
    check_gemm((x.elems(), w.elems(), y.elems()), w_row0, rows, k, n)?;
    let warps = 8u32;
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(warps).clamp(1, 4096), 1, 1),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = [
        x.arg(),
        w.arg_at(w_row0 * k..(w_row0 + n) * k)?,
        y.arg(),
        Arg::I32(rows as i32),
        Arg::I32(k as i32),
        Arg::I32(n as i32),
    ];
    e.launch("gemv_f16", cfg, &args)
}
