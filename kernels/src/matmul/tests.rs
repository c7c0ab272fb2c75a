//! Tests of the products against the f32 reference, every layout and precision.

use super::*;
use crate::testutil::rand;

fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Matrix {
    let w = rand(rows * cols, seed);
    let mut data = Vec::new();
    match ty {
        GgmlType::Q4_0 => quant::quantize_row_q4_0(&w, &mut data),
        GgmlType::Q4_1 => quant::quantize_row_q4_1(&w, &mut data),
        _ => {
            quant::quantize_row_q8_0(&w, &mut data);
            crate::testutil::with_q8_0_minimum(&mut data);
        }
    }
    Matrix::new(rows, cols, MatData::Quant(ty, data))
}

fn acts(rows: usize, cols: usize, seed: u64) -> Acts {
    let mut x = Acts::default();
    x.resize(rows, cols);
    x.f32.copy_from_slice(&rand(rows * cols, seed));
    x
}

/// `w` with offsets of `run` (what Q5_1, Q5_K and Q2_K are converted to).
fn offset(w: Matrix, run: Option<usize>, seed: u64) -> Matrix {
    match run {
        Some(run) => {
            let values = rand(w.rows * w.cols / run, seed);
            w.with_offsets(Offsets { run, values })
        }
        None => w,
    }
}

/// `w · x` at `prec`, each output within `tol` of Σ|w·x| (+ 1e-6) of the reference's
/// (`what` names the case): the outputs, and the largest error relative to Σ|w·x|.
fn near_reference(
    w: &Matrix,
    x: &mut Acts,
    prec: ActPrecision,
    tol: f32,
    what: &str,
) -> (Vec<f32>, f32) {
    let (b, rows) = (x.rows, w.rows);
    let mut out = vec![0f32; b * rows];
    matmul(w, x, &mut out, prec);
    let mut want = vec![0f32; b * rows];
    matmul_reference(w, x, &mut want);
    let mut row = vec![0f32; w.cols];
    let mut worst = 0f32;
    for n in 0..rows {
        w.row_f32(n, &mut row);
        for r in 0..b {
            let size: f32 = row.iter().zip(x.row(r)).map(|(p, q)| (p * q).abs()).sum();
            let (got, exp) = (out[r * rows + n], want[r * rows + n]);
            worst = worst.max((got - exp).abs() / size);
            assert!(
                (got - exp).abs() <= tol * size + 1e-6,
                "{what} ({r},{n}): {got} vs {exp}"
            );
        }
    }
    (out, worst)
}

/// Every precision, weight type and layout (48 and 640 rows pack — 640 in calls over
/// several groups — 40 do not), with and without offsets, at batch sizes that use every
/// tile: close to the f32 product of the dequantized weights, and a row's result the
/// same alone as in any batch.
#[test]
fn every_path_is_close_to_the_reference_and_independent_of_its_batch() {
    let cols = 96;
    let cases = [
        (GgmlType::Q4_0, None),
        (GgmlType::Q4_1, None),
        (GgmlType::Q8_0, None),
        (GgmlType::Q8_0, Some(16)),
        (GgmlType::Q8_0, Some(32)),
    ];
    for (ty, run) in cases {
        for rows in [48, 640, 40] {
            let w = offset(matrix(ty, rows, cols, 5), run, 6);
            for prec in [ActPrecision::I16, ActPrecision::Q8, ActPrecision::F32] {
                // Relative to Σ|w·x|: 8-bit activations err by up to 1/254 of a block's
                // largest value, 16-bit ones by 1/65534 (bounds about 8 standard
                // deviations of the summed rounding errors; a wrong kernel is off by
                // the whole size).
                let tol = match prec {
                    ActPrecision::Q8 => 4e-3,
                    ActPrecision::I16 => 4e-5,
                    ActPrecision::F32 => 1e-6,
                };
                for b in [1usize, 5, 13, 30, 35, 50] {
                    let mut x = acts(b, cols, 9);
                    let what = format!("{ty:?} {run:?} {rows}×{cols} {prec:?} b={b}");
                    let (out, _) = near_reference(&w, &mut x, prec, tol, &what);
                    // Each row alone gives the same bits as in the batch.
                    for r in [0, b - 1] {
                        let mut one = acts(1, cols, 0);
                        one.f32.copy_from_slice(x.row(r));
                        let mut o1 = vec![0f32; rows];
                        matmul(&w, &mut one, &mut o1, prec);
                        assert_eq!(
                            o1[..],
                            out[r * rows..(r + 1) * rows],
                            "{ty:?} {rows} rows {prec:?}: row {r} of {b}"
                        );
                    }
                }
            }
        }
    }
}

/// Weights with a scale per 16 (Q6_K's), which only the packed form holds, beside
/// them requantized to Q8_0 ([`Matrix::with_exact_packed`]).
fn exact16(rows: usize, cols: usize, seed: u64) -> Matrix {
    let (values, scales) = crate::testutil::runs16_weights(rows * cols, seed, 0.05);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| values[i] as f32 * scales[i / 16])
        .collect();
    let mut data = Vec::new();
    quant::quantize_row_q8_0(&w, &mut data);
    let pk = Packed::from_i8_runs16(rows, cols, &values, &scales).expect("packs");
    Matrix::new(rows, cols, MatData::Quant(GgmlType::Q8_0, data)).with_exact_packed(pk)
}

/// A scale per 16: the 16- and 8-bit products are as close to the weights' own
/// product as any packed kernel's, with or without offsets, and independent of the
/// batch; f32 activations meet the requantized Q8_0 (within its half step).
#[test]
fn weights_with_a_scale_per_16_give_their_own_product() {
    let cols = 96;
    for run in [None, Some(16), Some(32)] {
        for rows in [48, 640] {
            let w = offset(exact16(rows, cols, 5), run, 6);
            for prec in [ActPrecision::I16, ActPrecision::Q8, ActPrecision::F32] {
                let tol = match prec {
                    // 8-bit weights meet 16-bit activations at either.
                    ActPrecision::Q8 | ActPrecision::I16 => 4e-5,
                    // Half a Q8_0 step of a block's largest, against Σ|w·x|.
                    ActPrecision::F32 => 2e-2,
                };
                for b in [1usize, 13] {
                    let mut x = acts(b, cols, 9);
                    let what = format!("{run:?} {rows} {prec:?} b={b}");
                    let (out, worst) = near_reference(&w, &mut x, prec, tol, &what);
                    if prec == ActPrecision::F32 {
                        // The requantized copy is not the weights: the kernels' path is.
                        assert!(worst > 1e-5, "f32 activations read the Q8_0 copy");
                    }
                    let mut one = acts(1, cols, 0);
                    one.f32.copy_from_slice(x.row(b - 1));
                    let mut o1 = vec![0f32; rows];
                    matmul(&w, &mut one, &mut o1, prec);
                    assert_eq!(o1[..], out[(b - 1) * rows..], "{prec:?}: alone as in {b}");
                }
            }
        }
    }
}

/// `stacked`'s product is each of `parts`' (as many rows, in order) but for rounding,
/// at every precision.
fn assert_stack_gives_each_parts_product(stacked: &Matrix, parts: &[Matrix], b: usize) {
    let cols = stacked.cols;
    for prec in [ActPrecision::I16, ActPrecision::Q8, ActPrecision::F32] {
        let mut x = acts(b, cols, 9);
        let mut all = vec![0f32; b * stacked.rows];
        matmul(stacked, &mut x, &mut all, prec);
        let mut at = 0;
        for p in parts {
            let mut one = vec![0f32; b * p.rows];
            matmul(p, &mut x, &mut one, prec);
            for r in 0..b {
                let got = &all[r * stacked.rows + at..r * stacked.rows + at + p.rows];
                for (g, w) in got.iter().zip(&one[r * p.rows..(r + 1) * p.rows]) {
                    assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{prec:?} row {r}");
                }
            }
            at += p.rows;
        }
    }
}

/// A Q4_1 matrix whose packed form has f32 scales and mins other than its blocks'
/// f16 ones (a K-quant's exact sub-block scales).
fn exact_q4_1(rows: usize, cols: usize, seed: u64) -> Matrix {
    let m = matrix(GgmlType::Q4_1, rows, cols, seed);
    let MatData::Quant(_, data) = &m.data else {
        unreachable!()
    };
    let nb = rows * cols / QK;
    let scales: Vec<f32> = rand(nb, seed + 1).iter().map(|v| v * 0.03).collect();
    let mins: Vec<f32> = rand(nb, seed + 2).iter().map(|v| v * 0.2).collect();
    let pk = Packed::new(GgmlType::Q4_1, rows, cols, data)
        .expect("packs")
        .with_exact_scales(&scales, &mins);
    m.with_exact_packed(pk)
}

/// Parts whose packed form holds their values stack beside plain ones of their
/// type (8-bit: a scale per 16 beside blocks' scales taken twice; 4-bit: f32 scales
/// beside the blocks'): each part's rows and products as alone. Not with offsets, nor
/// beside rows not in groups of 16.
#[test]
fn parts_packed_with_their_own_values_stack_beside_plain_ones() {
    let cols = 64;
    let eights = || {
        vec![
            matrix(GgmlType::Q8_0, 48, cols, 5),
            exact16(32, cols, 7),
            matrix(GgmlType::Q8_0, 16, cols, 3),
        ]
    };
    let fours = || vec![exact_q4_1(32, cols, 8), matrix(GgmlType::Q4_1, 16, cols, 9)];
    for parts in [&eights as &dyn Fn() -> Vec<Matrix>, &fours] {
        let Ok(stacked) = Matrix::stack(parts()) else {
            panic!("parts of one type stack");
        };
        assert!(stacked.packed_exact);
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        let mut at = 0;
        for p in parts() {
            for n in 0..p.rows {
                p.row_f32(n, &mut a);
                stacked.row_f32(at + n, &mut b);
                assert_eq!(a, b, "row {n} of a part of {}", p.rows);
            }
            at += p.rows;
        }
        // Equal but for rounding: a block's scale taken for each 16 adds its two
        // halves' sums one after the other.
        assert_stack_gives_each_parts_product(&stacked, &parts(), 5);
    }
    let odd = vec![matrix(GgmlType::Q8_0, 40, cols, 1), exact16(16, cols, 2)];
    assert!(Matrix::stack(odd).is_err(), "rows not in groups of 16");
    let offsets = vec![
        offset(matrix(GgmlType::Q8_0, 32, cols, 1), Some(32), 2),
        exact16(16, cols, 2),
    ];
    assert!(
        Matrix::stack(offsets).is_err(),
        "offsets beside exact values"
    );
}

/// Stacked matrices (QKV, gate|up) give each part's product, offsets and all: a part
/// with offsets of 32, one of 16 and one without.
#[test]
fn stacked_parts_with_offsets_give_each_parts_product() {
    let cols = 64;
    let parts = || {
        vec![
            offset(matrix(GgmlType::Q8_0, 32, cols, 1), Some(32), 2),
            offset(matrix(GgmlType::Q8_0, 16, cols, 3), Some(16), 4),
            matrix(GgmlType::Q8_0, 48, cols, 5),
        ]
    };
    let Ok(stacked) = Matrix::stack(parts()) else {
        panic!("Q8_0 parts stack");
    };
    assert_eq!(stacked.offsets().map(|o| o.run), Some(16));
    // Equal but for rounding: offsets of 32 are added as two of 16 once stacked beside
    // a part of 16.
    assert_stack_gives_each_parts_product(&stacked, &parts(), 3);
}
