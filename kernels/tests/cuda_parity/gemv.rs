//! The small products (`gemv_*`) against the product's twin and the exact product of the
//! file's values: f16 rows, every quantized layout, launches short of shared memory.

use super::*;

#[test]
fn gemv_matches_the_product_twin() {
    on_each!(gemv_case);
}

/// `gemv_f16` against the product's twin (cuBLAS's arithmetic: f16 inputs, f32 sums) for
/// 1 to 16 rows, with a weight offset, a column count that is no multiple of 16, and a
/// poisoned output; rows too wide for the shared memory, or no multiple of 32, refused.
fn gemv_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{fits, gemv, shared_bytes, Staged, MAX_ROWS};
    let mut rng = Rng(9);
    let max_shared = g.max_shared_bytes().unwrap();
    // SmolLM2's width, and rows of several batches of blocks a warp (a 7B model's 4,096).
    for (k, n, row0) in [(576, 1003, 5), (2048, 77, 3), (4096, 37, 1)] {
        let w: Vec<f16> = rng
            .vec((n + row0) * k, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let wd = up(g, &w);
        for m in (1..=MAX_ROWS).filter(|&m| fits(m, k, max_shared, Staged::Sums)) {
            let x: Vec<f16> = rng.vec(m * k, 1.0).into_iter().map(f16::from_f32).collect();
            let want = twins::gemm(&x, &w[row0 * k..], m, k, n);
            let xd = up(g, &x);
            let mut y = up(g, &vec![f32::NAN; m * n]);
            gemv(g, &xd, &wd, row0, &mut y, m, k, n).unwrap();
            let e = rel(&down(g, &y), &want);
            assert!(e < 1e-5, "{}: {m} rows of {k}: {e}", g.describe());
        }
        let over = MAX_ROWS + 1;
        let (xd, mut y) = (
            up(g, &vec![f16::ZERO; over * k]),
            up(g, &vec![0f32; over * n]),
        );
        assert!(gemv(g, &xd, &wd, 0, &mut y, over, k, n).is_err(), "17 rows");
    }
    // The widest row whose staging fits whole, then one block wider; and k no multiple of
    // 32.
    let widest = (1..)
        .map(|b| 32 * b)
        .take_while(|&k| shared_bytes(1, k, Staged::Sums) <= max_shared)
        .last();
    let widest = widest.expect("some row fits");
    assert!(
        fits(1, widest, max_shared, Staged::Sums)
            && !fits(1, widest + 32, max_shared, Staged::Sums)
    );
    // Past it, the row is read in runs of its columns (two here), up to MAX_RUNS of them.
    let too_wide = (widest + 32) * kernels::cuda::gemv::MAX_RUNS;
    let (xd, wd) = (
        up(g, &vec![f16::ONE; too_wide]),
        up(g, &vec![f16::ONE; too_wide]),
    );
    let mut y = up(g, &[f32::NAN; 1]);
    for k in [widest, widest + 32] {
        gemv(g, &xd, &wd, 0, &mut y, 1, k, 1).unwrap();
        assert_eq!(down(g, &y), [k as f32], "a row of {k}");
    }
    for (k, what) in [
        (too_wide, "a row past the most runs of the shared memory"),
        (96 + 8, "k no multiple of 32"),
    ] {
        assert!(gemv(g, &xd, &wd, 0, &mut y, 1, k, 1).is_err(), "{what}");
    }
}

/// A `gemv` launch that gives its blocks less dynamic shared memory than the staged rows
/// take traps rather than writing past it (on the emulator only: a trap spoils a GPU's
/// context for the rest of the process).
#[test]
fn a_gemv_launch_short_of_shared_memory_traps() {
    use kernels::cuda::gemv::{shared_bytes, Staged};
    let Some(g) = emu() else { return };
    let (m, k, n) = (3, 576, 32);
    let (x, w) = (
        up(&g, &vec![f16::ONE; m * k]),
        up(&g, &vec![f16::ONE; n * k]),
    );
    let y = up(&g, &vec![f32::NAN; m * n]);
    let args = [
        x.arg(),
        w.arg(),
        y.arg(),
        i(m),
        i(k),
        i(n),
        i(n),
        i(0),
        i(0),
        i(k),
    ];
    for (bytes, ok) in [
        (shared_bytes(m, k, Staged::Sums), true),
        (shared_bytes(m, k, Staged::Sums) - 16, false),
    ] {
        let launch = LaunchConfig {
            shared_mem_bytes: bytes as u32,
            ..cfg(2, 256)
        };
        let r = g.launch("gemv_f16", launch, &args);
        assert_eq!(r.is_ok(), ok, "{bytes} bytes: {r:?}");
    }
    assert!(
        down(&g, &y).iter().all(|&v| v == k as f32),
        "the launch that fit"
    );
}

#[test]
fn quantized_gemv_matches_the_product_of_the_files_values() {
    on_each!(gemv_quant_case);
}

/// The file's blocks in `ty` of `n × k` random weights, and the values they dequantize to.
/// `x · wᵀ` for `m` rows of `k` (f16 inputs, f32 weights `n × k`), summed in f64.
pub(crate) fn exact_product(x: &[f16], w: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    (0..m * n)
        .map(|e| {
            let (r, j) = (e / n, e % n);
            (0..k)
                .map(|i| x[r * k + i].to_f64() * w[j * k + i] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

pub(crate) fn quant_weights(
    rng: &mut Rng,
    ty: GgmlType,
    n: usize,
    k: usize,
) -> (Vec<u8>, Vec<f32>) {
    let w = rng.vec(n * k, 1.0);
    let mut blocks = Vec::new();
    match ty {
        GgmlType::Q4_0 => kernels::quant::quantize_row_q4_0(&w, &mut blocks),
        GgmlType::Q4_1 => kernels::quant::quantize_row_q4_1(&w, &mut blocks),
        GgmlType::Q8_0 => kernels::quant::quantize_row_q8_0(&w, &mut blocks),
        ty => kernels::kquant::quantize_row(ty, &w, &mut blocks),
    }
    let mut values = vec![0f32; n * k];
    kernels::quant::dequantize_row(ty, &blocks, &mut values);
    (blocks, values)
}

/// `gemv_q4` / `gemv_q8` over the file's own Q4_0, Q4_1 and Q8_0 blocks for 1 to 16 rows,
/// and over Q4_K, Q5_K, IQ4_XS and Q6_K (f32 or factored scales, a scale per 16: `gemv_q4f32`
/// and `gemv_q4f`, `gemv_q8f` and `gemv_q8f32`, Q6_K's integers at 6 bits, `gemv_q6h`, and
/// at 8, `gemv_q8h32`; IQ4_XS's
/// levels from 4-bit indices, `gemv_iq4f`, and as 8-bit integers, `gemv_q8f32`; Q5_K's
/// integers at 5 bits, `gemv_q5f`, and at 8, `gemv_q8f32`), IQ4_NL's levels (`gemv_iq4`),
/// Q3_K's integers at 4 bits under their scales per 16 (`gemv_q4h`; and as the CPU's
/// Q8_0 blocks, `gemv_q8s`), Q2_K's at 2 bits under their scales and offsets per 16
/// (`gemv_q2h`),
/// `gemv_q5` over Q5_1 (offsets), against the product of the values the file's blocks
/// dequantize to (f16 inputs, sums in f64):
/// SmolLM2's widths and wider rows (4,096: three batches a warp), column counts that are no
/// multiple of the block's warps, a poisoned output; and the launches refused.
fn gemv_quant_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{
        fits, gemv_from, Input, QuantBuf, QuantRows, Scales, Weights, MAX_ROWS,
    };
    let mut rng = Rng(17);
    // The K-quant layouts (factored scales, Q6_K's per 16: `gemv_q4f`, `gemv_q5f`,
    // `gemv_q6h`) and Q5_1's offsets, as a model holds them where the CPU has packed kernels.
    let k_quants: &[(GgmlType, usize, usize)] = if kernels::packed::available() {
        &[
            (GgmlType::Q4_K, 1536, 80),
            (GgmlType::Q5_K, 512, 800),
            (GgmlType::IQ4_XS, 1024, 96),
            (GgmlType::Q6_K, 1024, 400),
            (GgmlType::Q5_1, 576, 32),
        ]
    } else {
        println!("skipped the K-quant layouts: this CPU has no packed kernels to make them");
        &[]
    };
    let cases = [
        (GgmlType::Q4_1, 576, 1003),
        (GgmlType::Q4_0, 1536, 77),
        (GgmlType::Q8_0, 576, 259),
        (GgmlType::Q8_0, 2048, 33),
        (GgmlType::Q4_1, 4096, 41),
        (GgmlType::IQ4_NL, 576, 50),
        (GgmlType::Q5_0, 576, 48),
        (GgmlType::Q3_K, 1024, 48),
        (GgmlType::Q2_K, 768, 40),
    ];
    for &(ty, k, n) in cases.iter().chain(k_quants) {
        let (blocks, w) = quant_weights(&mut rng, ty, n, k);
        // As the backend takes a matrix: its file blocks as the CPU holds them (IQ4_NL's
        // as Q8_0), else its packed form, else its blocks and offsets per 16 (Q2_K's).
        let m = kernels::model::matrix_of(ty, n, k, &blocks);
        let rows = match (m.file_blocks(), m.packed_values(), m.blocks_with_offsets()) {
            (Some((held, data)), ..) => QuantRows::from_blocks(held, data, n, k),
            (None, Some(p), _) => QuantRows::from_packed(p),
            (None, None, Some((held, data, o))) => QuantRows::from_offsets(held, data, &o, n, k),
            _ => panic!("{ty:?}: no blocks the kernels read"),
        };
        let rows = rows.expect("a kernel layout");
        let wq = &[QuantBuf::upload(g, &rows).unwrap()];
        let want_kind = match ty {
            GgmlType::Q4_K => "q4f",
            GgmlType::Q5_K => "q5f",
            GgmlType::IQ4_XS => "iq4f",
            GgmlType::IQ4_NL => "iq4s",
            GgmlType::Q6_K => "q6h",
            GgmlType::Q5_1 => "q5",
            GgmlType::Q5_0 => "q5s",
            GgmlType::Q8_0 => "q8s",
            GgmlType::Q4_0 => "q4s",
            GgmlType::Q3_K => "q4h",
            GgmlType::Q2_K => "q2h",
            _ => "q4",
        };
        assert_eq!(wq[0].kind(), Some(want_kind), "{ty:?}");
        // The K-quants' scales the other way too (as f32 pairs, `gemv_q4f32`,
        // `gemv_q8f32`, `gemv_q8h32`: each kept to be timed against the factored); the
        // file blocks' scales alone as f16 pairs too (`gemv_q4`, `gemv_q8`, `gemv_iq4`,
        // `gemv_q5`).
        let other = match rows.scales {
            Scales::F16Pairs | Scales::F32Pairs | Scales::F32Halves | Scales::FactoredHalfPairs => {
                None
            }
            // Q3_K's integers at 4 bits under their scales per 16, and as the CPU's Q8_0
            // blocks of `sc · q` (`gemv_q8s`).
            Scales::FactoredHalves if ty == GgmlType::Q3_K => {
                Some((Scales::F16Scales, "q8s".to_string()))
            }
            Scales::F16Scales => Some((
                Scales::F16Pairs,
                want_kind.trim_end_matches('s').to_string(),
            )),
            Scales::Factored | Scales::FactoredHalves => Some((
                Scales::F32Pairs,
                match (rows.bits, rows.scales) {
                    (_, Scales::FactoredHalves) => "q8h32",
                    (4, _) if !rows.iq4 => "q4f32",
                    _ => "q8f32", // IQ4_XS's levels, Q5_K's integers at 8 bits
                }
                .to_string(),
            )),
        };
        let other_form = other.map(|(scales, kind)| {
            let m = kernels::model::matrix_of(ty, n, k, &blocks);
            let r = match m.file_blocks() {
                Some((held, data)) => QuantRows::from_blocks_as(held, data, n, k, scales),
                None => QuantRows::from_packed_as(m.packed_values().unwrap(), scales),
            };
            let r = r.expect("the other scales");
            let b = [QuantBuf::upload(g, &r).unwrap()];
            assert_eq!(b[0].kind(), Some(kind.as_str()), "{ty:?}");
            b
        });
        let staged = rows.scales.staged();
        for m in (1..=MAX_ROWS).filter(|&m| fits(m, k, g.max_shared_bytes().unwrap(), staged)) {
            let x: Vec<f16> = rng.vec(m * k, 1.0).into_iter().map(f16::from_f32).collect();
            let want = exact_product(&x, &w, (m, k, n));
            let xd = up(g, &x);
            let mut got = Vec::new();
            for wq in std::iter::once(wq).chain(other_form.as_ref()) {
                let mut y = up(g, &vec![f32::NAN; m * n]);
                gemv_from(g, Input::Rows(&xd), Weights::Quant(wq), &mut y, m, k, n).unwrap();
                let y = down(g, &y);
                let e = rel(&y, &want);
                assert!(e < 1e-5, "{}: {ty:?}, {m} rows of {k}: {e}", g.describe());
                got.push(y);
            }
            // The same scales, the same sums in the same order: the same bits (but for
            // Q5_0's, whose pairs take `q` and the offset `−16d` where its scale alone
            // takes `q − 16`, and Q3_K's, summed a 16 at a time or a 32: other sums, within
            // the same bound).
            if let ([a, b], false) = (&got[..], matches!(ty, GgmlType::Q5_0 | GgmlType::Q3_K)) {
                assert!(
                    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?}, {m} rows"
                );
            }
        }
        let over = MAX_ROWS + 1;
        let (xd, mut y) = (
            up(g, &vec![f16::ZERO; over * k]),
            up(g, &vec![0f32; over * n]),
        );
        assert!(
            gemv_from(g, Input::Rows(&xd), Weights::Quant(wq), &mut y, over, k, n).is_err(),
            "17 rows"
        );
        // Layouts no kernel reads: 7 bits; 2 bits without offsets per 16; 5 bits with a
        // scale per 16.
        for (bits, scales, what) in [
            (7, rows.scales, "7 bits"),
            (2, Scales::FactoredHalves, "2 bits without offsets per 16"),
            (5, Scales::FactoredHalves, "5 bits with a scale per 16"),
        ] {
            let none = [QuantBuf {
                bits,
                scales,
                ..QuantBuf::upload(g, &rows).unwrap()
            }];
            assert!(
                gemv_from(g, Input::Rows(&xd), Weights::Quant(&none), &mut y, 1, k, n).is_err(),
                "{what}"
            );
        }
        assert!(
            gemv_from(g, Input::Rows(&xd), Weights::Quant(wq), &mut y, 1, k, n + 1).is_err(),
            "a column past the weights"
        );
        assert!(
            gemv_from(g, Input::Rows(&xd), Weights::Quant(wq), &mut y, 1, k - 8, n).is_err(),
            "k no multiple of 32"
        );
    }
}
