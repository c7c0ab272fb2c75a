//! The matrix products' benchmarks: cuBLAS against our `gemv` kernels over f16 rows and
//! the file's blocks, and the products with the kernels around them fused in.

use super::{time, InStep, Row, Sizes};
use crate::cuda::exec::{Exec, ExecError};
use crate::cuda::gemv;
use half::f16;

/// The step's matrix products at decode batch sizes (`sizes.products`, each at
/// `sizes.product_rows`): cuBLAS's, then where a few rows allow it our `gemv_f16`, the
/// same over the file's blocks in every layout, and the fused forms.
pub(super) fn products<E: Exec>(e: &E, sizes: &Sizes, iters: u32) -> Result<Vec<Row>, ExecError> {
    let mut rows = Vec::new();
    // The products at decode batch sizes: the weights read once is the floor.
    for &(name, k, n, in_step) in &sizes.products {
        let w = e.zeros::<f16>(n * k)?;
        // The same weights in the file's 4- and 8-bit blocks (`gemv_q4`, `gemv_q8`), and
        // in the K-quant layouts' both ways (factored scales, as the backend holds them:
        // `gemv_q4f`, `gemv_q8f`; a scale per 16: `gemv_q8h`; as f32 pairs, more bytes:
        // `gemv_q4f32`, `gemv_q8f32`, `gemv_q8h32`), and IQ4's levels from 4-bit indices
        // (`gemv_iq4`, IQ4_NL's; `gemv_iq4f`, IQ4_XS's), and 5-bit integers (`gemv_q5`,
        // Q5_1's; `gemv_q5f`, Q5_K's), and Q6_K's at 6 bits (`gemv_q6h`, against its 8-bit
        // form `gemv_q8h`); a product of the QKV's width also as Q4_K_M's stack of two as
        // the backend holds it (Q4_K Q and K, Q6_K V at 6 bits, factored: a launch each).
        // Where the offsets are the kernels' centres' (Q4_0, Q5_0, Q8_0, IQ4_NL), the file
        // blocks' scales alone too (`gemv_q4s`, `gemv_q5s`, `gemv_q8s`, `gemv_iq4s`); Q3_K's
        // 4-bit integers under their scales per 16 (`gemv_q4h`); Q2_K's 2-bit ones under
        // their scales and offsets per 16 (`gemv_q2h`).
        use gemv::Scales::{
            F16Pairs, F16Scales, F32Halves, F32Pairs, Factored, FactoredHalfPairs, FactoredHalves,
        };
        // The layout pads the rows to a tile of 16.
        let part = |bits: u32, scales: gemv::Scales, iq4: bool, rows: usize| {
            let padded = rows.next_multiple_of(16);
            Ok::<_, ExecError>(gemv::QuantBuf {
                q: e.zeros::<u32>(padded * k * bits as usize / 32)?,
                s: e.zeros::<u32>(padded / 16 * scales.group_words(k / 32))?,
                bits,
                scales,
                iq4,
                rows,
                k,
            })
        };
        let mut quant = [
            (4u32, F16Pairs, false),
            (8, F16Pairs, false),
            (4, Factored, false),
            (8, Factored, false),
            (8, FactoredHalves, false),
            (4, F32Pairs, false),
            (8, F32Pairs, false),
            (8, F32Halves, false),
            (4, F16Pairs, true),
            (4, Factored, true),
            (5, F16Pairs, false),
            (5, Factored, false),
            (6, FactoredHalves, false),
            (4, F16Scales, false),
            (5, F16Scales, false),
            (8, F16Scales, false),
            (4, F16Scales, true),
            (4, FactoredHalves, false),
            (2, FactoredHalfPairs, false),
        ]
        .into_iter()
        .map(|(bits, scales, iq4)| Ok(vec![part(bits, scales, iq4, n)?]))
        .collect::<Result<Vec<_>, ExecError>>()?;
        let (nh, nkv, hd) = sizes.qkv_heads;
        if n == (nh + 2 * nkv) * hd {
            quant.push(vec![
                part(4, Factored, false, n - nkv * hd)?,
                part(6, FactoredHalves, false, nkv * hd)?,
            ]);
        }
        let times = match in_step {
            InStep::PerLayer => Some(sizes.layers),
            InStep::Once => Some(1),
            InStep::No => None,
        };
        for &m in &sizes.product_rows {
            let x = e.zeros::<f16>(m * k)?;
            let mut y = e.zeros::<f32>(m * n)?;
            let bytes = (n * k * 2 + m * k * 2 + m * n * 4) as f64;
            let secs = time(e, iters, || e.gemm(&x, &w, 0, &mut y, m, k, n))?;
            rows.push(Row {
                name: format!("gemm {name} {m}×{k}·{k}×{n}"),
                secs,
                bytes,
                in_step: times.filter(|_| sizes.decode.contains(&m)).map(|t| (m, t)),
            });
            // Our own kernel for a few rows, against cuBLAS's row above (in runs of the
            // columns where the rows are too wide to stage whole), then with the kernel
            // before it made in its blocks (and after it, for the QKV product; in runs too).
            let max_shared = e.max_shared_bytes()?;
            if gemv::column_run(m, k, max_shared, gemv::Staged::MOST).is_some() {
                let secs = time(e, iters, || gemv::gemv(e, &x, &w, 0, &mut y, m, k, n))?;
                rows.push(Row {
                    name: format!("gemv_f16 {name} {m}×{k}·{k}×{n}"),
                    secs,
                    bytes,
                    in_step: None,
                });
                // The candidate over the file's blocks: fewer bytes for the same product.
                for wq in &quant {
                    let secs = time(e, iters, || {
                        let (x, w) = (gemv::Input::Rows(&x), gemv::Weights::Quant(wq));
                        gemv::gemv_from(e, x, w, &mut y, m, k, n)
                    })?;
                    let weights: usize = wq.iter().map(gemv::QuantBuf::bytes).sum();
                    let kinds: Vec<&str> = wq.iter().map(|p| p.kind().unwrap_or("?")).collect();
                    rows.push(Row {
                        name: format!("gemv_{} {name} {m}×{k}·{k}×{n}", kinds.join("+")),
                        secs,
                        bytes: (weights + m * k * 2 + m * n * 4) as f64,
                        in_step: None,
                    });
                }
                rows.extend(fused_products(
                    e,
                    (name, k, n),
                    m,
                    sizes.qkv_heads,
                    &w,
                    iters,
                )?);
            }
        }
    }
    Ok(rows)
}

/// The fused forms of one product of `m` rows by `w` (`n × k`): its input normalized in its
/// blocks (`gemv_f16_norm`: the bytes of x, delta and the sums counted), made by SwiGLU
/// from rows of 2k (`gemv_f16_swiglu`), and, where `n` is the QKV width of `heads`, with
/// RoPE and the cache write (`gemv_f16_norm_rope`). Rows of no step's sum.
pub(super) fn fused_products<E: Exec>(
    e: &E,
    (name, k, n): (&str, usize, usize),
    m: usize,
    heads: (usize, usize, usize),
    w: &E::Buf<f16>,
    iters: u32,
) -> Result<Vec<Row>, ExecError> {
    use super::gemv::{gemv_from, gemv_rope, Input, RopeKv, Weights};
    let (x, delta, norm) = (e.zeros::<f32>(m * k)?, e.zeros::<f32>(m * k)?, e.zeros(k)?);
    let mut x_out = e.zeros::<f32>(m * k)?;
    let mut y = e.zeros::<f32>(m * n)?;
    let weights = (n * k * 2 + m * n * 4) as f64;
    // The normalized input: x + delta (to x_out) by the norm's weight.
    fn input<'a, E: Exec>(
        x: &'a E::Buf<f32>,
        delta: &'a E::Buf<f32>,
        weight: &'a E::Buf<f32>,
        x_out: &'a mut E::Buf<f32>,
    ) -> Input<'a, E> {
        Input::Norm {
            x,
            delta: Some(delta),
            weight,
            x_out: Some(x_out),
            rows: None,
            eps: 1e-5,
        }
    }
    let mut rows = Vec::new();
    let secs = time(e, iters, || {
        gemv_from(
            e,
            input::<E>(&x, &delta, &norm, &mut x_out),
            Weights::F16(w, 0),
            &mut y,
            m,
            k,
            n,
        )
    })?;
    rows.push(Row {
        name: format!("gemv_f16_norm {name} {m}×{k}·{k}×{n}"),
        secs,
        bytes: weights + (3 * m * k * 4) as f64,
        in_step: None,
    });
    let gu = e.zeros::<f32>(m * 2 * k)?;
    let secs = time(e, iters, || {
        gemv_from(e, Input::Swiglu(&gu), Weights::F16(w, 0), &mut y, m, k, n)
    })?;
    rows.push(Row {
        name: format!("gemv_f16_swiglu {name} {m}×{k}·{k}×{n}"),
        secs,
        bytes: weights + (m * 2 * k * 4) as f64,
        in_step: None,
    });
    let (nh, nkv, hd) = heads;
    if n == (nh + 2 * nkv) * hd {
        // Row r to slot r, at position 0: a step's writes (two rows to one slot would race).
        let block = 16;
        let slot_of: Vec<i32> = (0..m as i32).collect();
        let (positions, slots) = (e.zeros::<u32>(m)?, e.upload(&slot_of)?);
        let cache = m.div_ceil(block) * block * nkv * hd;
        let (mut kc, mut vc) = (e.zeros(cache)?, e.zeros(cache)?);
        let secs = time(e, iters, || {
            let rope = RopeKv {
                positions: &positions,
                slots: &slots,
                k_cache: &mut kc,
                v_cache: &mut vc,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                block_size: block,
                base: 10_000.0,
            };
            let normed = input::<E>(&x, &delta, &norm, &mut x_out);
            gemv_rope(e, normed, Weights::F16(w, 0), &mut y, m, k, rope)
        })?;
        rows.push(Row {
            name: format!("gemv_f16_norm_rope {name} {m}×{k}·{k}×{n}"),
            secs,
            bytes: weights + (3 * m * k * 4 + m * 2 * nkv * hd * 2) as f64,
            in_step: None,
        });
    }
    Ok(rows)
}
