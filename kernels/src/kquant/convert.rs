//! Conversion at load into the layouts the kernels read (the module doc says which
//! holds what): [`to_kernel_layout`], and the packed form where it keeps more of the
//! file's values ([`exact_packed`], [`fidelity`]).

use super::*;

/// How close a converted layout's values are to the file's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fidelity {
    /// The same values.
    Exact,
    /// The same integers; scales that are products of two of the file's (a K-quant
    /// sub-block's `d·sc`) rounded to f16, ≤ 2⁻¹¹ relative, as the GPU path's f16 weights.
    ScalesToF16,
    /// Requantized: each value within half a Q8_0 step.
    Requantized,
}

/// What a layout becomes in memory for the kernels, and how close its values stay.
pub fn kernel_layout(ty: GgmlType) -> (GgmlType, Fidelity) {
    match ty {
        GgmlType::Q4_K => (GgmlType::Q4_1, Fidelity::ScalesToF16),
        GgmlType::Q5_K | GgmlType::IQ4_XS => (GgmlType::Q8_0, Fidelity::ScalesToF16),
        GgmlType::Q6_K => (GgmlType::Q8_0, Fidelity::Requantized),
        _ => (GgmlType::Q8_0, Fidelity::Exact),
    }
}

/// How close a `rows`-row matrix of `ty` stays to the file's values on this CPU (for the
/// 16- and 8-bit activation products and its rows): as its kernel layout keeps them
/// ([`kernel_layout`]), or exactly where it is packed with its own values
/// ([`packs_exactly`]).
pub fn fidelity(ty: GgmlType, rows: usize) -> Fidelity {
    match packs_exactly(ty, rows) {
        true => Fidelity::Exact,
        false => kernel_layout(ty).1,
    }
}

/// Whether a `rows`-row matrix of `ty` keeps its exact values in the packed kernels'
/// layout ([`exact_packed`]) on this CPU: the layouts whose scales the kernel blocks round
/// (Q4_K, Q5_K, IQ4_XS) or cannot hold (Q6_K), where the packed kernels run and rows come
/// in groups of 16.
pub fn packs_exactly(ty: GgmlType, rows: usize) -> bool {
    matches!(
        ty,
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::IQ4_XS | GgmlType::Q6_K
    ) && crate::packed::available()
        && rows.is_multiple_of(crate::packed::LANES)
}

/// A `rows × cols` matrix of `ty` (`src`, the file's blocks; `converted`, them in the
/// kernel layout) in the packed kernels' layout with its own values, where
/// [`packs_exactly`] says so (else `None`):
/// - Q4_K, Q5_K, IQ4_XS: the converted blocks' integers under each sub-block's scale
///   `d·sc` (and Q4_K's min `−dmin·m`, Q5_K's offset as the kernels' min) in f32 — the
///   product of an f16 and a 6-bit integer, exact — where the blocks round them to f16.
/// - Q6_K: 8-bit `q − 32` and a scale `d·sc` per 16 (an f16 times an i8, exact in f32).
pub fn exact_packed(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    src: &[u8],
    converted: &Converted,
) -> Option<Packed> {
    if !packs_exactly(ty, rows) || src.len() != rows * cols / QK_K * ty.block_bytes() {
        return None;
    }
    if ty != GgmlType::Q6_K {
        // Per 32-element sub-block, in order: its scale, and its min (Q4_K's; kept for it).
        let (scales, mins): (Vec<f32>, Vec<f32>) = src
            .chunks(ty.block_bytes())
            .flat_map(|b| {
                (0..QK_K / QK).map(move |j| match ty {
                    GgmlType::IQ4_XS => (iq4_xs_sub_block(b, j).1, 0.0),
                    _ => {
                        let (_, d1, m1) = k_sub_block(ty, b, j);
                        (d1, -m1)
                    }
                })
            })
            .unzip();
        let mins = if ty == GgmlType::Q4_K {
            mins
        } else {
            Vec::new()
        };
        let pk = Packed::new(converted.ty, rows, cols, &converted.data)?
            .with_exact_scales(&scales, &mins);
        // Q5_K's offsets, as the kernels' mins (as `Matrix::packed` would add them).
        return Some(match &converted.offsets {
            Some(o) if o.run == QK => pk.with_mins(&o.values),
            _ => pk,
        });
    }
    let mut values = vec![0i8; rows * cols];
    let mut scales = vec![0f32; rows * cols / 16];
    values
        .par_chunks_mut(QK_K)
        .zip(scales.par_chunks_mut(QK_K / 16))
        .zip(src.par_chunks(ty.block_bytes()))
        .for_each(|((v, sc), b)| {
            v.copy_from_slice(&q6_values(b));
            let d = h(b, 208);
            for (j, sc) in sc.iter_mut().enumerate() {
                *sc = d * b[192 + j] as i8 as f32;
            }
        });
    Packed::from_i8_runs16(rows, cols, &values, &scales)
}

/// The weights a converted offset covers, for the layouts whose conversion keeps their
/// offsets beside the kernels' blocks ([`Offsets`]): Q5_1 and Q5_K per 32, Q2_K per 16.
pub fn offset_run(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q5_1 | GgmlType::Q5_K => Some(QK),
        GgmlType::Q2_K => Some(16),
        _ => None,
    }
}

/// Blocks converted into a kernel layout, and the offsets that go beside them.
pub struct Converted {
    pub ty: GgmlType,
    pub data: Vec<u8>,
    pub offsets: Option<Offsets>,
}

/// Converts whole blocks of `ty` (one of this module's layouts) into the layout the
/// kernels read ([`kernel_layout`]), with offsets where the layout has them
/// ([`offset_run`]); in parallel on the current rayon pool.
pub fn to_kernel_layout(ty: GgmlType, src: &[u8]) -> Converted {
    let (to, _) = kernel_layout(ty);
    let (bb, be) = (ty.block_bytes(), ty.block_elems());
    let (out_bb, per) = (to.block_bytes(), be / QK);
    let n = src.len() / bb;
    let run = offset_run(ty);
    let per_off = run.map_or(0, |r| be / r);
    let mut out = vec![0u8; n * per * out_bb];
    // A slot a block at least, so that the three walk in step (dropped where unused).
    let stride = per_off.max(1);
    let mut off = vec![0f32; n * stride];
    const BLOCKS: usize = 64;
    out.par_chunks_mut(out_bb * per * BLOCKS)
        .zip(src.par_chunks(bb * BLOCKS))
        .zip(off.par_chunks_mut(stride * BLOCKS))
        .for_each(|((o, s), f)| {
            let blocks = o.chunks_exact_mut(out_bb * per).zip(s.chunks_exact(bb));
            for ((o, b), f) in blocks.zip(f.chunks_exact_mut(stride)) {
                convert_block(ty, b, o, &mut f[..per_off]);
            }
        });
    Converted {
        ty: to,
        data: out,
        offsets: run.map(|run| Offsets { run, values: off }),
    }
}

/// One block of `ty` into `out` (kernel blocks) and `off` (its offsets, if it has them).
fn convert_block(ty: GgmlType, b: &[u8], out: &mut [u8], off: &mut [f32]) {
    match ty {
        GgmlType::Q4_K => {
            for (j, o) in out.chunks_exact_mut(20).enumerate() {
                let (q, d1, m1) = k_sub_block(ty, b, j);
                o[0..2].copy_from_slice(&f16::from_f32(d1).to_le_bytes());
                o[2..4].copy_from_slice(&f16::from_f32(-m1).to_le_bytes());
                for i in 0..16 {
                    o[4 + i] = q[i] | (q[i + 16] << 4);
                }
            }
        }
        GgmlType::Q5_0 => {
            let (q, d, _) = q5_block(ty, b);
            // The widest of ×4, ×2 and ×1 whose scale d/k is an exact f16 (d itself is).
            let (k, scale) = [4i32, 2]
                .into_iter()
                .map(|k| (k, f16::from_f32(d / k as f32)))
                .find(|&(k, s)| s.to_f32() * k as f32 == d)
                .unwrap_or((1, f16::from_f32(d)));
            out[0..2].copy_from_slice(&scale.to_le_bytes());
            for (o, q) in out[2..].iter_mut().zip(q) {
                *o = (k * (q as i32 - 16)) as i8 as u8;
            }
        }
        GgmlType::Q3_K => {
            let (q, sc) = (q3_values(b), q3_scales(b));
            let d = f16::from_le_bytes([b[108], b[109]]);
            for (k, o) in out.chunks_exact_mut(34).enumerate() {
                // `sc·q` is −124..=128: 128 (−32·−4) only fits as −128, under `−d`.
                let v: [i32; QK] =
                    std::array::from_fn(|l| sc[(QK * k + l) / 16] as i32 * q[QK * k + l] as i32);
                let flip = v.contains(&128);
                o[0..2].copy_from_slice(&(if flip { -d } else { d }).to_le_bytes());
                for (o, v) in o[2..].iter_mut().zip(v) {
                    *o = (if flip { -v } else { v }) as i8 as u8;
                }
            }
        }
        GgmlType::IQ4_NL => {
            out[0..2].copy_from_slice(&b[0..2]);
            for (o, q) in out[2..].iter_mut().zip(iq4_values(&b[2..18])) {
                *o = q as u8;
            }
        }
        GgmlType::IQ4_XS => {
            for (j, o) in out.chunks_exact_mut(34).enumerate() {
                // The sub-block's scale `d·(ls − 32)` rounded to f16 (≤ 2⁻¹¹ relative).
                let (q, dl) = iq4_xs_sub_block(b, j);
                o[0..2].copy_from_slice(&f16::from_f32(dl).to_le_bytes());
                for (o, q) in o[2..].iter_mut().zip(q) {
                    *o = q as u8;
                }
            }
        }
        GgmlType::Q5_1 => {
            // d·q + m: Q8_0 of scale `d` (an f16, exact) and integers 0..32, offset m.
            let (q, _, m) = q5_block(ty, b);
            out[0..2].copy_from_slice(&b[0..2]);
            for (o, q) in out[2..].iter_mut().zip(q) {
                *o = q;
            }
            off[0] = m;
        }
        GgmlType::Q5_K => {
            for (j, o) in out.chunks_exact_mut(34).enumerate() {
                // d·sc·q − dmin·m: the sub-block's scale rounded to f16 (≤ 2⁻¹¹ relative).
                let (q, d1, m1) = k_sub_block(ty, b, j);
                o[0..2].copy_from_slice(&f16::from_f32(d1).to_le_bytes());
                o[2..].copy_from_slice(&q);
                off[j] = -m1;
            }
        }
        GgmlType::Q2_K => {
            // d·sc·q − dmin·m per 16: Q8_0 of scale `d` and integers sc·q (0..46), the
            // 16's offset −dmin·m. `d·(sc·q)` is `(d·sc)·q` exactly (17 bits at most).
            let q = q2_values(b);
            for (k, o) in out.chunks_exact_mut(34).enumerate() {
                o[0..2].copy_from_slice(&b[80..82]);
                for (l, o) in o[2..].iter_mut().enumerate() {
                    let e = QK * k + l;
                    *o = (b[e / 16] & 0xF) * q[e];
                }
            }
            for (f, sc) in off.iter_mut().zip(&b[..16]) {
                *f = -(h(b, 82) * (sc >> 4) as f32);
            }
        }
        _ => requantize(ty, b, out),
    }
}

/// Dequantizes one block and quantizes it again as Q8_0 blocks.
fn requantize(ty: GgmlType, b: &[u8], out: &mut [u8]) {
    let mut x = [0f32; QK_K];
    let x = &mut x[..ty.block_elems()];
    dequantize(ty, b, x);
    for (c, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        q8_0_block(c, o);
    }
}

/// One Q8_0 block of `c`, each value at its nearest level under the scale as stored (f16).
fn q8_0_block(c: &[f32], out: &mut [u8]) {
    let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let id = if d.to_f32() > 0.0 {
        1.0 / d.to_f32()
    } else {
        0.0
    };
    out[0..2].copy_from_slice(&d.to_le_bytes());
    for (o, &v) in out[2..].iter_mut().zip(c) {
        *o = ((v * id).round() as i32).clamp(-127, 127) as i8 as u8;
    }
}
