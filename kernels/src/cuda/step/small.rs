//! Where a step's products of few rows run: cuBLAS, or our `gemv` kernels over the f16
//! rows or the file's own blocks, with the kernel before the product fused into it where
//! the row count says so and its staged rows fit.

use crate::cuda::exec::{Exec, ExecError};
use crate::cuda::gemv::{self, Input, QuantBuf, Weights};
use half::f16;

/// Which row counts of a step's matrix products (1 to [`gemv::MAX_ROWS`]) run on our
/// `gemv_f16` kernel instead of cuBLAS: bit r − 1 for r rows. cuBLAS for all by default;
/// the backend sets it from timings of whole decode steps on the device
/// (`CudaBackend::tune_small_products`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmallProducts(pub u16);

impl SmallProducts {
    /// Every row count on `gemv`.
    pub const ALL: Self = Self(u16::MAX);

    /// Whether a product of `rows` rows runs on `gemv_f16`.
    pub fn gemv(self, rows: usize) -> bool {
        (1..=gemv::MAX_ROWS).contains(&rows) && self.0 & (1 << (rows - 1)) != 0
    }

    /// The same, with `rows` rows' choice set to `on`.
    pub fn with(self, rows: usize, on: bool) -> Self {
        if !(1..=gemv::MAX_ROWS).contains(&rows) {
            return self;
        }
        let bit = 1u16 << (rows - 1);
        Self(if on { self.0 | bit } else { self.0 & !bit })
    }
}

/// Whether a product of `rows` rows over `k` runs on `gemv` with the kernel before it (a
/// norm or swiglu; and after it, RoPE) made in it: `fused` and `small` say so for the row
/// count and the staged rows fit in `max_shared` bytes, whole or in runs of their columns
/// ([`gemv::column_run`]; [`Device::enqueue`](super::Device::enqueue) and what reads its
/// results back).
pub(super) fn fuses(
    fused: SmallProducts,
    small: SmallProducts,
    rows: usize,
    k: usize,
    max_shared: usize,
) -> bool {
    fused.gemv(rows)
        && small.gemv(rows)
        && gemv::column_run(rows, k, max_shared, gemv::Staged::MOST).is_some()
}

/// Where a step's products of few rows run: which row counts on our `gemv` kernels
/// (`gemv`), and of those which over the file's own blocks (`quant`).
#[derive(Clone, Copy)]
pub(super) struct Small {
    pub(super) gemv: SmallProducts,
    pub(super) quant: SmallProducts,
    /// The most shared memory a block may have (what `gemv`'s staged rows may take).
    pub(super) shared: usize,
}

impl Small {
    /// A matrix's weights for a `gemv` product of `rows` rows: its file blocks (`q`) where
    /// it has them and `quant` says so, else its f16 rows `w`.
    pub(super) fn weights<'a, E: Exec>(
        self,
        rows: usize,
        w: &'a E::Buf<f16>,
        q: &'a [QuantBuf<E>],
    ) -> Weights<'a, E> {
        if !q.is_empty() && self.quant.gemv(rows) {
            Weights::Quant(q)
        } else {
            Weights::F16(w, 0)
        }
    }
}

/// `y = x · wᵀ` for `rows` rows: `gemv` where `small` says so and the shape fits (in runs
/// of columns where the rows are too wide to stage whole: `gemv::column_run`; over the
/// file's blocks `q` where `small` says so too), else cuBLAS.
#[allow(clippy::too_many_arguments)]
pub(super) fn product<E: Exec>(
    e: &E,
    small: Small,
    x: &E::Buf<f16>,
    (w, q): (&E::Buf<f16>, &[QuantBuf<E>]),
    y: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    let weights = small.weights(rows, w, q);
    if small.gemv.gemv(rows) && gemv::column_run(rows, k, small.shared, weights.staged()).is_some()
    {
        gemv::gemv_from(e, Input::Rows(x), weights, y, rows, k, n)
    } else {
        e.gemm(x, w, 0, y, rows, k, n)
    }
}
