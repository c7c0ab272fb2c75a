//! SmolLM2's FFN product (1536 × 576, Q4_1 weights from a fixed LCG) and its activations,
//! shared by the matmul bench and `examples/matmul_calls.rs` (included by path).

use kernels::gguf::GgmlType;
use kernels::matmul::{Acts, MatData, Matrix};
use kernels::quant;

/// Output rows (the FFN's width).
pub const ROWS: usize = 1536;
/// Inputs (the model's width).
pub const COLS: usize = 576;

/// `n` values in [−0.5, 0.5) from a fixed LCG started at `seed`.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// The weights, quantized to Q4_1.
pub fn weights() -> Matrix {
    let mut data = Vec::new();
    quant::quantize_row_q4_1(&values(ROWS * COLS, 1), &mut data);
    Matrix::new(ROWS, COLS, MatData::Quant(GgmlType::Q4_1, data))
}

/// `rows` activation rows.
pub fn acts(rows: usize) -> Acts {
    let mut x = Acts::default();
    x.resize(rows, COLS);
    x.f32
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i % 7) as f32 * 0.1);
    x
}
