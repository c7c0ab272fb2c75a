//! Tests of the K-quant and IQ4 layouts: quantizers round trip, conversion keeps the
//! file's values (or stays within half a Q8_0 step), the packed form keeps what the
//! blocks round.

use super::quantize::pack_scale_mins;
use super::*;
use crate::matmul::{MatData, Matrix};
use crate::quant;

/// The layouts of uniform levels (a step and an offset per block or sub-block).
const TYPES: [GgmlType; 7] = [
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];
/// The layouts of 16 non-uniform levels.
const IQ4: [GgmlType; 2] = [GgmlType::IQ4_NL, GgmlType::IQ4_XS];

/// Weights-like values: mostly small, a few outliers, some rows all of one sign.
fn row(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let shift = if (i / 256) % 3 == 2 { 0.6 } else { 0.0 };
            if i % 97 == 0 {
                4.0 * u
            } else {
                0.05 * u + shift * 0.05
            }
        })
        .collect()
}

fn dequant(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n];
    quant::dequantize_row(ty, b, &mut y);
    y
}

/// Each element's quantization step in a row of `ty` blocks.
fn steps(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for b in b.chunks_exact(ty.block_bytes()) {
        match ty {
            GgmlType::Q5_0 | GgmlType::Q5_1 => out.extend([q5_block(ty, b).1; QK]),
            GgmlType::Q4_K | GgmlType::Q5_K => {
                (0..8).for_each(|j| out.extend([k_sub_block(ty, b, j).1; QK]))
            }
            GgmlType::Q2_K => {
                (0..16).for_each(|i| out.extend([h(b, 80) * (b[i] & 0xF) as f32; 16]))
            }
            GgmlType::Q3_K => q3_scales(b)
                .iter()
                .for_each(|&s| out.extend([h(b, 108) * s as f32; 16])),
            _ => (0..16).for_each(|i| out.extend([h(b, 208) * (b[192 + i] as i8) as f32; 16])),
        }
    }
    out
}

#[test]
fn quantizers_round_trip_to_the_nearest_level() {
    for ty in TYPES {
        let x = row(4 * QK_K, ty.id() as u64);
        let mut b = Vec::new();
        quantize_row(ty, &x, &mut b);
        assert_eq!(
            b.len(),
            x.len() / ty.block_elems() * ty.block_bytes(),
            "{ty:?}"
        );
        let y = dequant(ty, &b, x.len());
        // Within half a step of each element's scale (Q5_0, Q3_K: a step, as ggml's:
        // the value of largest magnitude maps to −16 (−4), its opposite may clamp at
        // 15 (3)), so nothing was clamped and the levels are the nearest.
        let half = match ty {
            GgmlType::Q5_0 | GgmlType::Q3_K => 1.0,
            _ => 0.52,
        };
        let mut err = 0f64;
        for (i, ((a, b), step)) in x.iter().zip(&y).zip(steps(ty, &b)).enumerate() {
            assert!(
                (a - b).abs() <= half * step.abs() + 1e-7,
                "{ty:?} element {i}: {a} became {b} (step {step})"
            );
            err += ((a - b) as f64).powi(2);
        }
        let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / err).sqrt();
        // Four levels a 16 (Q2_K) hold these rows' outliers less well.
        let floor = if ty == GgmlType::Q2_K { 2.0 } else { 5.0 };
        assert!(rms > floor, "{ty:?}: signal / error {rms}");
    }
}

#[test]
fn iq4_quantizers_pick_the_nearest_level() {
    for ty in IQ4 {
        let x = row(4 * QK_K, ty.id() as u64);
        let mut b = Vec::new();
        quantize_row(ty, &x, &mut b);
        assert_eq!(b.len(), x.len() / ty.block_elems() * ty.block_bytes());
        let y = dequant(ty, &b, x.len());
        // Each 32's step: the block's `d` (IQ4_NL) or the sub-block's `d·(ls − 32)`.
        let steps: Vec<f32> = b
            .chunks_exact(ty.block_bytes())
            .flat_map(|b| match ty {
                GgmlType::IQ4_NL => vec![h(b, 0)],
                _ => (0..8).map(|j| iq4_xs_sub_block(b, j).1).collect(),
            })
            .collect();
        let mut err = 0f64;
        for (i, (&a, &v)) in x.iter().zip(&y).enumerate() {
            let step = steps[i / QK];
            let best = IQ4_LEVELS
                .iter()
                .map(|&l| (a - step * l as f32).abs())
                .fold(f32::MAX, f32::min);
            assert!(
                (a - v).abs() <= best + 1e-7,
                "{ty:?} element {i}: {a} became {v}, a level {best} away exists"
            );
            err += ((a - v) as f64).powi(2);
        }
        let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / err).sqrt();
        assert!(rms > 5.0, "{ty:?}: signal / error {rms}");
    }
}

#[test]
fn conversion_keeps_values_or_stays_within_half_a_q8_step() {
    for ty in TYPES.into_iter().chain(IQ4) {
        let x = row(8 * QK_K, 100 + ty.id() as u64);
        let mut b = Vec::new();
        quantize_row(ty, &x, &mut b);
        let want = dequant(ty, &b, x.len());
        let c = to_kernel_layout(ty, &b);
        assert_eq!(
            (c.ty, c.data.len()),
            (kernel_layout(ty).0, x.len() / QK * c.ty.block_bytes())
        );
        assert_eq!(c.offsets.as_ref().map(|o| o.run), offset_run(ty), "{ty:?}");
        // As the model holds it: the kernels' blocks and the offsets beside them.
        let mut m = Matrix::new(1, x.len(), MatData::Quant(c.ty, c.data));
        if let Some(o) = c.offsets {
            m = m.with_offsets(o);
        }
        let mut got = vec![0f32; x.len()];
        m.row_f32(0, &mut got);
        for (k, (w, g)) in want.chunks(QK).zip(got.chunks(QK)).enumerate() {
            let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let tol = match ty {
                // f16 rounding of the sub-block's scale (and Q4_K's offset).
                GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::IQ4_XS => amax * 2.0f32.powi(-10),
                GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q2_K => 0.0,
                GgmlType::Q3_K | GgmlType::IQ4_NL => 0.0,
                // Half a Q8_0 step (of the f16 scale, up to 2⁻¹¹ above amax / 127).
                _ => amax / 127.0 * 0.501,
            };
            for (a, b) in w.iter().zip(g) {
                assert!((a - b).abs() <= tol, "{ty:?} block {k}: {a} became {b}");
            }
        }
    }
}

/// As the model loads them: the kernel blocks, the exact packed form, the offsets.
fn loaded(ty: GgmlType, rows: usize, cols: usize, b: &[u8]) -> (Matrix, bool) {
    let c = to_kernel_layout(ty, b);
    let pk = exact_packed(ty, rows, cols, b, &c);
    let exact = pk.is_some();
    let mut m = Matrix::new(rows, cols, MatData::Quant(c.ty, c.data));
    if let Some(pk) = pk {
        m = m.with_exact_packed(pk);
    }
    if let Some(o) = c.offsets {
        m = m.with_offsets(o);
    }
    (m, exact)
}

#[test]
fn rounded_and_per_16_scales_pack_with_their_own_values_where_the_packed_kernels_run() {
    let (rows, cols) = (32, 2 * QK_K);
    for ty in [
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::IQ4_XS,
        GgmlType::Q6_K,
    ] {
        let x = row(rows * cols, 61 + ty.id() as u64);
        let mut b = Vec::new();
        quantize_row(ty, &x, &mut b);
        let want = dequant(ty, &b, x.len());
        let (m, exact) = loaded(ty, rows, cols, &b);
        assert_eq!(exact, crate::packed::available(), "{ty:?}");
        assert_eq!(fidelity(ty, rows) == Fidelity::Exact, exact, "{ty:?}");
        // Rows not in groups of 16 keep their conversion.
        let part = &b[..b.len() / 4 * 3];
        assert!(exact_packed(ty, 24, cols, part, &to_kernel_layout(ty, part)).is_none());
        if !exact {
            eprintln!("no packed kernels here: {ty:?} keeps its conversion");
            continue;
        }
        let mut got = vec![0f32; cols];
        for n in 0..rows {
            m.row_f32(n, &mut got);
            assert_eq!(got[..], want[n * cols..(n + 1) * cols], "{ty:?} row {n}");
        }
        // The products: within the 16-bit activations' rounding (1/65534 of a block's
        // largest, against Σ|x|·the row's largest |w|: the Q4_K mins cancel much of
        // `d·sc·q`) of the file's values.
        let mut acts = crate::matmul::Acts::default();
        acts.resize(1, cols);
        acts.row_mut(0).copy_from_slice(&row(cols, 5));
        let mut out = vec![0f32; rows];
        crate::matmul::matmul(&m, &mut acts, &mut out, crate::matmul::ActPrecision::I16);
        let x: Vec<f64> = acts.row(0).iter().map(|&v| v as f64).collect();
        for (n, &o) in out.iter().enumerate() {
            let w = &want[n * cols..(n + 1) * cols];
            let exp: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * b).sum();
            let wmax = w.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
            let size = wmax * x.iter().map(|v| v.abs()).sum::<f64>();
            assert!(
                (o as f64 - exp).abs() <= 4e-5 * size,
                "{ty:?} row {n}: {o} vs {exp}"
            );
        }
    }
    // Other layouts keep theirs.
    let mut b = Vec::new();
    quantize_row(GgmlType::Q3_K, &row(16 * QK_K, 3), &mut b);
    let c = to_kernel_layout(GgmlType::Q3_K, &b);
    assert!(exact_packed(GgmlType::Q3_K, 16, QK_K, &b, &c).is_none());
}

#[test]
fn q3_k_products_of_128_are_held_under_a_negated_scale() {
    // As ggml's, the quantizer gives the largest 16 scale −32 and its largest value
    // −4: the product 128 is no i8, −128 is.
    let x = row(8 * QK_K, 7);
    let mut b = Vec::new();
    quantize_row(GgmlType::Q3_K, &x, &mut b);
    let c = to_kernel_layout(GgmlType::Q3_K, &b).data;
    let flipped: Vec<&[u8]> = c
        .chunks_exact(34)
        .filter(|o| h(o, 0) < 0.0 && o[2..].contains(&0x80))
        .collect();
    assert!(!flipped.is_empty(), "no block held a product of 128");
    assert_eq!(
        dequant(GgmlType::Q8_0, &c, x.len()),
        dequant(GgmlType::Q3_K, &b, x.len())
    );
}

#[test]
fn q5_0_whose_quarter_scale_is_not_an_f16_keeps_its_values() {
    // d = 3·2⁻²⁴ (an f16 subnormal): neither d/4 nor d/2 is an f16, so d itself;
    // d = 6·2⁻²⁴: d/2 is.
    for (bits, k) in [(3u16, 1i32), (6, 2), (0x3c00, 4)] {
        let d = f16::from_bits(bits);
        let mut b = d.to_le_bytes().to_vec();
        b.extend_from_slice(&0xFFFF_0000u32.to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let want = dequant(GgmlType::Q5_0, &b, QK);
        let Converted {
            ty: to, data: c, ..
        } = to_kernel_layout(GgmlType::Q5_0, &b);
        assert_eq!(to, GgmlType::Q8_0);
        let got = dequant(GgmlType::Q8_0, &c, QK);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "d bits {bits}: {got:?} against {want:?}"
        );
        assert_eq!(
            f16::from_le_bytes([c[0], c[1]]).to_f32() * k as f32,
            d.to_f32()
        );
    }
}

#[test]
fn scales_and_mins_pack_as_ggml_reads_them() {
    // Every 6-bit pair packed comes back through scale_min.
    for base in [0u8, 17, 40, 63] {
        let ls: [u8; 8] = std::array::from_fn(|j| (base + 7 * j as u8) % 64);
        let lm: [u8; 8] = std::array::from_fn(|j| (base + 11 * j as u8 + 5) % 64);
        let packed = pack_scale_mins(&ls, &lm);
        for j in 0..8 {
            assert_eq!(scale_min(j, &packed), (ls[j], lm[j]), "sub-block {j}");
        }
    }
}
