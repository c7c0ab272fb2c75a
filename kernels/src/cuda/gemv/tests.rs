//! The layouts' tests: every weight [`QuantRows`] holds read back as the kernels read it
//! is the file's value; the layouts' sizes and refusals.

use super::{QuantRows, Scales};
use crate::gguf::GgmlType;
use crate::quant;

/// Each weight read back from the layout as the kernels read it (`d · q + m` in f32,
/// one rounding; `d · (q − c)` under a scale alone) is the value the file's block
/// dequantizes to.
#[test]
fn quantized_rows_hold_the_files_values() {
    let (rows, k) = (3, 96);
    let x: Vec<f32> = (0..rows * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let mut blocks = Vec::new();
        match ty {
            GgmlType::Q4_0 => quant::quantize_row_q4_0(&x, &mut blocks),
            GgmlType::Q4_1 => quant::quantize_row_q4_1(&x, &mut blocks),
            _ => quant::quantize_row_q8_0(&x, &mut blocks),
        }
        let mut want = vec![0f32; rows * k];
        quant::dequantize_row(ty, &blocks, &mut want);
        let r = QuantRows::from_blocks(ty, &blocks, rows, k).expect("a kernel layout");
        // Q4_0's and Q8_0's scales alone (their offsets the kernels' centres': −8d, 0),
        // Q4_1's pairs. Rows padded to a tile of 16.
        let (scales, words) = match ty {
            GgmlType::Q4_1 => (Scales::F16Pairs, 16 * k / 32),
            _ => (Scales::F16Scales, 16 * k / 64),
        };
        assert_eq!(
            (r.scales, r.q.len(), r.s.len()),
            (scales, 16 * k * r.bits as usize / 32, words),
            "{ty:?}"
        );
        for (i, &want) in want.iter().enumerate() {
            // Equal as numbers: Q4_0's `d · (q − 8)` is −0 at `q = 8` under a negative
            // `d`, where the file's arithmetic gives 0.
            assert_eq!(r.weight(i / k, i % k), want, "{ty:?} {i}");
        }
        // A row at a time, the same values.
        let mut row = vec![f32::NAN; k];
        for j in 0..rows {
            r.row_f32(j, &mut row);
            assert_eq!(row, want[j * k..(j + 1) * k], "{ty:?} row {j}");
        }
    }
    // IQ4_NL, Q5_0 and Q3_K, which the CPU holds as Q8_0 blocks (of IQ4's levels; of
    // `4(q − 16)` under `d/4`; of `sc · q`): IQ4's 4-bit indices under the same scales
    // alone (4.5 bits a weight, where the Q8_0 blocks take 8.5), Q5_0's `q` at 5 bits
    // under `d` alone, the kernel taking `q − 16` (5.5 bits), Q3_K's `q` at 4 bits
    // under its scales per 16, factored (4.625).
    for (ty, bits, iq4, scales, per_weight) in [
        (GgmlType::IQ4_NL, 4, true, Scales::F16Scales, 4.5),
        (GgmlType::Q5_0, 5, false, Scales::F16Scales, 5.5),
        (GgmlType::Q3_K, 4, false, Scales::FactoredHalves, 4.625),
    ] {
        let (rows, k) = (16, 512);
        let mut blocks = Vec::new();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 37) % 101) as f32 / 25.0 - 2.0)
            .collect();
        crate::kquant::quantize_row(ty, &x, &mut blocks);
        let mut want = vec![0f32; rows * k];
        quant::dequantize_row(ty, &blocks, &mut want);
        let m = crate::model::matrix_of(ty, rows, k, &blocks);
        let (held, data) = m.file_blocks().expect("Q8_0 blocks");
        assert_eq!(held, GgmlType::Q8_0);
        let r = QuantRows::from_blocks(held, data, rows, k).expect("a kernel layout");
        assert_eq!((r.iq4, r.bits, r.scales), (iq4, bits, scales), "{ty:?}");
        assert_eq!(
            r.bytes() as f64 * 8.0,
            (rows * k) as f64 * per_weight,
            "{ty:?}"
        );
        for (i, &want) in want.iter().enumerate() {
            assert_eq!(r.weight(i / k, i % k), want, "{ty:?} {i}");
        }
    }
    // Q2_K, which the CPU holds as Q8_0 blocks of `sc · q` and offsets `−dmin · m` per
    // 16: its 2-bit `q` under each 16's scale and offset, factored (3.125 bits a
    // weight); the same blocks without their offsets, or offsets of a block each, no
    // such layout.
    {
        let (rows, k) = (24, 768);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 37) % 101) as f32 / 25.0 - 1.5)
            .collect();
        let mut blocks = Vec::new();
        crate::kquant::quantize_row(GgmlType::Q2_K, &x, &mut blocks);
        let mut want = vec![0f32; rows * k];
        quant::dequantize_row(GgmlType::Q2_K, &blocks, &mut want);
        let m = crate::model::matrix_of(GgmlType::Q2_K, rows, k, &blocks);
        assert!(m.file_blocks().is_none() && m.packed_values().is_none());
        let (held, data, offsets) = m.blocks_with_offsets().expect("blocks and offsets");
        let r = QuantRows::from_offsets(held, data, &offsets, rows, k).expect("a layout");
        assert_eq!((r.bits, r.scales), (2, Scales::FactoredHalfPairs));
        // Rows padded to a tile of 16: 32 rows' worth.
        assert_eq!(r.bytes() as f64 * 8.0, (32 * k) as f64 * 3.125);
        for (i, &want) in want.iter().enumerate() {
            assert_eq!(r.weight(i / k, i % k), want, "Q2_K {i}");
        }
        let halves = crate::matmul::Offsets {
            run: 32,
            values: vec![0.0; rows * k / 32],
        };
        assert!(QuantRows::from_offsets(held, data, &halves, rows, k).is_none());
        let q4 = crate::matmul::Offsets {
            run: 16,
            values: offsets.values.clone(),
        };
        let mut q4_0 = Vec::new();
        quant::quantize_row_q4_0(&x, &mut q4_0);
        assert!(QuantRows::from_offsets(GgmlType::Q4_0, &q4_0, &q4, rows, k).is_none());
        // A 16 whose integers are no multiple of 2-bit ones (a Q8_0 file's): none.
        let mut q8 = Vec::new();
        quant::quantize_row_q8_0(&x, &mut q8);
        assert!(QuantRows::from_offsets(GgmlType::Q8_0, &q8, &q4, rows, k).is_none());
    }
    // The K-quant layouts through the packed form, where the CPU makes it, as the
    // backend holds them: factored (Q4_K; Q5_K at 5 bits; Q6_K's scale per 16; IQ4_XS's
    // levels from 4-bit indices); Q5_1's integers at 5 bits and offsets, f16 values, as
    // f16 pairs. What a product reads of them, in bits a weight: factored, the
    // integers' and 5/8 (Q4_K's 4.625 where the file's are 4.5), as f32 pairs 2 more
    // (IQ4_XS's levels and Q5_K's integers then at 8 bits).
    if crate::packed::available() {
        let (rows, k) = (32, 512);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        for (ty, scales, bits) in [
            (GgmlType::Q4_K, Scales::Factored, 4.625),
            (GgmlType::Q5_K, Scales::Factored, 5.625),
            (GgmlType::IQ4_XS, Scales::Factored, 4.625),
            (GgmlType::Q6_K, Scales::FactoredHalves, 6.625),
            (GgmlType::Q5_1, Scales::F16Pairs, 6.0),
        ] {
            let mut blocks = Vec::new();
            crate::kquant::quantize_row(ty, &x, &mut blocks);
            let mut want = vec![0f32; rows * k];
            quant::dequantize_row(ty, &blocks, &mut want);
            let m = crate::model::matrix_of(ty, rows, k, &blocks);
            let r = QuantRows::from_packed(m.packed_values().expect("packed values"))
                .expect("a kernel layout");
            assert_eq!(r.scales, scales, "{ty:?}");
            assert_eq!(r.bytes() as f64 * 8.0 / (rows * k) as f64, bits, "{ty:?}");
            // Both ways: factored, the integers' bits and 5/8; as f32 pairs, 2 more.
            let p = m.packed_values().unwrap();
            let f = QuantRows::from_packed_as(p, Scales::F32Pairs).expect("f32 pairs");
            assert_eq!(f.bytes() * 8, (rows * k) * (f.bits as usize + 2), "{ty:?}");
            assert_eq!((r.iq4, f.iq4), (ty == GgmlType::IQ4_XS, false), "{ty:?}");
            let fac = QuantRows::from_packed_as(p, Scales::Factored);
            if ty != GgmlType::Q5_1 {
                let fac = fac.as_ref().expect("factored");
                assert_eq!(
                    fac.bytes() * 8,
                    (rows * k) * r.bits as usize + rows * k * 5 / 8
                );
            }
            for (i, &want) in want.iter().enumerate() {
                // Equal as numbers (0 · a negative scale is −0 in the file's arithmetic).
                assert_eq!(r.weight(i / k, i % k), want, "{ty:?} {i}");
                assert_eq!(f.weight(i / k, i % k), want, "{ty:?} {i}");
                if let Some(fac) = &fac {
                    assert_eq!(fac.weight(i / k, i % k), want, "{ty:?} {i}");
                }
            }
        }
        // Scales neither f16 values nor factored: as f32 pairs, the last resort.
        let mut blocks = Vec::new();
        quant::quantize_row_q8_0(&x, &mut blocks);
        let odd: Vec<f32> = (0..rows * k / 32).map(|i| 1.0 / (3 + i) as f32).collect();
        let p = crate::packed::Packed::new(GgmlType::Q8_0, rows, k, &blocks)
            .expect("packs")
            .with_exact_scales(&odd, &[]);
        assert!(QuantRows::from_packed_as(&p, Scales::Factored).is_none());
        assert!(QuantRows::from_packed_as(&p, Scales::F16Pairs).is_none());
        let f = QuantRows::from_packed(&p).expect("f32 pairs");
        assert_eq!(f.scales, Scales::F32Pairs);
        for (j, c) in [(0, 0), (5, 37), (31, 511)] {
            let (ints, sc, _) = p.block(j, c / 32);
            assert_eq!(f.weight(j, c), sc[0] * ints[c % 32] as f32, "({j}, {c})");
        }
    }
    // Parts one after the other: those of a layout joined where the one before ends a
    // tile, each row's weights as in its part; a part after one ending inside a tile,
    // or of another layout, starts the next launch's.
    let part = |ty, n: usize| {
        let v: Vec<f32> = (0..n * k)
            .map(|i| ((i * 31) % 97) as f32 / 24.0 - 2.0)
            .collect();
        let mut blocks = Vec::new();
        match ty {
            GgmlType::Q4_1 => quant::quantize_row_q4_1(&v, &mut blocks),
            _ => quant::quantize_row_q8_0(&v, &mut blocks),
        }
        QuantRows::from_blocks(ty, &blocks, n, k).expect("a kernel layout")
    };
    let (a, b) = (part(GgmlType::Q8_0, 16), part(GgmlType::Q8_0, 3));
    let c4 = part(GgmlType::Q4_1, 5);
    let parts = [a.clone(), b.clone(), a.clone(), c4.clone(), c4.clone()];
    let stack = QuantRows::stack(parts.to_vec());
    let shapes: Vec<(u32, usize)> = stack.iter().map(|p| (p.bits, p.rows)).collect();
    // 16 + 3 (8 bits), 16 (after a part ending inside a tile), 5 (4 bits), 5.
    assert_eq!(shapes, [(8, 19), (8, 16), (4, 5), (4, 5)]);
    // Row by row, the stack's rows are the parts', bit for bit.
    let weights = |ps: &[QuantRows]| -> Vec<u32> {
        ps.iter()
            .flat_map(|p| (0..p.rows * k).map(|i| p.weight(i / k, i % k).to_bits()))
            .collect()
    };
    assert_eq!(weights(&stack), weights(&parts));
    assert!(QuantRows::stack(vec![]).is_empty());
    let q5 = vec![0u8; rows * k / 32 * GgmlType::Q5_0.block_bytes()];
    assert!(QuantRows::from_blocks(GgmlType::Q5_0, &q5, rows, k).is_none());
    assert!(QuantRows::from_blocks(GgmlType::Q4_1, &[0; 7], rows, k).is_none());
}
