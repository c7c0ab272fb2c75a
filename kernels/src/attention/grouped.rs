//! The query heads that share a KV head, and a prompt's rows, together (x86-64): for the
//! common shapes (16-slot blocks; heads 64 or 128 wide or another multiple of 16, such as
//! Phi-3's 96; a KV head's query heads in runs of 1–4) each key and value read from the
//! cache is widened (f16 → f32) once for all of a task's queries instead of once per head
//! and row.
//!
//! The loops are written once over [`Lanes`], a register of f32 lanes, and compiled for
//! two widths ([`Width`]): AVX-512 (a 16-slot block's scores, or 16 of a head's outputs, to
//! a register) and AVX2 (8; a block in two halves, a head's outputs in passes of 16,
//! so that a task's accumulators fit AVX2's 16 registers). The partial sums and their
//! order are [`super::block_scores`]' and [`super::weighted_values`]' lane for lane: every
//! row gets the portable loops' bits, alone or in a tile, on either width.

use super::{HeadTask, Scores, Width, PARTS};
use crate::kv::KvCache;
use half::f16;
use std::arch::x86_64::*;

/// A register of f32 lanes: what the grouped loops need of it.
///
/// # Safety
/// Every method needs the CPU features its width names ([`Width`]); they are inlined
/// into functions compiled for them ([`Lanes::value_sums`] is one itself).
trait Lanes: Copy {
    /// Lanes a register (a divisor of 16).
    const N: usize;
    /// Registers a head's outputs are summed in at a time (at most 4): a head `hd` wide
    /// takes `⌈hd / (VALUE_REGS · N)⌉` passes over its values, the last over what is left.
    const VALUE_REGS: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// `N` f16 at `p`, widened to f32.
    unsafe fn load_f16(p: *const f16) -> Self;
    /// `self · b + c`, rounded once.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// [`value_sums`] in a function of its own, compiled for this width and never
    /// inlined: inlined into the grouped loops around it, the compiler kept its sums on
    /// the stack, not in registers (a load and a store about every multiply-add; with its
    /// own registers SmolLM2's 2,048-token prompt runs 1.2× as fast).
    unsafe fn value_sums<'a, const G: usize, const R: usize>(
        hd: usize,
        blocks: impl Iterator<Item = (&'a [f16], [[&'a [f32]; G]; R])>,
        out: [&mut [f32]; R],
    );
}

/// [`Lanes`] for a register type from its intrinsics: `N` f16 load as a `$half` (by
/// `$load_half`) and widen by `$widen`; the rest are the operations by name.
macro_rules! lanes {
    ($v:ty, $n:literal, $regs:literal, $features:literal, $half:ty, $load_half:ident,
     $widen:ident, $zero:ident, $splat:ident, $load:ident, $fma:ident, $add:ident,
     $store:ident) => {
        impl Lanes for $v {
            #[inline(always)]
            unsafe fn value_sums<'a, const G: usize, const R: usize>(
                hd: usize,
                blocks: impl Iterator<Item = (&'a [f16], [[&'a [f32]; G]; R])>,
                out: [&mut [f32]; R],
            ) {
                #[target_feature(enable = $features)]
                #[inline(never)]
                unsafe fn on<'a, const G: usize, const R: usize>(
                    hd: usize,
                    blocks: impl Iterator<Item = (&'a [f16], [[&'a [f32]; G]; R])>,
                    out: [&mut [f32]; R],
                ) {
                    value_sums::<$v, G, R>(hd, blocks, out)
                }
                on::<G, R>(hd, blocks, out)
            }
            const N: usize = $n;
            const VALUE_REGS: usize = $regs;
            #[inline(always)]
            unsafe fn zero() -> Self {
                $zero()
            }
            #[inline(always)]
            unsafe fn splat(x: f32) -> Self {
                $splat(x)
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                $load(p)
            }
            #[inline(always)]
            unsafe fn load_f16(p: *const f16) -> Self {
                $widen($load_half(p as *const $half))
            }
            #[inline(always)]
            unsafe fn mul_add(self, b: Self, c: Self) -> Self {
                $fma(self, b, c)
            }
            #[inline(always)]
            unsafe fn add(self, b: Self) -> Self {
                $add(self, b)
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                $store(p, self)
            }
        }
    };
}

lanes!(
    __m512,
    16,
    4,
    "avx512f",
    __m256i,
    _mm256_loadu_si256,
    _mm512_cvtph_ps,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_add_ps,
    _mm512_storeu_ps
);
lanes!(
    __m256,
    8,
    2,
    "avx2,fma,f16c",
    __m128i,
    _mm_loadu_si128,
    _mm256_cvtph_ps,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    _mm256_add_ps,
    _mm256_storeu_ps
);

/// [`super::block_scores`] for a 16-slot block and `G` query heads (`q`: `G` rows of
/// `hd`): head `g`'s scores of all 16 slots into `out[g]`, `N` slots at a time with the
/// four partial sums of every head live together.
///
/// # Safety
/// `V`'s features; `kb.len() ≥ 16·hd`, `q.len() ≥ G·hd`, `hd` a multiple of 4.
#[inline(always)]
unsafe fn scores16<V: Lanes, const G: usize>(
    q: &[f32],
    hd: usize,
    kb: &[f16],
    out: &mut [[f32; 16]; G],
) {
    let (kp, qp) = (kb.as_ptr(), q.as_ptr());
    for h in (0..16).step_by(V::N) {
        let mut a = [[V::zero(); PARTS]; G];
        for d in (0..hd).step_by(PARTS) {
            for j in 0..PARTS {
                let k = V::load_f16(kp.add((d + j) * 16 + h));
                for (g, a) in a.iter_mut().enumerate() {
                    a[j] = V::splat(*qp.add(g * hd + d + j)).mul_add(k, a[j]);
                }
            }
        }
        for (g, a) in a.iter().enumerate() {
            let v = a[0].add(a[1]).add(a[2].add(a[3]));
            v.store(out[g].as_mut_ptr().add(h));
        }
    }
}

/// [`scores16`] for `R` query rows at once (rows of one sequence attending together):
/// each key is read and widened once for all `R·G` queries, which `qt` holds dimension
/// by dimension (`qt[(d·R + r)·G + g]`: query (r, g)'s dimension `d`, so that one pointer
/// reaches them all). The partial sums are taken one after the other — sum `j` over
/// dimensions `j, j + 4, …` in order, as `scores16` builds each — so that only `R·G`
/// accumulators are live; combined as there. One row keeps `scores16`: with only `G`
/// sums a part, each part would wait on its multiply-adds' latency.
///
/// # Safety
/// `V`'s features; `kb.len() ≥ 16·hd`, `qt.len() ≥ R·G·hd`, `hd` a multiple of 4.
#[inline(always)]
unsafe fn scores16_rows<V: Lanes, const G: usize, const R: usize>(
    qt: &[f32],
    hd: usize,
    kb: &[f16],
    out: &mut [[[f32; 16]; G]; R],
) {
    let kp = kb.as_ptr();
    for h in (0..16).step_by(V::N) {
        let mut parts = [[[V::zero(); G]; R]; PARTS];
        for j in 0..PARTS {
            // Summed in a local of its own, kept in registers,
            let mut acc = [[V::zero(); G]; R];
            for d in (j..hd).step_by(PARTS) {
                let k = V::load_f16(kp.add(d * 16 + h));
                let qd = qt.as_ptr().add(d * R * G);
                for (r, a) in acc.iter_mut().enumerate() {
                    for (g, a) in a.iter_mut().enumerate() {
                        *a = V::splat(*qd.add(r * G + g)).mul_add(k, *a);
                    }
                }
            }
            // Put away at an index the compiler cannot see through: the finished parts
            // go to memory, not registers the next part's sums need (AVX2 has 16; kept
            // there, they made it spill sums inside the loop).
            parts[std::hint::black_box(j)] = acc;
        }
        for (r, o) in out.iter_mut().enumerate() {
            for (g, o) in o.iter_mut().enumerate() {
                let p = |j: usize| parts[j][r][g];
                let v = p(0).add(p(1)).add(p(2).add(p(3)));
                v.store(o.as_mut_ptr().add(h));
            }
        }
    }
}

/// [`super::weighted_values`] for `G` heads `hd` wide, for `R` query rows at once:
/// each block's values and each row's `G` heads' weights for it (row `r`'s head `g`'s at
/// `p[r][g]`), into `out[r]` (`G` rows of `hd`); each value row is read and widened once for
/// all of them. A row's weights for a block may be fewer than another's (its last block),
/// or none; each query's sum runs over its own slots in order, from zero, as in the
/// portable loop. Where a head's outputs take more than `V`'s value registers (AVX2, or
/// heads wider than 64 on AVX-512), a block's values are taken `VALUE_REGS·N` dimensions
/// at a time, and the last pass takes what is left (Phi-3's 96: 64, then 32), those
/// outputs' running sums loaded from `out` into registers and stored back (the block's
/// values stay in L1 across the passes; [`one_pass`]).
///
/// # Safety
/// `V`'s features; `hd` a multiple of `N`; each `out[r].len() ≥ hd·G`; each block's
/// values hold `hd` per weight of its longest row, and a row's heads have as many weights
/// for a block.
#[inline(always)]
unsafe fn value_sums<'a, V: Lanes, const G: usize, const R: usize>(
    hd: usize,
    blocks: impl Iterator<Item = (&'a [f16], [[&'a [f32]; G]; R])>,
    out: [&mut [f32]; R],
) {
    let op: [*mut f32; R] = out.map(|o| {
        o[..hd * G].fill(0.0);
        o.as_mut_ptr()
    });
    if one_pass::<V>(hd) {
        // The outputs stay in registers from the first block to the last.
        match V::VALUE_REGS {
            4 => resident::<V, G, R, 4>(hd, blocks, op),
            _ => resident::<V, G, R, 2>(hd, blocks, op),
        }
        return;
    }
    for (vb, p) in blocks {
        for at in (0..hd).step_by(V::VALUE_REGS * V::N) {
            let vp = vb.as_ptr().add(at);
            match ((hd - at) / V::N).min(V::VALUE_REGS) {
                4 => pass::<V, G, R, 4>(vp, hd, &p, op, at),
                3 => pass::<V, G, R, 3>(vp, hd, &p, op, at),
                2 => pass::<V, G, R, 2>(vp, hd, &p, op, at),
                _ => pass::<V, G, R, 1>(vp, hd, &p, op, at),
            }
        }
    }
}

/// [`value_sums`] where a head's outputs are `REGS` registers (`hd = REGS·N`): kept in
/// them over every block, stored at the end.
#[inline(always)]
unsafe fn resident<'a, V: Lanes, const G: usize, const R: usize, const REGS: usize>(
    hd: usize,
    blocks: impl Iterator<Item = (&'a [f16], [[&'a [f32]; G]; R])>,
    op: [*mut f32; R],
) {
    let mut a = [[[V::zero(); REGS]; G]; R];
    for (vb, p) in blocks {
        slots::<V, G, R, REGS>(vb.as_ptr(), hd, &p, &mut a);
    }
    sums_io::<V, G, R, REGS>(&mut a, op, hd, 0, true);
}

/// One pass of [`value_sums`] over a block: the `REGS·N` outputs a head from dimension
/// `at` (where `vp` starts in the block's values) loaded, summed over the block's slots,
/// stored back.
#[inline(always)]
unsafe fn pass<V: Lanes, const G: usize, const R: usize, const REGS: usize>(
    vp: *const f16,
    hd: usize,
    p: &[[&[f32]; G]; R],
    op: [*mut f32; R],
    at: usize,
) {
    let mut a = [[[V::zero(); REGS]; G]; R];
    sums_io::<V, G, R, REGS>(&mut a, op, hd, at, false);
    slots::<V, G, R, REGS>(vp, hd, p, &mut a);
    sums_io::<V, G, R, REGS>(&mut a, op, hd, at, true);
}

/// Loads (or, `store`, stores) the running sums of every row's heads' outputs
/// `at..at + REGS·N` from (into) `op`.
#[inline(always)]
unsafe fn sums_io<V: Lanes, const G: usize, const R: usize, const REGS: usize>(
    a: &mut [[[V; REGS]; G]; R],
    op: [*mut f32; R],
    hd: usize,
    at: usize,
    store: bool,
) {
    for (op, a) in op.iter().zip(a.iter_mut()) {
        for (g, a) in a.iter_mut().enumerate() {
            for (i, a) in a.iter_mut().enumerate() {
                let o = op.add(hd * g + at + i * V::N);
                match store {
                    true => a.store(o),
                    false => *a = V::load(o),
                }
            }
        }
    }
}

/// One block's slots into the running sums `a` (`REGS` registers a head, from the
/// dimension `vp` starts at): each value read and widened once for every row's heads.
///
/// # Safety
/// As [`value_sums`]; `vp` at a block's values, `REGS · N` dimensions of each slot
/// readable from it.
#[inline(always)]
unsafe fn slots<V: Lanes, const G: usize, const R: usize, const REGS: usize>(
    vp: *const f16,
    hd: usize,
    p: &[[&[f32]; G]; R],
    a: &mut [[[V; REGS]; G]; R],
) {
    let len = p.iter().map(|p| p[0].len()).max().unwrap_or(0);
    for s in 0..len {
        let mut v = [V::zero(); REGS];
        for (i, v) in v.iter_mut().enumerate() {
            *v = V::load_f16(vp.add(s * hd + i * V::N));
        }
        for (p, a) in p.iter().zip(a.iter_mut()) {
            if s < p[0].len() {
                for (pg, a) in p.iter().zip(a.iter_mut()) {
                    let wv = V::splat(*pg.get_unchecked(s));
                    for i in 0..REGS {
                        a[i] = wv.mul_add(v[i], a[i]);
                    }
                }
            }
        }
    }
}

/// Whether a head's `hd` outputs fit `V`'s value registers at once: then they stay in
/// registers from the first block to the last, else a block's running sums are loaded
/// from the outputs and stored back for each pass.
#[inline(always)]
fn one_pass<V: Lanes>(hd: usize) -> bool {
    V::VALUE_REGS * V::N == hd
}

impl HeadTask<'_> {
    /// [`HeadTask::run`] for `G` query heads a KV head, 16-slot blocks and heads a
    /// multiple of 16 wide:
    /// the heads' scores block by block, each key read once for all of them, then their
    /// softmaxes, then their outputs, each value read once. The same bits.
    ///
    /// # Safety
    /// `V`'s features; `self.group == G`, the cache's blocks hold 16 slots, `self.hd` a
    /// multiple of 16.
    #[inline(always)]
    unsafe fn run_grouped<V: Lanes, const G: usize>(
        &self,
        kv: &KvCache,
        qrow: &[f32],
        o: &mut [f32],
    ) {
        let (layer, kvh, hd) = (self.layer, self.kvh, self.hd);
        // From the block holding the first position seen, as `HeadTask::run`.
        let (blocks, n, off) = self.span(16);
        let mut scores = Scores::new(n * G);
        let mut block = [[0f32; 16]; G];
        assert!(qrow.len() >= G * hd && o.len() >= G * hd);
        for (bi, &blk) in blocks.iter().enumerate() {
            let (kb, _) = kv.head_block(layer, blk, kvh);
            assert!(kb.len() >= 16 * hd);
            scores16::<V, G>(qrow, hd, kb, &mut block);
            let (j0, len) = (bi * 16, 16.min(n - bi * 16));
            for g in 0..G {
                for (o, s) in scores[g * n + j0..][..len].iter_mut().zip(&block[g]) {
                    *o = s * self.scale;
                }
            }
        }
        for sg in scores.chunks_exact_mut(n) {
            self.weigh(sg, off);
        }
        let rows = blocks.iter().enumerate().map(|(bi, &blk)| {
            let (_, vb) = kv.head_block(layer, blk, kvh);
            let (j0, len) = (bi * 16, 16.min(n - bi * 16));
            assert!(vb.len() >= len * hd);
            (vb, [std::array::from_fn(|g| &scores[g * n + j0..][..len])])
        });
        V::value_sums::<G, 1>(hd, rows, [o]);
    }

    /// [`HeadTask::run_grouped`] for `R` consecutive rows of one sequence (a prompt's),
    /// row `r` over its first `self.n + r` positions: each key block is read once for
    /// all the rows' heads, and each value row once for two rows' (for groups of up to 3
    /// heads). Every row's output is the bits it gets alone.
    ///
    /// # Safety
    /// As [`HeadTask::run_grouped`]; each `q[r]` and `o[r]` hold `G·hd`.
    #[inline(always)]
    unsafe fn run_rows<V: Lanes, const G: usize, const R: usize>(
        &self,
        kv: &KvCache,
        q: [&[f32]; R],
        o: [&mut [f32]; R],
    ) {
        let (layer, kvh, hd) = (self.layer, self.kvh, self.hd);
        // From the block holding the first row's first position seen (the rows after it
        // see from there or later): row r's positions from there, and how many of them
        // (`off(r)`) it does not see.
        let b0 = self.lo(self.n) / 16;
        let n_of = |r: usize| self.n + r - b0 * 16;
        let off = |r: usize| self.lo(self.n + r) - b0 * 16;
        let n_max = n_of(R - 1);
        // Scores of query (r, g) at `((r·G + g)·n_max ..)[.. n_of(r)]`.
        let mut scores = Scores::new(R * G * n_max);
        let blocks = &self.table[b0..(self.n + R - 1).div_ceil(16)];
        let mut block = [[[0f32; 16]; G]; R];
        assert!(q.iter().all(|q| q.len() >= G * hd));
        assert!(o.iter().all(|o| o.len() >= G * hd));
        // The queries dimension by dimension, for `scores16_rows`.
        let mut qt = vec![0f32; R * G * hd];
        for (r, q) in q.iter().enumerate() {
            for g in 0..G {
                for (d, &x) in q[g * hd..(g + 1) * hd].iter().enumerate() {
                    qt[(d * R + r) * G + g] = x;
                }
            }
        }
        // Slots of block `bi` that row `r` attends to.
        let len = |r: usize, bi: usize| n_of(r).saturating_sub(bi * 16).min(16);
        for (bi, &blk) in blocks.iter().enumerate() {
            let (kb, _) = kv.head_block(layer, blk, kvh);
            assert!(kb.len() >= 16 * hd);
            scores16_rows::<V, G, R>(&qt, hd, kb, &mut block);
            for (r, br) in block.iter().enumerate() {
                let l = len(r, bi);
                for (g, bg) in br.iter().enumerate() {
                    let at = (r * G + g) * n_max + bi * 16;
                    for (o, s) in scores[at..at + l].iter_mut().zip(bg) {
                        *o = s * self.scale;
                    }
                }
            }
        }
        for r in 0..R {
            for g in 0..G {
                self.weigh(&mut scores[(r * G + g) * n_max..][..n_of(r)], off(r));
            }
        }
        let weights = |r: usize, bi: usize| -> [&[f32]; G] {
            let l = len(r, bi);
            std::array::from_fn(|g| &scores[(r * G + g) * n_max + bi * 16..][..l])
        };
        let values = |blk: u32| {
            let (_, vb) = kv.head_block(layer, blk, kvh);
            assert!(vb.len() >= 16 * hd);
            vb
        };
        let mut outs = o.into_iter();
        let mut r = 0;
        while r < R {
            // Two rows together where their accumulators fit the registers (VALUE_REGS·G
            // a row: 24 of AVX-512's 32 at G = 3, 12 of AVX2's 16).
            if G <= 3 && r + 1 < R {
                let (o0, o1) = (outs.next(), outs.next());
                let (Some(o0), Some(o1)) = (o0, o1) else {
                    unreachable!("R outputs")
                };
                let rows = blocks[..n_of(r + 1).div_ceil(16)]
                    .iter()
                    .enumerate()
                    .map(|(bi, &blk)| (values(blk), [weights(r, bi), weights(r + 1, bi)]));
                V::value_sums::<G, 2>(hd, rows, [o0, o1]);
                r += 2;
            } else {
                let Some(o0) = outs.next() else {
                    unreachable!("R outputs")
                };
                let rows = blocks[..n_of(r).div_ceil(16)]
                    .iter()
                    .enumerate()
                    .map(|(bi, &blk)| (values(blk), [weights(r, bi)]));
                V::value_sums::<G, 1>(hd, rows, [o0]);
                r += 1;
            }
        }
    }
}

/// One row's task of `G` query heads on `width`'s registers ([`HeadTask::run_grouped`]).
///
/// # Safety
/// The CPU has `width`'s features; `t.group == G`, the cache's blocks hold 16 slots,
/// `t.hd` a multiple of 16; `qrow` and `o` hold `G·hd`.
pub(super) unsafe fn run_one<const G: usize>(
    width: Width,
    t: &HeadTask,
    kv: &KvCache,
    qrow: &[f32],
    o: &mut [f32],
) {
    match width {
        Width::Avx512 => one_avx512::<G>(t, kv, qrow, o),
        Width::Avx2 => one_avx2::<G>(t, kv, qrow, o),
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn one_avx512<const G: usize>(t: &HeadTask, kv: &KvCache, qrow: &[f32], o: &mut [f32]) {
    t.run_grouped::<__m512, G>(kv, qrow, o)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_avx2<const G: usize>(t: &HeadTask, kv: &KvCache, qrow: &[f32], o: &mut [f32]) {
    t.run_grouped::<__m256, G>(kv, qrow, o)
}

/// One tile of `R` rows of a sequence and a KV head on `width`'s registers:
/// [`HeadTask::run_grouped`] for one row, else [`HeadTask::run_rows`]; row `r`'s query
/// is `q_of(r)`, its output `o[r]`.
///
/// # Safety
/// As [`run_one`] for each row; `o` holds `R` rows.
pub(super) unsafe fn run_tile<'q, const G: usize, const R: usize>(
    width: Width,
    t: &HeadTask,
    kv: &KvCache,
    q_of: impl Fn(usize) -> &'q [f32],
    o: Vec<&mut [f32]>,
) {
    match width {
        Width::Avx512 => tile_avx512::<G, R>(t, kv, q_of, o),
        Width::Avx2 => tile_avx2::<G, R>(t, kv, q_of, o),
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<'q, const G: usize, const R: usize>(
    t: &HeadTask,
    kv: &KvCache,
    q_of: impl Fn(usize) -> &'q [f32],
    o: Vec<&mut [f32]>,
) {
    tile::<__m512, G, R>(t, kv, q_of, o)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<'q, const G: usize, const R: usize>(
    t: &HeadTask,
    kv: &KvCache,
    q_of: impl Fn(usize) -> &'q [f32],
    o: Vec<&mut [f32]>,
) {
    tile::<__m256, G, R>(t, kv, q_of, o)
}

/// [`run_tile`] on `V`.
#[inline(always)]
unsafe fn tile<'q, V: Lanes, const G: usize, const R: usize>(
    t: &HeadTask,
    kv: &KvCache,
    q_of: impl Fn(usize) -> &'q [f32],
    o: Vec<&mut [f32]>,
) {
    let mut o = o;
    if R == 1 {
        let Some(o0) = o.pop() else {
            unreachable!("a tile of one row has its output")
        };
        return t.run_grouped::<V, G>(kv, q_of(0), o0);
    }
    let Ok(o) = <[&mut [f32]; R]>::try_from(o) else {
        unreachable!("a tile of {R} rows has {R} outputs")
    };
    t.run_rows::<V, G, R>(kv, std::array::from_fn(q_of), o)
}
