//! Quantizers into the layouts this module owns, for the synthetic model writer
//! ([`quantize_row`]): ggml's rounding to each layout's levels.

use super::*;

/// Quantizes a row (length a multiple of the block) to `ty`, one of this module's layouts.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    for c in x.chunks_exact(ty.block_elems()) {
        match ty {
            GgmlType::Q5_0 | GgmlType::Q5_1 => quantize_q5(ty, c, out),
            GgmlType::Q4_K | GgmlType::Q5_K => quantize_k(ty, c, out),
            GgmlType::Q6_K => quantize_q6_k(c, out),
            GgmlType::Q2_K => quantize_q2_k(c, out),
            GgmlType::Q3_K => quantize_q3_k(c, out),
            GgmlType::IQ4_NL => quantize_iq4_nl(c, out),
            GgmlType::IQ4_XS => quantize_iq4_xs(c, out),
            other => unreachable!("{other:?} is not a layout of this module"),
        }
    }
}

fn quantize_q5(ty: GgmlType, c: &[f32], out: &mut Vec<u8>) {
    let (mn, mx) = c
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (d, m) = if ty == GgmlType::Q5_1 {
        ((mx - mn) / 31.0, mn)
    } else {
        // The value of largest magnitude maps to −16 (ggml's choice).
        let big = if mx.abs() > mn.abs() { mx } else { mn };
        (big / -16.0, 0.0)
    };
    let (d16, m16) = (f16::from_f32(d), f16::from_f32(m));
    let (dr, mr) = (d16.to_f32(), m16.to_f32());
    let id = if dr != 0.0 { 1.0 / dr } else { 0.0 };
    let q: Vec<u32> = c
        .iter()
        .map(|&v| {
            let r = if ty == GgmlType::Q5_1 {
                (v - mr) * id
            } else {
                v * id + 16.0
            };
            (r.round() as i32).clamp(0, 31) as u32
        })
        .collect();
    out.extend_from_slice(&d16.to_le_bytes());
    if ty == GgmlType::Q5_1 {
        out.extend_from_slice(&m16.to_le_bytes());
    }
    let qh = (0..QK).fold(0u32, |a, j| a | ((q[j] >> 4) << j));
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| ((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)) as u8));
}

/// A K-quant super-block's sub-blocks of `run` with a scale and a min (Q2_K, Q4_K, Q5_K):
/// `d` and `dmin`, each sub-block's scale and min as integers 0..=`most` of them (rounded
/// up, so that they cover its values), and its elements' integers 0..=`top` (in order).
fn scales_and_mins(
    c: &[f32],
    run: usize,
    top: i32,
    most: i32,
) -> (f16, f16, Vec<u8>, Vec<u8>, Vec<u8>) {
    let topf = top as f32;
    let (mut scales, mut mins) = (Vec::new(), Vec::new());
    for s in c.chunks_exact(run) {
        let mn = s.iter().fold(0f32, |a, &v| a.min(v));
        let mx = s.iter().fold(f32::MIN, |a, &v| a.max(v));
        scales.push((mx - mn) / topf);
        mins.push(-mn);
    }
    let dmin = f16::from_f32(mins.iter().fold(0f32, |a, &v| a.max(v)) / most as f32);
    // The largest scale once the mins are rounded up (by at most one `dmin`).
    let widest = scales.iter().fold(0f32, |a, &v| a.max(v)) + dmin.to_f32() / topf;
    let d = f16::from_f32(widest / most as f32);
    let units = |v: f32, unit: f16| {
        let u = unit.to_f32();
        if u > 0.0 {
            ((v / u).ceil() as i32).clamp(0, most) as u8
        } else {
            0
        }
    };
    let lm: Vec<u8> = mins.iter().map(|&m| units(m, dmin)).collect();
    // Each sub-block's scale from the range its rounded min leaves.
    let mut ls = Vec::with_capacity(lm.len());
    let mut q = Vec::with_capacity(c.len());
    for (s, &lm) in c.chunks_exact(run).zip(&lm) {
        let mx = s.iter().fold(f32::MIN, |a, &v| a.max(v));
        let m1 = dmin.to_f32() * lm as f32;
        let l = units((mx + m1) / topf, d);
        ls.push(l);
        let d1 = d.to_f32() * l as f32;
        let id = if d1 > 0.0 { 1.0 / d1 } else { 0.0 };
        q.extend(
            s.iter()
                .map(|&v| (((v + m1) * id).round() as i32).clamp(0, top) as u8),
        );
    }
    (d, dmin, ls, lm, q)
}

/// Q4_K and Q5_K: per sub-block a scale and a min (≤ 0), both in 6 bits of the block's
/// `d` and `dmin`.
fn quantize_k(ty: GgmlType, c: &[f32], out: &mut Vec<u8>) {
    let top = if ty == GgmlType::Q4_K { 15 } else { 31 };
    let (d, dmin, ls, lm, q) = scales_and_mins(c, QK, top, 63);
    let packed = pack_scale_mins(&ls, &lm);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    if ty == GgmlType::Q5_K {
        let mut qh = [0u8; 32];
        for j in 0..8 {
            for l in 0..QK {
                qh[l] |= (q[QK * j + l] >> 4) << j;
            }
        }
        out.extend_from_slice(&qh);
    }
    for p in 0..4 {
        let (lo, hi) = (&q[64 * p..64 * p + 32], &q[64 * p + 32..64 * p + 64]);
        out.extend((0..32).map(|l| (lo[l] & 0xF) | ((hi[l] & 0xF) << 4)));
    }
}

/// The 12 scale bytes of a Q4_K/Q5_K block from its sub-blocks' 6-bit scales and mins
/// (what [`scale_min`] reads).
pub(super) fn pack_scale_mins(ls: &[u8], lm: &[u8]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            packed[j] = ls[j];
            packed[j + 4] = lm[j];
        } else {
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            packed[j - 4] |= (ls[j] >> 4) << 6;
            packed[j] |= (lm[j] >> 4) << 6;
        }
    }
    packed
}

/// Q6_K: per 16 elements an 8-bit scale of the block's `d`.
fn quantize_q6_k(c: &[f32], out: &mut Vec<u8>) {
    let scales: Vec<f32> = c
        .chunks_exact(16)
        .map(|s| s.iter().fold(0f32, |a, &v| a.max(v.abs())) / 31.0)
        .collect();
    let d = f16::from_f32(scales.iter().fold(0f32, |a, &v| a.max(v)) / 127.0);
    // Rounded up, so that each 16's scale covers its values.
    let sc: Vec<i8> = scales
        .iter()
        .map(|&s| {
            if d.to_f32() > 0.0 {
                ((s / d.to_f32()).ceil() as i32).clamp(-128, 127) as i8
            } else {
                0
            }
        })
        .collect();
    let mut q = [0u8; QK_K];
    for (i, &v) in c.iter().enumerate() {
        let step = d.to_f32() * sc[i / 16] as f32;
        let r = if step != 0.0 { (v / step).round() } else { 0.0 };
        q[i] = (r as i32 + 32).clamp(0, 63) as u8;
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for half in 0..2 {
        let y = &q[128 * half..];
        for l in 0..32 {
            ql[64 * half + l] = (y[l] & 0xF) | ((y[l + 64] & 0xF) << 4);
            ql[64 * half + l + 32] = (y[l + 32] & 0xF) | ((y[l + 96] & 0xF) << 4);
            qh[32 * half + l] = (y[l] >> 4)
                | ((y[l + 32] >> 4) << 2)
                | ((y[l + 64] >> 4) << 4)
                | ((y[l + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

/// Q2_K: per 16 elements a 4-bit scale of `d` and a 4-bit min of `dmin` (as Q4_K's, in
/// 4 bits, and 2-bit integers).
fn quantize_q2_k(c: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, ls, lm, q) = scales_and_mins(c, 16, 3, 15);
    out.extend((0..16).map(|j| ls[j] | (lm[j] << 4)));
    out.extend((0..64).map(|i| {
        let (half, l) = (i / 32, i % 32);
        (0..4).fold(0u8, |a, shift| {
            a | (q[128 * half + 32 * shift + l] << (2 * shift))
        })
    }));
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
}

/// The value of largest magnitude, with its sign (the first of equals; 0 for none).
fn signed_max(s: &[f32]) -> f32 {
    s.iter()
        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a })
}

/// Q3_K: per 16 elements a 6-bit signed scale of `d`, 3-bit integers −4..4. As ggml's, the
/// 16 of largest magnitude gets scale −32 and its value of largest magnitude −4, so the
/// products `sc·q` reach 128 (what the conversion to Q8_0 must hold).
fn quantize_q3_k(c: &[f32], out: &mut Vec<u8>) {
    let scales: Vec<f32> = c.chunks_exact(16).map(|s| signed_max(s) / -4.0).collect();
    let d = f16::from_f32(signed_max(&scales) / -32.0);
    // Rounded away from zero, so that each 16's scale covers its values.
    let sc: Vec<i32> = scales
        .iter()
        .map(|&s| {
            let r = if d.to_f32() != 0.0 {
                s / d.to_f32()
            } else {
                0.0
            };
            (r.abs().ceil().copysign(r) as i32).clamp(-32, 31)
        })
        .collect();
    let mut q = [0i32; QK_K];
    for (i, &v) in c.iter().enumerate() {
        let step = d.to_f32() * sc[i / 16] as f32;
        let r = if step != 0.0 { (v / step).round() } else { 0.0 };
        q[i] = (r as i32).clamp(-4, 3);
    }
    let mut hmask = [0u8; 32];
    for (e, &q) in q.iter().enumerate() {
        if q >= 0 {
            hmask[e % 32] |= 1 << (e / 32);
        }
    }
    out.extend_from_slice(&hmask);
    out.extend((0..64).map(|i| {
        let (half, l) = (i / 32, i % 32);
        (0..4).fold(0u8, |a, shift| {
            a | (((q[128 * half + 32 * shift + l] & 3) as u8) << (2 * shift))
        })
    }));
    let ls: Vec<u8> = sc.iter().map(|&s| (s + 32) as u8).collect();
    let mut packed = [0u8; 12];
    for (k, &l) in ls.iter().enumerate() {
        packed[k % 8] |= (l & 0xF) << (4 * (k / 8));
        packed[8 + k % 4] |= (l >> 4) << (2 * (k / 4));
    }
    out.extend_from_slice(&packed);
    out.extend_from_slice(&d.to_le_bytes());
}

/// The index of the IQ4 level nearest `v`.
fn nearest_iq4(v: f32) -> u8 {
    (0..16)
        .min_by(|&a, &b| {
            let da = (v - IQ4_LEVELS[a] as f32).abs();
            let db = (v - IQ4_LEVELS[b] as f32).abs();
            da.total_cmp(&db)
        })
        .unwrap_or(0) as u8
}

/// One IQ4_NL block: `d` the value of largest magnitude over −127 (as ggml's).
fn quantize_iq4_nl(c: &[f32], out: &mut Vec<u8>) {
    let d = f16::from_f32(signed_max(c) / -127.0);
    out.extend_from_slice(&d.to_le_bytes());
    iq4_indices(c, d.to_f32(), out);
}

/// 32 elements' nearest IQ4 levels under `step`, as 16 bytes of index pairs.
fn iq4_indices(c: &[f32], step: f32, out: &mut Vec<u8>) {
    let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
    let idx: Vec<u8> = c.iter().map(|&v| nearest_iq4(v * inv)).collect();
    out.extend((0..16).map(|j| idx[j] | (idx[j + 16] << 4)));
}

/// IQ4_XS: per 32 elements a 6-bit signed scale `ls − 32` of the block's `d`.
fn quantize_iq4_xs(c: &[f32], out: &mut Vec<u8>) {
    let scales: Vec<f32> = c.chunks_exact(QK).map(|s| signed_max(s) / -127.0).collect();
    let d = f16::from_f32(signed_max(&scales) / -32.0);
    let ls: Vec<u16> = scales
        .iter()
        .map(|&s| {
            let l = if d.to_f32() != 0.0 {
                (s / d.to_f32()).round() as i32
            } else {
                0
            };
            (l.clamp(-32, 31) + 32) as u16
        })
        .collect();
    out.extend_from_slice(&d.to_le_bytes());
    let high = (0..8).fold(0u16, |a, j| a | ((ls[j] >> 4) << (2 * j)));
    out.extend_from_slice(&high.to_le_bytes());
    out.extend((0..4).map(|i| ((ls[2 * i] & 0xF) | ((ls[2 * i + 1] & 0xF) << 4)) as u8));
    for (j, s) in c.chunks_exact(QK).enumerate() {
        iq4_indices(s, d.to_f32() * (ls[j] as i32 - 32) as f32, out);
    }
}
