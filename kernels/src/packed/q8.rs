//! 8-bit activations (llama.cpp's scheme, [`Q8Block`]) against packed 4-bit weights: one
//! `vpdpbusd` multiplies 4 unsigned weight nibbles by 4 signed activation bytes in each of
//! 16 lanes (one lane per weight row) and adds them into the row's integer sum — 64
//! products per instruction, twice the 16-bit path's, at llama.cpp's precision (~1e-2).
//!
//! It reads the same packed bytes as the 16-bit kernel: pairs `2q` and `2q + 1` of a block
//! (16 bytes each, a byte per row) widen to one 32-bit lane per row holding that row's
//! inputs `4q .. 4q + 4` as bytes. Output `l` of an activation row is
//! `Σ_i fma(float(Σ_k v_k q_k) · d_i, scale_il, ·)` then `fma(min_il, s_i, ·)` with the
//! activation block's scale `d` and scaled sum `s`, on the CPU kernel and its scalar twin
//! alike (bit for bit). 8-bit weights (Q8_0) are not covered: signed × signed has no
//! single instruction, and they keep the row-wise kernel.

use super::{kernel, Kernel, Packed, LANES};
use crate::gguf::GgmlType;
use crate::quant::{Q8Block, QK};

impl Packed {
    /// Whether [`Packed::dot_rows_q8`] applies: 4-bit weights.
    pub fn takes_q8(&self) -> bool {
        self.ty != GgmlType::Q8_0
    }

    /// Scalar twin of [`Packed::dot_rows_q8`], with the same rounding.
    pub fn dot_rows_q8_scalar<const R: usize>(
        &self,
        g: usize,
        a: [&[Q8Block]; R],
    ) -> [[f32; LANES]; R] {
        let mut out = [[0f32; LANES]; R];
        for i in 0..self.nb {
            let gi = g * self.nb + i;
            for r in 0..R {
                let x = &a[r][i];
                for l in 0..LANES {
                    let n = g * LANES + l;
                    let s: i32 = (0..QK)
                        .map(|j| self.int(n, i * QK + j) * x.qs[j] as i32)
                        .sum();
                    let o = (s as f32 * x.d).mul_add(self.scales[gi * LANES + l], out[r][l]);
                    out[r][l] = self.mins[gi * LANES + l].mul_add(x.s, o);
                }
            }
        }
        out
    }

    /// Rows `16g .. 16g + 16` (4-bit weights) against R rows of 8-bit activation blocks:
    /// `out[r][l]` = row `16g + l` · activation row `r`.
    pub fn dot_rows_q8<const R: usize>(&self, g: usize, a: [&[Q8Block]; R]) -> [[f32; LANES]; R] {
        self.dot_rows_q8_on(kernel(), g, a)
    }

    /// [`Packed::dot_rows_q8`] on `kernel` (`None`: the scalar twin); `kernel` must run
    /// here.
    pub(crate) fn dot_rows_q8_on<const R: usize>(
        &self,
        kernel: Option<Kernel>,
        g: usize,
        a: [&[Q8Block]; R],
    ) -> [[f32; LANES]; R] {
        let mut out = [[0f32; LANES]; R];
        self.dot_rows_q8_groups_on(kernel, g..g + 1, a, &mut |_, r| out = *r);
        out
    }

    /// [`Packed::dot_rows_q8`] for each group of `groups` in turn, handing each result to
    /// `put(group, result)`.
    #[inline]
    pub fn dot_rows_q8_groups<const R: usize>(
        &self,
        groups: std::ops::Range<usize>,
        a: [&[Q8Block]; R],
        put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
    ) {
        self.dot_rows_q8_groups_on(kernel(), groups, a, put)
    }

    #[inline]
    fn dot_rows_q8_groups_on<const R: usize>(
        &self,
        kernel: Option<Kernel>,
        groups: std::ops::Range<usize>,
        a: [&[Q8Block]; R],
        put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
    ) {
        assert!(self.takes_q8(), "8-bit weights take the row-wise kernel");
        assert!(groups.end <= self.rows / LANES);
        assert!(a.iter().all(|x| x.len() >= self.nb));
        assert!(
            kernel.is_none_or(Kernel::runs_here),
            "{kernel:?} does not run here"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel's instructions exist here (asserted); reads stay within the
        // packed arrays (the groups exist, 4-bit layout) and `a` (asserted).
        unsafe {
            match kernel {
                Some(Kernel::Avx512Vnni) => return vnni::dot_rows(self, groups, a, put),
                Some(Kernel::AvxVnni) => {
                    return super::avx2::dot_rows_q8_vnni(self, groups, a, put)
                }
                Some(Kernel::Avx2) => return super::avx2::dot_rows_q8(self, groups, a, put),
                None => {}
            }
        }
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        unsafe {
            match kernel {
                Some(Kernel::NeonDot) => return super::neon::dot_rows_q8_dot(self, groups, a, put),
                Some(Kernel::Neon) => return super::neon::dot_rows_q8(self, groups, a, put),
                None => {}
            }
        }
        for g in groups {
            put(g, &self.dot_rows_q8_scalar(g, a));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::super::vnni::{add_block, hand_over};
    use super::super::{Packed, LANES};
    use crate::quant::{Q8Block, QK};
    use std::arch::x86_64::*;
    use std::array::from_fn;

    /// See [`Packed::dot_rows_q8_groups`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_rows<const R: usize>(
        pk: &Packed,
        groups: std::ops::Range<usize>,
        a: [&[Q8Block]; R],
        put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
    ) {
        let nb = pk.nb;
        let vb = Packed::vb(pk.ty);
        let nibbles = _mm512_set1_epi32(0x0F0F_0F0F);
        for g in groups {
            let mut out = [_mm512_setzero_ps(); R];
            for i in 0..nb {
                let gi = g * nb + i;
                let v = pk.vals.as_ptr().add(gi * vb);
                let mut acc = [_mm512_setzero_si512(); R];
                for q in 0..QK / 4 {
                    // Lane l: bytes A = v0 | v1 << 4 and B = v2 | v3 << 4 → bytes (v0, v1, v2, v3).
                    let lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(v.add(32 * q) as *const __m128i));
                    let hi =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(v.add(32 * q + 16) as *const __m128i));
                    let x = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                    let w =
                        _mm512_and_si512(_mm512_or_si512(x, _mm512_slli_epi32::<4>(x)), nibbles);
                    for r in 0..R {
                        let quad = (a[r].get_unchecked(i).qs.as_ptr().add(4 * q) as *const i32)
                            .read_unaligned();
                        acc[r] = _mm512_dpbusd_epi32(acc[r], w, _mm512_set1_epi32(quad));
                    }
                }
                let d = from_fn(|r| a[r].get_unchecked(i).d);
                let s = from_fn(|r| a[r].get_unchecked(i).s);
                add_block(pk, gi * LANES, gi * LANES, &mut out, &acc, d, Some(s));
            }
            hand_over(g, &out, put);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;

    #[test]
    fn the_q8_kernel_matches_its_scalar_twin_bit_for_bit_and_the_f32_product_roughly() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let (rows, cols, b) = (32, 576, 6);
            let w = crate::testutil::rand(rows * cols, 13);
            let mut data = Vec::new();
            if ty == GgmlType::Q4_0 {
                quant::quantize_row_q4_0(&w, &mut data);
            } else {
                quant::quantize_row_q4_1(&w, &mut data);
            }
            let pk = Packed::new(ty, rows, cols, &data).expect("packs");
            assert!(pk.takes_q8());
            let x = crate::testutil::rand(b * cols, 31);
            let nb = cols / QK;
            let mut a = vec![Q8Block::default(); b * nb];
            for r in 0..b {
                quant::quantize_row_q8(&x[r * cols..(r + 1) * cols], &mut a[r * nb..(r + 1) * nb]);
            }
            let ar = |r: usize| &a[r * nb..(r + 1) * nb];
            let mut wr = vec![0f32; cols];
            for g in 0..rows / LANES {
                let twin = pk.dot_rows_q8_scalar::<4>(g, [ar(0), ar(1), ar(2), ar(3)]);
                for &k in &Kernel::all_here() {
                    let four = pk.dot_rows_q8_on::<4>(Some(k), g, [ar(0), ar(1), ar(2), ar(3)]);
                    assert_eq!(four, twin, "{k:?} {ty:?} group {g}");
                    let six = pk.dot_rows_q8_on::<6>(Some(k), g, std::array::from_fn(ar));
                    assert_eq!(
                        six[..4],
                        four[..],
                        "{k:?}: a row's result does not depend on its tile"
                    );
                    let one = pk.dot_rows_q8_on::<1>(Some(k), g, [ar(4)]);
                    assert_eq!(one[0], six[4], "{k:?} {ty:?} group {g}, one row");
                }
                for r in 0..b {
                    let one = pk.dot_rows_q8::<1>(g, [ar(r)]);
                    if r < 4 {
                        assert_eq!(one[0], twin[r], "the kernel in use, row {r}");
                    }
                    for l in 0..LANES {
                        pk.row_f32(g * LANES + l, &mut wr);
                        let terms = wr
                            .iter()
                            .zip(&x[r * cols..(r + 1) * cols])
                            .map(|(p, q)| *p as f64 * *q as f64);
                        let want: f64 = terms.clone().sum();
                        let size: f64 = terms.map(f64::abs).sum();
                        let got = one[0][l] as f64;
                        // 8-bit activations: errors of about 1/254 of each block's largest
                        // value, adding up over the row.
                        assert!(
                            (got - want).abs() <= 2e-3 * size,
                            "{ty:?} row {} · x{r}: {got} vs {want}",
                            g * LANES + l
                        );
                    }
                }
            }
        }
    }
}
