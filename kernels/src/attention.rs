//! Attention on the CPU: causal grouped-query attention of every row's query over its
//! sequence's paged KV cache (positions 0..=its own), one task per (row, KV head) so that
//! the query heads sharing a KV head read its keys and values from cache together.
//!
//! A task scores one KV block at a time (keys are stored dim-major within a block, so a
//! block's scores build up in registers across the key dimensions), takes the softmax,
//! then sums the values weighted by it. Keys and values are f16 in the cache, widened to
//! f32 (exactly) as they are read. For the common shapes (16-slot blocks, heads a
//! multiple of 16 wide), on AVX-512 and AVX2 ([`grouped`], one source for both widths), a
//! task's query heads go together (in runs of up to 4), and a prompt's rows go in tiles of
//! up to four ([`ROW_TILE`]) for each KV head: each key block is read and widened once for
//! the tile's rows and heads, each value row once for two rows. Other shapes take a task's
//! heads one at a time, with AVX2/FMA/F16C loops for 16-slot blocks' scores and 64-wide
//! heads' values. The portable loops do the same operations in the same order, so every
//! path gives every row the bits it gets alone.

use crate::forward::Batch;
use crate::kv::KvCache;
use crate::matmul::Acts;
use crate::model::LlamaConfig;
use crate::ops;
use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod grouped;

/// Partial sums a block's scores are split into over the key dimensions (dimension `d`
/// goes to sum `d % PARTS`), so that the multiply-adds do not wait on each other; they are
/// combined as `(s0 + s1) + (s2 + s3)`.
const PARTS: usize = 4;

/// One block's attention scores for one query head (unscaled): `out[s] = q · k_s` for its
/// first `out.len()` slots; keys dim-major (`kb[d·bs + s]`, `bs` = `BS`, or `bs` for
/// `BS = 0`).
fn block_scores<const BS: usize>(q: &[f32], kb: &[f16], bs: usize, out: &mut [f32]) {
    let bs = if BS == 0 { bs } else { BS };
    let n = out.len();
    let mut acc = [[0f32; 32]; PARTS];
    let mut rest = vec![[0f32; PARTS]; if bs > 32 { n } else { 0 }];
    for (d, &qv) in q.iter().enumerate() {
        let kd = &kb[d * bs..d * bs + n];
        if bs <= 32 {
            for (a, k) in acc[d % PARTS].iter_mut().zip(kd) {
                *a = qv.mul_add(k.to_f32(), *a);
            }
        } else {
            for (a, k) in rest.iter_mut().zip(kd) {
                a[d % PARTS] = qv.mul_add(k.to_f32(), a[d % PARTS]);
            }
        }
    }
    for (s, o) in out.iter_mut().enumerate() {
        let p = if bs <= 32 {
            [acc[0][s], acc[1][s], acc[2][s], acc[3][s]]
        } else {
            rest[s]
        };
        *o = (p[0] + p[1]) + (p[2] + p[3]);
    }
}

/// `out = Σ p_s · v_s` over `(values, weights)` blocks (values slot-major, `out.len()` per
/// slot), slot by slot in order.
fn weighted_values<'a>(blocks: impl Iterator<Item = (&'a [f16], &'a [f32])>, out: &mut [f32]) {
    let hd = out.len();
    out.fill(0.0);
    for (vb, p) in blocks {
        for (s, &w) in p.iter().enumerate() {
            for (a, b) in out.iter_mut().zip(&vb[s * hd..(s + 1) * hd]) {
                *a = w.mul_add(b.to_f32(), *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::PARTS;
    use half::f16;
    use std::arch::x86_64::*;

    /// Eight f16 at `p`, widened to f32.
    ///
    /// # Safety
    /// F16C; `p..p+8` readable.
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// [`super::block_scores`] for 16-slot blocks.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `kb.len() ≥ 16·q.len()`, `q.len()` a multiple of 4,
    /// `out.len() ≤ 16`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores16(q: &[f32], kb: &[f16], out: &mut [f32]) {
        let mut a = [_mm256_setzero_ps(); 2 * PARTS];
        let kp = kb.as_ptr();
        for d in (0..q.len()).step_by(PARTS) {
            for j in 0..PARTS {
                let qv = _mm256_set1_ps(*q.get_unchecked(d + j));
                let k = kp.add((d + j) * 16);
                a[2 * j] = _mm256_fmadd_ps(qv, load8(k), a[2 * j]);
                a[2 * j + 1] = _mm256_fmadd_ps(qv, load8(k.add(8)), a[2 * j + 1]);
            }
        }
        let mut s = [0f32; 16];
        for h in 0..2 {
            let v = _mm256_add_ps(
                _mm256_add_ps(a[h], a[2 + h]),
                _mm256_add_ps(a[4 + h], a[6 + h]),
            );
            _mm256_storeu_ps(s.as_mut_ptr().add(8 * h), v);
        }
        let n = out.len();
        out.copy_from_slice(&s[..n]);
    }

    /// [`super::weighted_values`] for 64-wide heads: the sum stays in eight registers.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `out.len() == 64`; each block's values hold 64 per weight.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn values64<'a>(
        blocks: impl Iterator<Item = (&'a [f16], &'a [f32])>,
        out: &mut [f32],
    ) {
        let mut a = [_mm256_setzero_ps(); 8];
        for (vb, p) in blocks {
            let vp = vb.as_ptr();
            for (s, &w) in p.iter().enumerate() {
                let wv = _mm256_set1_ps(w);
                let v = vp.add(s * 64);
                for i in 0..8 {
                    a[i] = _mm256_fmadd_ps(wv, load8(v.add(8 * i)), a[i]);
                }
            }
        }
        for i in 0..8 {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), a[i]);
        }
    }
}

thread_local! {
    /// This thread's buffer for a task's scores, kept from one task to the next
    /// ([`Scores`]).
    static SCORES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A task's scores, in this thread's buffer: taken for the task and given back when it
/// ends, so that a long prompt's tasks (a 4,096-token prompt's tile of rows holds 190 KB of
/// scores) neither allocate nor zero their scores each. What it holds at first is
/// unspecified (NaN in debug builds, so that a test reading a score not written fails):
/// every task writes each score it reads.
struct Scores(Vec<f32>);

impl Scores {
    fn new(len: usize) -> Scores {
        let mut v = SCORES.take();
        v.resize(len, 0.0);
        if cfg!(debug_assertions) {
            v.fill(f32::NAN);
        }
        Scores(v)
    }
}

impl std::ops::Deref for Scores {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for Scores {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl Drop for Scores {
    fn drop(&mut self) {
        // Two alive at once on a thread (none are today) each have their own; the one
        // dropped last is kept.
        SCORES.set(std::mem::take(&mut self.0));
    }
}

/// One (row, KV head) task of [`attention`]: the `group` query heads that share KV head
/// `kvh`, over the row's first `n` positions (its last `window` of them, where the layer
/// has a sliding window).
struct HeadTask<'a> {
    layer: usize,
    kvh: usize,
    group: usize,
    hd: usize,
    scale: f32,
    n: usize,
    table: &'a [u32],
    window: Option<usize>,
    /// Gemma 2's soft cap on the scaled scores ([`LlamaConfig::attn_softcap`]).
    cap: Option<f32>,
}

impl HeadTask<'_> {
    /// The first position a row attending over its first `n` positions sees.
    #[inline(always)]
    fn lo(&self, n: usize) -> usize {
        self.window.map_or(0, |w| n.saturating_sub(w))
    }

    /// The row's blocks from the one holding its first position seen (`bs`-slot blocks),
    /// the positions from there to its last (`n`), and how many of those, at the start, it
    /// does not see (`off`).
    #[inline(always)]
    fn span(&self, bs: usize) -> (&[u32], usize, usize) {
        let lo = self.lo(self.n);
        let b0 = lo / bs;
        (
            &self.table[b0..self.n.div_ceil(bs)],
            self.n - b0 * bs,
            lo - b0 * bs,
        )
    }

    /// A row's scaled scores `s` (from the start of the block holding its first position
    /// seen, which is `off` slots in) into its softmax weights: capped where the layer caps
    /// them, the softmax over the positions seen, the `off` before them weighted 0.
    #[inline(always)]
    fn weigh(&self, s: &mut [f32], off: usize) {
        if let Some(cap) = self.cap {
            ops::softcap(&mut s[off..], cap);
        }
        ops::softmax(&mut s[off..]);
        s[..off].fill(0.0);
    }

    /// [`HeadTask::run`] compiled for AVX2 and FMA, with the intrinsic inner loops where
    /// the shapes fit. The arithmetic, and so the result, is the same as without them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, kv: &KvCache, qrow: &[f32], o: &mut [f32]) {
        self.run::<true>(kv, qrow, o)
    }

    #[inline(always)]
    fn run<const AVX2: bool>(&self, kv: &KvCache, qrow: &[f32], o: &mut [f32]) {
        let (layer, kvh, group, hd, scale) =
            (self.layer, self.kvh, self.group, self.hd, self.scale);
        // From the block holding the first position seen.
        let bs = kv.block_size;
        let (blocks, n, off) = self.span(bs);
        let mut scores = Scores::new(n * group);
        for g in 0..group {
            let qg = &qrow[g * hd..(g + 1) * hd];
            let sg = &mut scores[g * n..(g + 1) * n];
            for (bi, &blk) in blocks.iter().enumerate() {
                let (kb, _) = kv.head_block(layer, blk, kvh);
                let j0 = bi * bs;
                let out = &mut sg[j0..j0 + bs.min(n - j0)];
                match bs {
                    #[cfg(target_arch = "x86_64")]
                    16 if AVX2 && hd % PARTS == 0 => {
                        assert!(kb.len() >= 16 * hd);
                        // SAFETY: AVX2/FMA/F16C (this is the AVX2 build); sizes asserted above
                        // (`out` is at most one block).
                        unsafe { avx2::scores16(qg, kb, out) }
                    }
                    16 => block_scores::<16>(qg, kb, bs, out),
                    32 => block_scores::<32>(qg, kb, bs, out),
                    _ => block_scores::<0>(qg, kb, bs, out),
                }
                for o in out.iter_mut() {
                    *o *= scale;
                }
            }
            self.weigh(sg, off);
        }
        for g in 0..group {
            let p = &scores[g * n..(g + 1) * n];
            let og = &mut o[g * hd..(g + 1) * hd];
            let rows = blocks.iter().enumerate().map(|(bi, &blk)| {
                let (_, vb) = kv.head_block(layer, blk, kvh);
                let j0 = bi * bs;
                let p = &p[j0..j0 + bs.min(n - j0)];
                assert!(vb.len() >= p.len() * hd);
                (vb, p)
            });
            #[cfg(target_arch = "x86_64")]
            if AVX2 && hd == 64 {
                // SAFETY: AVX2/FMA/F16C (this is the AVX2 build); `og` is 64 wide and each
                // block's values cover its weights (asserted as they are produced).
                unsafe { avx2::values64(rows, og) };
                continue;
            }
            weighted_values(rows, og);
        }
    }
}

/// The registers [`grouped`]'s loops run in, for a task's query heads together and a
/// prompt's rows in tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Width {
    /// 256-bit (AVX2, FMA, F16C).
    Avx2,
    /// 512-bit (AVX-512F).
    Avx512,
}

impl Width {
    /// The widest this CPU has (and `TOLLGATE_SIMD` / `TOLLGATE_NO_SIMD` allow), if any.
    fn here() -> Option<Width> {
        if crate::quant::has_avx512() {
            Some(Width::Avx512)
        } else if cfg!(target_arch = "x86_64") && crate::quant::has_avx2() {
            Some(Width::Avx2)
        } else {
            None
        }
    }
}

/// Causal grouped-query attention of every row's query (`q`: rows × heads × head_dim)
/// over its sequence's cached keys and values (the last [`LlamaConfig::window_at`] of
/// them, where `layer` has a sliding window), into `out`.
pub(crate) fn attention(
    c: &LlamaConfig,
    layer: usize,
    batch: &Batch,
    row_seq: &[usize],
    q: &[f32],
    kv: &KvCache,
    out: &mut Acts,
) {
    attention_on(Width::here(), c, layer, batch, row_seq, q, kv, out)
}

/// [`attention`] with the grouped loops on `width`'s registers where the shapes fit
/// (16-slot blocks, heads a multiple of 16 wide; a KV head's query heads in runs of 1–4,
/// `head_runs`), else (or for `None`) each query head on its own. Every row's output is
/// the same bits either way.
#[allow(clippy::too_many_arguments)]
fn attention_on(
    width: Option<Width>,
    c: &LlamaConfig,
    layer: usize,
    batch: &Batch,
    row_seq: &[usize],
    q: &[f32],
    kv: &KvCache,
    out: &mut Acts,
) {
    let (hd, qd) = (c.head_dim, c.n_heads * c.head_dim);
    let group = c.n_heads / c.n_kv_heads;
    let scale = c.attention_scale();
    let gw = group * hd; // output width of one task
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let width = width.filter(|_| kv.block_size == 16 && hd % 16 == 0 && group >= 1);
    #[cfg(target_arch = "x86_64")]
    if let Some(w) = width {
        let tiles = row_tiles(batch, row_seq);
        if tiles.len() < row_seq.len() {
            let n = row_seq.len() * qd;
            attention_rows(
                w,
                c,
                layer,
                batch,
                row_seq,
                q,
                kv,
                &mut out.f32[..n],
                &tiles,
            );
            out.touched();
            return;
        }
    }
    out.f32
        .par_chunks_mut(gw)
        .enumerate()
        .for_each(|(task, o)| {
            let (r, kvh) = (task / c.n_kv_heads, task % c.n_kv_heads);
            let pos = batch.positions[r] as usize;
            let table = batch.seqs[row_seq[r]].table(kv, layer);
            let qrow = &q[r * qd + kvh * gw..r * qd + (kvh + 1) * gw];
            let t = HeadTask {
                layer,
                kvh,
                group,
                hd,
                scale,
                n: pos + 1,
                table,
                window: c.window_at(layer),
                cap: c.attn_softcap,
            };
            #[cfg(target_arch = "x86_64")]
            if let Some(w) = width {
                for (h0, hn) in head_runs(group) {
                    let (q, o) = (&qrow[h0 * hd..][..hn * hd], &mut o[h0 * hd..][..hn * hd]);
                    // SAFETY: the CPU has `w`'s features (`Width::here`, or a test's choice
                    // among them); G is the run's heads, the blocks and heads the sizes the
                    // grouped loops take (`width` filtered above).
                    unsafe {
                        match hn {
                            1 => grouped::run_one::<1>(w, &t, kv, q, o),
                            2 => grouped::run_one::<2>(w, &t, kv, q, o),
                            3 => grouped::run_one::<3>(w, &t, kv, q, o),
                            4 => grouped::run_one::<4>(w, &t, kv, q, o),
                            _ => unreachable!("runs of 1-4 heads"),
                        }
                    }
                }
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if crate::quant::has_avx2() {
                // SAFETY: AVX2, FMA and F16C detected.
                return unsafe { t.run_avx2(kv, qrow, o) };
            }
            t.run::<false>(kv, qrow, o);
        });
    out.touched();
}

/// A KV head's `group` query heads in runs of 1–4 for the grouped loops, as even as they
/// go (7 as 3 and 4, 8 as 4 and 4): `(first head, heads)`. Each run reads the KV head's
/// keys and values once for its heads; every head's sums are its own either way.
#[cfg(target_arch = "x86_64")]
fn head_runs(group: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = group.div_ceil(4);
    (0..n).map(move |i| (i * group / n, (i + 1) * group / n - i * group / n))
}

/// Rows of one sequence that attend together (a prompt's, up to this many).
#[cfg(target_arch = "x86_64")]
const ROW_TILE: usize = 4;

/// The batch's rows in runs of up to [`ROW_TILE`] consecutive rows of one sequence at
/// consecutive positions: `(first row, rows)`, in row order.
#[cfg(target_arch = "x86_64")]
fn row_tiles(batch: &Batch, row_seq: &[usize]) -> Vec<(usize, usize)> {
    let mut tiles: Vec<(usize, usize)> = Vec::new();
    for (r, &sq) in row_seq.iter().enumerate() {
        match tiles.last_mut() {
            Some((r0, n))
                if *n < ROW_TILE
                    && row_seq[*r0] == sq
                    && batch.positions[r] as usize == batch.positions[*r0] as usize + *n =>
            {
                *n += 1
            }
            _ => tiles.push((r, 1)),
        }
    }
    tiles
}

/// [`attention_on`] with a prompt's rows together: one task per (tile of rows, KV head),
/// each key and value read once for the tile's rows. The same bits per row.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn attention_rows(
    width: Width,
    c: &LlamaConfig,
    layer: usize,
    batch: &Batch,
    row_seq: &[usize],
    q: &[f32],
    kv: &KvCache,
    out: &mut [f32],
    tiles: &[(usize, usize)],
) {
    let (hd, qd, n_kv) = (c.head_dim, c.n_heads * c.head_dim, c.n_kv_heads);
    let group = c.n_heads / n_kv;
    let gw = group * hd;
    let scale = c.attention_scale();
    // Each task's output rows: row r0 + i's columns of its KV head.
    let mut tasks = Vec::with_capacity(tiles.len() * n_kv);
    let mut rows = out.chunks_mut(qd);
    for &(r0, n) in tiles {
        let mut outs: Vec<Vec<&mut [f32]>> = (0..n_kv).map(|_| Vec::with_capacity(n)).collect();
        for row in rows.by_ref().take(n) {
            for (o, part) in outs.iter_mut().zip(row.chunks_mut(gw)) {
                o.push(part);
            }
        }
        tasks.extend(outs.into_iter().enumerate().map(|(kvh, o)| (r0, kvh, o)));
    }
    // A KV head's tiles next to each other: a thread's run of tasks reads one head's keys
    // and values (a long prompt's 1 MB a head fit the core's cache; all heads' do not).
    tasks.sort_by_key(|&(r0, kvh, _)| (kvh, r0));
    tasks.into_par_iter().for_each(|(r0, kvh, mut o)| {
        let t = HeadTask {
            layer,
            kvh,
            group,
            hd,
            scale,
            n: batch.positions[r0] as usize + 1,
            table: batch.seqs[row_seq[r0]].table(kv, layer),
            window: c.window_at(layer),
            cap: c.attn_softcap,
        };
        for (h0, hn) in head_runs(group) {
            let q_of = |i: usize| &q[(r0 + i) * qd + kvh * gw + h0 * hd..][..hn * hd];
            let o: Vec<&mut [f32]> = o.iter_mut().map(|o| &mut o[h0 * hd..][..hn * hd]).collect();
            macro_rules! tile {
                ($($g:literal, $r:literal);*) => {
                    match (hn, o.len()) {
                        // SAFETY: the CPU has `width`'s features; the run's heads are G, the
                        // cache's blocks 16 slots and the heads a multiple of 16 wide
                        // (checked by `attention_on`); each query and output row holds G·hd.
                        $(($g, $r) => unsafe { grouped::run_tile::<$g, $r>(width, &t, kv, q_of, o) },)*
                        _ => unreachable!("runs of 1-4 heads, tiles of 1-{ROW_TILE} rows"),
                    }
                };
            }
            tile!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4; 3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand;

    fn half(v: Vec<f32>) -> Vec<f16> {
        v.into_iter().map(f16::from_f32).collect()
    }

    /// Three blocks of 16 × 64 values and their weights (the last block part full).
    fn value_blocks() -> (Vec<Vec<f16>>, Vec<Vec<f32>>) {
        let vals = (0..3).map(|i| half(rand(16 * 64, 10 + i))).collect();
        let ws = (0..3)
            .map(|i| rand(if i == 2 { 5 } else { 16 }, 20 + i))
            .collect();
        (vals, ws)
    }

    #[test]
    fn the_portable_loops_give_plain_sums() {
        let (q, kb) = (rand(64, 1), half(rand(16 * 64, 2)));
        for n in [1, 7, 16] {
            let (mut a, mut c) = (vec![0f32; n], vec![0f32; n]);
            block_scores::<16>(&q, &kb, 16, &mut a);
            block_scores::<0>(&q, &kb, 16, &mut c);
            assert_eq!(a, c, "any-size loop, {n} slots");
            for (j, got) in a.iter().enumerate() {
                let want: f64 = (0..64).map(|d| q[d] as f64 * kb[d * 16 + j].to_f64()).sum();
                assert!(
                    (*got as f64 - want).abs() < 1e-5,
                    "score {j}: {got} vs {want}"
                );
            }
        }
        let (vals, ws) = value_blocks();
        let blocks = || {
            vals.iter()
                .zip(&ws)
                .map(|(v, w)| (v.as_slice(), w.as_slice()))
        };
        let mut a = vec![0f32; 64];
        weighted_values(blocks(), &mut a);
        for (s, got) in a.iter().enumerate() {
            let want: f64 = blocks()
                .flat_map(|(v, w)| (0..w.len()).map(move |j| w[j] as f64 * v[j * 64 + s].to_f64()))
                .sum();
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_loops_give_the_portable_loops_bits() {
        if crate::quant::simd_path() == "scalar" {
            eprintln!("SKIPPED: no AVX2/FMA on this CPU");
            return;
        }
        let (q, kb) = (rand(64, 1), half(rand(16 * 64, 2)));
        for n in [1, 7, 16] {
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            block_scores::<16>(&q, &kb, 16, &mut a);
            // SAFETY: AVX2/FMA detected; kb is 16 × 64, q 64 wide, n ≤ 16.
            unsafe { avx2::scores16(&q, &kb, &mut b) };
            assert_eq!(a, b, "scores of {n} slots");
        }
        let (vals, ws) = value_blocks();
        let blocks = || {
            vals.iter()
                .zip(&ws)
                .map(|(v, w)| (v.as_slice(), w.as_slice()))
        };
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        weighted_values(blocks(), &mut a);
        // SAFETY: AVX2/FMA detected; 64-wide output, each block holds 16 × 64 values.
        unsafe { avx2::values64(blocks(), &mut b) };
        assert_eq!(a, b);
    }

    /// A one-layer cache of `heads` KV heads `hd` wide in `n_blocks` blocks of 16, with
    /// positions `0..n` of `table` written: random keys (seeds `seed + pos`) and values
    /// (`seed + 100 + pos`).
    #[cfg(target_arch = "x86_64")]
    fn cache_with(
        heads: usize,
        hd: usize,
        n_blocks: usize,
        table: &[u32],
        n: usize,
        seed: u64,
    ) -> KvCache {
        let kvd = heads * hd;
        let mut kv = KvCache::new(1, heads, kvd, 16, n_blocks);
        for pos in 0..n as u64 {
            let (k, v) = (rand(kvd, seed + pos), rand(kvd, seed + 100 + pos));
            kv.write(0, table, pos as usize, &k, &v);
        }
        kv
    }

    /// The grouped loops' widths this CPU runs (each one missing said).
    #[cfg(target_arch = "x86_64")]
    fn widths() -> Vec<Width> {
        let mut w = Vec::new();
        match crate::quant::has_avx512() {
            true => w.push(Width::Avx512),
            false => eprintln!("SKIPPED for AVX-512: not on this CPU"),
        }
        match crate::quant::has_avx2() {
            true => w.push(Width::Avx2),
            false => eprintln!("SKIPPED for AVX2: not on this CPU"),
        }
        w
    }

    /// A whole task (two KV heads, 37 positions over three blocks in a shuffled table)
    /// on each width gives the portable task's bits: three query heads a KV head 64 wide
    /// (SmolLM2's), four 128 wide (Llama-3-8B's), one 96 wide (Phi-3's), two 80 wide.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_grouped_task_gives_the_portable_tasks_bits() {
        fn check<const G: usize>(w: Width, hd: usize) {
            let (heads, n) = (2, 37);
            let table = [3u32, 0, 4];
            let kv = cache_with(heads, hd, 5, &table, n, 100);
            // No window; windows from inside the first block and past it, one capped.
            let windows = [(None, None), (Some(30), None), (Some(5), Some(0.5))];
            for ((window, cap), kvh) in windows
                .into_iter()
                .flat_map(|w| (0..heads).map(move |h| (w, h)))
            {
                let t = HeadTask {
                    layer: 0,
                    kvh,
                    group: G,
                    hd,
                    scale: 0.125,
                    n,
                    table: &table,
                    window,
                    cap,
                };
                let q = rand(G * hd, 7 + kvh as u64);
                let (mut want, mut got) = (vec![0f32; G * hd], vec![0f32; G * hd]);
                t.run::<false>(&kv, &q, &mut want);
                // SAFETY: the CPU has `w`'s features; G query heads, 16-slot blocks, heads
                // a multiple of 16 wide.
                unsafe { grouped::run_one::<G>(w, &t, &kv, &q, &mut got) };
                assert_eq!(
                    got, want,
                    "{w:?}, G {G}, {hd} wide, KV head {kvh}, window {window:?}"
                );
            }
        }
        for w in widths() {
            check::<3>(w, 64);
            check::<4>(w, 128);
            // Phi-3's heads (96: AVX-512 in a pass of 64 and one of 32) and 80-wide ones
            // (64 and 16).
            check::<1>(w, 96);
            check::<2>(w, 80);
        }
    }

    /// A prompt's rows together on each width (2-4 rows, groups of 1, 3 and 4 heads 64
    /// wide, of 2 and 4 heads 128 wide, of 1 and 2 heads 96 wide and of 3 heads 80 wide,
    /// rows ending on both sides of a block's edge,
    /// stale values in the slots past them): each row's output is the portable task's
    /// bits for that row alone.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rows_together_give_each_rows_portable_bits() {
        fn check<const G: usize, const R: usize>(w: Width, hd: usize, n0: usize) {
            let heads = 2;
            let table = [5u32, 1, 3, 0];
            // Every slot of the table's blocks written (those past a row's end too).
            let kv = cache_with(heads, hd, 6, &table, 64, 300);
            // No window; windows whose rows start in different blocks, one capped.
            let windows = [(None, None), (Some(18), None), (Some(3), Some(0.5))];
            for ((window, cap), kvh) in windows
                .into_iter()
                .flat_map(|w| (0..heads).map(move |h| (w, h)))
            {
                let t = HeadTask {
                    layer: 0,
                    kvh,
                    group: G,
                    hd,
                    scale: 0.125,
                    n: n0,
                    table: &table,
                    window,
                    cap,
                };
                let qs: Vec<Vec<f32>> = (0..R)
                    .map(|r| rand(G * hd, 50 + (10 * kvh + r) as u64))
                    .collect();
                let mut got = vec![vec![0f32; G * hd]; R];
                let outs: Vec<&mut [f32]> = got.iter_mut().map(|o| o.as_mut_slice()).collect();
                // SAFETY: the CPU has `w`'s features; G heads, 16-slot blocks, heads a
                // multiple of 16 wide.
                unsafe { grouped::run_tile::<G, R>(w, &t, &kv, |r| &qs[r][..], outs) };
                for (r, got) in got.iter().enumerate() {
                    let alone = HeadTask { n: n0 + r, ..t };
                    let mut want = vec![0f32; G * hd];
                    alone.run::<false>(&kv, &qs[r], &mut want);
                    assert_eq!(
                        got, &want,
                        "{w:?}, G {G}, {hd} wide, row {r} of {R} from n {n0}, KV head {kvh}, window {window:?}"
                    );
                }
            }
        }
        for w in widths() {
            for n0 in [1, 14, 16, 30, 45] {
                check::<1, 4>(w, 64, n0);
                check::<3, 2>(w, 64, n0);
                check::<3, 3>(w, 64, n0);
                check::<3, 4>(w, 64, n0);
                check::<4, 3>(w, 64, n0);
                check::<4, 2>(w, 128, n0);
                check::<4, 4>(w, 128, n0);
                check::<2, 3>(w, 128, n0);
                check::<1, 4>(w, 96, n0);
                check::<2, 2>(w, 96, n0);
                check::<3, 3>(w, 80, n0);
            }
        }
    }

    /// A whole step's attention at SmolLM2's shape (9 query heads on 3 KV heads, 64
    /// wide), at Llama-3-8B's (heads 128 wide in groups of 4; 8 on 2 here) and at
    /// Qwen2.5-0.5B's (14 on 2, 64 wide: groups of 7, in runs of 3 and 4), at Phi-3's (a
    /// KV head a query head, 96 wide; 4 here) and with 80-wide heads: a prompt of 11
    /// rows from position 5 (tiles of 4, 4 and 3 where the grouped loops run) beside
    /// one-row sequences, then the one-row sequences alone, on each width and with none;
    /// every row's output is its portable task's alone.
    #[test]
    fn a_steps_rows_each_get_their_portable_tasks_bits() {
        for prompt in [true, false] {
            check_step(9, 3, 64, prompt, None);
            check_step(8, 2, 128, prompt, None);
            check_step(14, 2, 64, prompt, None);
            check_step(4, 4, 96, prompt, None);
            check_step(6, 2, 80, prompt, None);
        }
    }

    #[test]
    fn a_sliding_window_and_a_soft_cap_keep_every_paths_bits_and_attend_as_written() {
        // Windows that start inside the first block, past it, and cover everything; with
        // Gemma 2's cap on the scores and without.
        for (window, cap) in [(3, None), (12, Some(0.5)), (1, None), (64, Some(0.5))] {
            check_step(9, 3, 64, true, Some((window, cap)));
            check_step(8, 2, 128, true, Some((window, cap)));
            check_step(4, 4, 96, true, Some((window, cap)));
        }
    }

    /// Row `pos`'s attention for query head `h` (`qh`) over its sequence's cache at
    /// `table`, in f64 from the definition: its last `window` positions, scores scaled
    /// and capped, softmax, values weighted.
    fn naive(
        c: &LlamaConfig,
        kv: &KvCache,
        table: &[u32],
        pos: usize,
        h: usize,
        qh: &[f32],
    ) -> Vec<f64> {
        let (hd, bs) = (c.head_dim, kv.block_size);
        let kvh = h / (c.n_heads / c.n_kv_heads);
        let lo = c.window_at(0).map_or(0, |w| (pos + 1).saturating_sub(w));
        let scores: Vec<f64> = (lo..=pos)
            .map(|j| {
                let (kb, _) = kv.head_block(0, table[j / bs], kvh);
                let s: f64 = (0..hd)
                    .map(|d| qh[d] as f64 * kb[d * bs + j % bs].to_f64())
                    .sum::<f64>()
                    * c.attention_scale() as f64;
                c.attn_softcap
                    .map_or(s, |cap| cap as f64 * (s / cap as f64).tanh())
            })
            .collect();
        let m = scores.iter().copied().fold(f64::MIN, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f64 = w.iter().sum();
        (0..hd)
            .map(|d| {
                (lo..=pos)
                    .zip(&w)
                    .map(|(j, p)| {
                        let (_, vb) = kv.head_block(0, table[j / bs], kvh);
                        p / sum * vb[(j % bs) * hd + d].to_f64()
                    })
                    .sum()
            })
            .collect()
    }

    /// [`a_steps_rows_each_get_their_portable_tasks_bits`] for `n_heads` query heads on
    /// `n_kv` KV heads `hd` wide, with the prompt's 11 rows or without, and a sliding
    /// window (and soft cap) where given: then each row is also checked against
    /// [`naive`].
    fn check_step(
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        prompt: bool,
        window: Option<(usize, Option<f32>)>,
    ) {
        let c = LlamaConfig {
            n_layers: 1,
            dim: n_heads * hd,
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
            vocab: 100,
            rope_base: 1e4,
            context_len: 256,
            window: window.map(|(size, _)| crate::model::SlidingWindow {
                size,
                period: 0,
                rope_base: None,
            }),
            attn_softcap: window.and_then(|(_, cap)| cap),
            ..LlamaConfig::smollm2_135m()
        };
        let (kvd, qd, group) = (n_kv * hd, n_heads * hd, n_heads / n_kv);
        let mut kv = KvCache::new(1, n_kv, kvd, 16, 8);
        let tables: [Vec<u32>; 3] = [vec![2, 6], vec![0, 5, 7], vec![1]];
        for (i, table) in tables.iter().enumerate() {
            for pos in 0..16 * table.len() {
                let seed = 1000 * i as u64 + pos as u64;
                kv.write(0, table, pos, &rand(kvd, seed), &rand(kvd, seed + 500));
            }
        }
        let mut batch = Batch::default();
        let mut row_seq = Vec::new();
        batch.push(&[1], 20, tables[0].clone(), true);
        row_seq.push(0);
        if prompt {
            batch.push(&[2; 11], 5, tables[1].clone(), true);
            row_seq.extend([1; 11]);
        }
        batch.push(&[3], 9, tables[2].clone(), true);
        row_seq.push(batch.seqs.len() - 1);
        let rows = row_seq.len();
        let q = rand(rows * qd, 77);
        #[allow(unused_mut)]
        let mut widths_here = vec![None];
        #[cfg(target_arch = "x86_64")]
        widths_here.extend(widths().into_iter().map(Some));
        for w in widths_here {
            let mut out = Acts::default();
            out.resize(rows, qd);
            attention_on(w, &c, 0, &batch, &row_seq, &q, &kv, &mut out);
            for r in 0..rows {
                for kvh in 0..n_kv {
                    let t = HeadTask {
                        layer: 0,
                        kvh,
                        group,
                        hd,
                        scale: 1.0 / (hd as f32).sqrt(),
                        n: batch.positions[r] as usize + 1,
                        table: &batch.seqs[row_seq[r]].block_table,
                        window: c.window_at(0),
                        cap: c.attn_softcap,
                    };
                    let at = r * qd + kvh * group * hd;
                    let mut want = vec![0f32; group * hd];
                    t.run::<false>(&kv, &q[at..at + group * hd], &mut want);
                    assert_eq!(
                        &out.f32[at..at + group * hd],
                        &want[..],
                        "{w:?}, {n_heads} heads on {n_kv}, {hd} wide, row {r} of {rows}, KV head {kvh}"
                    );
                    if window.is_none() {
                        continue;
                    }
                    for g in 0..group {
                        let h = kvh * group + g;
                        let exact =
                            naive(&c, &kv, t.table, t.n - 1, h, &q[r * qd + h * hd..][..hd]);
                        for (d, e) in exact.iter().enumerate() {
                            let got = want[g * hd + d] as f64;
                            assert!(
                                (got - e).abs() < 1e-4,
                                "{window:?}: row {r} head {h} dim {d}: {got} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}
