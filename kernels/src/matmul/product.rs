//! The products: [`matmul`] over the thread pool, each output row range a task, by the
//! packed kernels where the CPU has them, else the block kernels, the weights' offsets added
//! after where the kernels do not take them in; and the f32 reference they are tested
//! against ([`matmul_reference`]).

use super::*;

/// Writes to disjoint parts of one output buffer from several threads.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of indices (its own output columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Pointer to element `i` (a method, so closures capture the whole `Sync` wrapper).
    #[inline]
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers pass indices inside the output buffer (asserted by `matmul`).
        unsafe { self.0.add(i) }
    }
}

/// Activations prepared for one product with quantized weights, in the chosen precision.
enum Prepared<'a> {
    Q8 {
        q8: &'a [Q8Block],
        nb: usize,
    },
    I16 {
        q: &'a [i16],
        d: &'a [f32],
        sums: &'a [f32],
        cols: usize,
        nb: usize,
    },
    F32 {
        x: &'a [f32],
        sums: &'a [f32],
        cols: usize,
        nb: usize,
    },
}

impl Prepared<'_> {
    /// Weight row `wr` · activation rows `b0 .. b0 + R`.
    #[inline]
    fn tile<const R: usize>(&self, ty: GgmlType, wr: &[u8], b0: usize) -> [f32; R] {
        let rows: [usize; R] = std::array::from_fn(|k| b0 + k);
        match *self {
            Prepared::Q8 { q8, nb } => {
                quant::dot_q8_rows(ty, wr, rows.map(|b| &q8[b * nb..(b + 1) * nb]))
            }
            Prepared::I16 {
                q,
                d,
                sums,
                cols,
                nb,
            } => quant::dot_i16_rows(
                ty,
                wr,
                rows.map(|b| &q[b * cols..(b + 1) * cols]),
                rows.map(|b| &d[b * nb..(b + 1) * nb]),
                rows.map(|b| &sums[b * nb..(b + 1) * nb]),
            ),
            Prepared::F32 { x, sums, cols, nb } => quant::dot_f32_rows(
                ty,
                wr,
                rows.map(|b| &x[b * cols..(b + 1) * cols]),
                rows.map(|b| &sums[b * nb..(b + 1) * nb]),
            ),
        }
    }
}

/// `out[b * w.rows + n] = x[b] · W[n]` for all rows b of `x` and n of `w`.
///
/// Weight rows are split across the thread pool; each weight row meets the activation
/// rows in tiles of 8, then 4, then 1, so a weight block is unpacked once per tile. Every
/// output element is computed the same way whatever the tile, so a sequence's results do
/// not depend on what it is batched with.
pub fn matmul(w: &Matrix, x: &mut Acts, out: &mut [f32], prec: ActPrecision) {
    assert_eq!(x.cols, w.cols, "matmul: inner dimensions differ");
    assert!(out.len() >= x.rows * w.rows, "matmul: output too small");
    weights_product(w, x, out, prec);
    if let Some(off) = w.offsets.as_ref().filter(|_| !w.offsets_in_kernels(prec)) {
        add_offsets(off, w.rows, x, out);
    }
}

/// `out[b · rows + n] += Σ_j offsets[n][j] · (x[b]'s inputs of run j summed)`: the weights'
/// offsets, in f32, over spans of output rows split across the thread pool (each output
/// the same way whatever the batch or the path: a multiply then an add, run after run).
fn add_offsets(off: &HeldOffsets, n_rows: usize, x: &Acts, out: &mut [f32]) {
    let (b_rows, runs) = (x.rows, x.cols / off.run);
    let sums: Vec<f32> = x.f32[..b_rows * x.cols]
        .chunks_exact(off.run)
        .map(|c| c.iter().sum())
        .collect();
    let ptr = OutPtr(out.as_mut_ptr());
    let span = |n0: usize, n1: usize| {
        for b in 0..b_rows {
            // SAFETY: outputs (b, n0..n1) belong to this span's task only, and lie inside
            // `out` (asserted by `matmul`).
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.at(b * n_rows + n0), n1 - n0) };
            let by_run = &off.by_run[n0..];
            offsets_into(o, by_run, n_rows, &sums[b * runs..(b + 1) * runs]);
        }
    };
    // Small products in one task (a thread pool hand-off costs more than their work).
    const SPAN: usize = 256;
    if n_rows * runs * b_rows < 1 << 12 {
        span(0, n_rows);
    } else {
        (0..n_rows.div_ceil(SPAN))
            .into_par_iter()
            .for_each(|c| span(c * SPAN, ((c + 1) * SPAN).min(n_rows)));
    }
}

/// `o[i] += Σ_j by_run[j · stride + i] · sums[j]`, 16 outputs at a time in registers, on
/// the widest vectors here.
#[inline]
fn offsets_into(o: &mut [f32], by_run: &[f32], stride: usize, sums: &[f32]) {
    #[inline(always)]
    fn plain(o: &mut [f32], by_run: &[f32], stride: usize, sums: &[f32]) {
        const W: usize = 16;
        let done = o.len() - o.len() % W;
        for (t, o) in o[..done].chunks_exact_mut(W).enumerate() {
            let mut acc: [f32; W] = from_fn(|i| o[i]);
            for (j, &s) in sums.iter().enumerate() {
                let w = &by_run[j * stride + W * t..j * stride + W * t + W];
                for i in 0..W {
                    acc[i] += w[i] * s;
                }
            }
            o.copy_from_slice(&acc);
        }
        for (i, o) in o[done..].iter_mut().enumerate() {
            for (j, &s) in sums.iter().enumerate() {
                *o += by_run[j * stride + done + i] * s;
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(o: &mut [f32], by_run: &[f32], stride: usize, sums: &[f32]) {
            plain(o, by_run, stride, sums)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(o: &mut [f32], by_run: &[f32], stride: usize, sums: &[f32]) {
            plain(o, by_run, stride, sums)
        }
        if quant::has_avx512() {
            // SAFETY: the CPU has AVX-512F (detected).
            return unsafe { avx512(o, by_run, stride, sums) };
        }
        if quant::has_avx2() {
            // SAFETY: the CPU has AVX2 (detected).
            return unsafe { avx2(o, by_run, stride, sums) };
        }
    }
    plain(o, by_run, stride, sums)
}

/// The product of the weights as the kernels hold them (offsets aside).
fn weights_product(w: &Matrix, x: &mut Acts, out: &mut [f32], prec: ActPrecision) {
    let (b_rows, n_rows, cols) = (x.rows, w.rows, w.cols);
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n_rows / (threads * 4)).clamp(4, 256);
    let ptr = OutPtr(out.as_mut_ptr());
    let (ty, data) = match &w.data {
        MatData::Quant(ty, data) => (*ty, data),
        MatData::F32(data) => {
            let xs = &x.f32;
            (0..n_rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
                for n in c * chunk..((c + 1) * chunk).min(n_rows) {
                    let wr = &data[n * cols..(n + 1) * cols];
                    for b in 0..b_rows {
                        let v = dot_f32(wr, &xs[b * cols..(b + 1) * cols]);
                        // SAFETY: (b, n) is written by this task only; in bounds (asserted).
                        unsafe { *ptr.at(b * n_rows + n) = v };
                    }
                }
            });
            return;
        }
    };
    let nb = cols / QK;
    let packed = match prec {
        ActPrecision::F32 => None,
        _ => w.packed(),
    };
    if let Some(pk) = packed {
        // 8-bit weights have no 8-bit packed kernel: they meet 16-bit activations (more
        // precise, and as fast).
        let prec = if pk.takes_q8() {
            prec
        } else {
            ActPrecision::I16
        };
        matmul_packed(pk, x, prec, ptr, threads);
        return;
    }
    let prepared = match prec {
        ActPrecision::Q8 => Prepared::Q8 {
            q8: x.quantized(),
            nb,
        },
        ActPrecision::I16 => {
            x.block_sums();
            x.quantize_i16();
            Prepared::I16 {
                q: &x.i16,
                d: &x.i16_d,
                sums: &x.sums,
                cols,
                nb,
            }
        }
        ActPrecision::F32 => {
            x.block_sums();
            Prepared::F32 {
                x: &x.f32,
                sums: &x.sums,
                cols,
                nb,
            }
        }
    };
    let rb = w.row_bytes();
    (0..n_rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        for n in c * chunk..((c + 1) * chunk).min(n_rows) {
            let wr = &data[n * rb..(n + 1) * rb];
            let put = |b0: usize, vals: &[f32]| {
                for (k, v) in vals.iter().enumerate() {
                    // SAFETY: (b, n) is written by this task only; in bounds (asserted).
                    unsafe { *ptr.at((b0 + k) * n_rows + n) = *v };
                }
            };
            let mut b = 0;
            while b + 8 <= b_rows {
                put(b, &prepared.tile::<8>(ty, wr, b));
                b += 8;
            }
            while b + 4 <= b_rows {
                put(b, &prepared.tile::<4>(ty, wr, b));
                b += 4;
            }
            while b < b_rows {
                put(b, &prepared.tile::<1>(ty, wr, b));
                b += 1;
            }
        }
    });
}

/// The product on packed weights ([`crate::packed`]) at 16-bit (`I16`) or 8-bit (`Q8`)
/// activations: groups of 16 weight rows split across the thread pool, each meeting the
/// activation rows in tiles of as many as the kernel holds in registers (12, 8, 4, then 1
/// with AVX-512 VNNI; 6, 4, 1 on AVX2), every output computed the same way whatever its
/// tile.
fn matmul_packed(pk: &Packed, x: &mut Acts, prec: ActPrecision, ptr: OutPtr, threads: usize) {
    let (b_rows, n_rows) = (x.rows, pk.rows);
    let put = |b0: usize| {
        move |g: usize, vals: &[[f32; LANES]]| {
            for (k, v) in vals.iter().enumerate() {
                // SAFETY: row b0 + k, columns 16g .. 16g + 16 are written by this task
                // only; in bounds (asserted by `matmul`).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.as_ptr(),
                        ptr.at((b0 + k) * n_rows + g * LANES),
                        LANES,
                    )
                }
            }
        }
    };
    let on_tiles = amx_rows(pk, b_rows, prec);
    if prec == ActPrecision::Q8 {
        x.quantized();
    } else {
        x.block_sums();
        x.quantize_i16();
    }
    #[cfg(target_arch = "x86_64")]
    if on_tiles > 0 {
        x.tile_for_amx(prec);
    }
    if prec == ActPrecision::Q8 {
        let a = &x.q8[..];
        #[cfg(target_arch = "x86_64")]
        let rows = packed::amx::Rows::Q8 { tiled: &x.tiled, a };
        packed_tiles(pk, b_rows, threads, on_tiles, tiles(true), |gs, b0, n| {
            let p = put(b0);
            match n {
                #[cfg(target_arch = "x86_64")]
                n if n >= LANES => amx_tile(pk, gs, &rows, n, &put),
                8 => q8_tile::<8>(pk, gs, b0, a, &p),
                6 => q8_tile::<6>(pk, gs, b0, a, &p),
                4 => q8_tile::<4>(pk, gs, b0, a, &p),
                _ => q8_tile::<1>(pk, gs, b0, a, &p),
            }
        });
        return;
    }
    let acts = (&x.i16[..], &x.i16_d[..], &x.sums[..]);
    #[cfg(target_arch = "x86_64")]
    let planes = packed::amx::Rows::I16 {
        tiled: &x.tiled,
        d: &x.i16_d,
        sums: &x.sums,
    };
    packed_tiles(pk, b_rows, threads, on_tiles, tiles(false), |gs, b0, n| {
        let p = put(b0);
        match n {
            #[cfg(target_arch = "x86_64")]
            n if n >= LANES => amx_tile(pk, gs, &planes, n, &put),
            12 => i16_tile::<12>(pk, gs, b0, acts, &p),
            8 => i16_tile::<8>(pk, gs, b0, acts, &p),
            6 => i16_tile::<6>(pk, gs, b0, acts, &p),
            4 => i16_tile::<4>(pk, gs, b0, acts, &p),
            _ => i16_tile::<1>(pk, gs, b0, acts, &p),
        }
    });
}

/// Activation rows (a multiple of 16) that meet `pk` on AMX's tiles before the rest take
/// the packed kernel's tiles: none where the tiles are not [`packed::amx::usable`], the
/// weights have a scale per 16, or there are fewer than 16 rows — 32 for 8-bit
/// activations, whose VNNI kernel does as well as the tiles at 16 (BENCHMARKS.md).
fn amx_rows(pk: &Packed, b_rows: usize, prec: ActPrecision) -> usize {
    let least = LANES * (1 + (prec == ActPrecision::Q8) as usize);
    #[cfg(target_arch = "x86_64")]
    if packed::amx::usable() && pk.takes_amx() && b_rows >= least {
        return b_rows / LANES * LANES;
    }
    let _ = (pk, b_rows, least);
    0
}

/// Activation rows `0 .. n` (a multiple of 16) against the packed groups `gs` on AMX's
/// tiles, each group's results handed 16 rows at a time to `put(first row)`.
#[cfg(target_arch = "x86_64")]
fn amx_tile<P: Fn(usize, &[[f32; LANES]])>(
    pk: &Packed,
    gs: std::ops::Range<usize>,
    rows: &packed::amx::Rows,
    n: usize,
    put: &impl Fn(usize) -> P,
) {
    pk.dot_tiles_amx(gs, rows, n / LANES, &mut |g, r0, res| put(r0)(g, res));
}

/// The packed kernel's tiles of activation rows (`q8`: 8-bit activations), largest first.
fn tiles(q8: bool) -> &'static [usize] {
    packed::kernel().map_or(&[1], |k| k.tiles(q8))
}

/// Activation rows `b0 .. b0 + R` at 16 bits (values, block scales, f32 block sums of all
/// rows) against the packed groups `gs`, each result handed to `put(group, rows)`.
fn i16_tile<const R: usize>(
    pk: &Packed,
    gs: std::ops::Range<usize>,
    b0: usize,
    (q, d, sums): (&[i16], &[f32], &[f32]),
    put: &dyn Fn(usize, &[[f32; LANES]]),
) {
    let (cols, nb) = (pk.cols, pk.cols / QK);
    pk.dot_rows_groups::<R>(
        gs,
        from_fn(|k| &q[(b0 + k) * cols..(b0 + k + 1) * cols]),
        from_fn(|k| &d[(b0 + k) * nb..(b0 + k + 1) * nb]),
        from_fn(|k| &sums[(b0 + k) * nb..(b0 + k + 1) * nb]),
        &mut |g, r| put(g, r),
    )
}

/// [`i16_tile`] for 8-bit activation blocks `a` (of all rows).
fn q8_tile<const R: usize>(
    pk: &Packed,
    gs: std::ops::Range<usize>,
    b0: usize,
    a: &[Q8Block],
    put: &dyn Fn(usize, &[[f32; LANES]]),
) {
    let nb = pk.cols / QK;
    pk.dot_rows_q8_groups::<R>(
        gs,
        from_fn(|k| &a[(b0 + k) * nb..(b0 + k + 1) * nb]),
        &mut |g, r| put(g, r),
    )
}

/// Runs `tile(groups, first activation row, rows)` over chunks of `pk`'s groups split
/// across the thread pool, and within a chunk over every activation row: the first
/// `first` rows in one call (0: none), then the rest in tiles of `sizes` rows (largest
/// first, ending in 1). A tile of activations meets every group of its chunk in one call.
fn packed_tiles(
    pk: &Packed,
    b_rows: usize,
    threads: usize,
    first: usize,
    sizes: &[usize],
    tile: impl Fn(std::ops::Range<usize>, usize, usize) + Sync + Send,
) {
    let groups = pk.rows / LANES;
    let chunk = (groups / (threads * 4)).clamp(1, 16);
    (0..groups.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let gs = c * chunk..((c + 1) * chunk).min(groups);
        if first > 0 {
            tile(gs.clone(), 0, first);
        }
        let mut b = first;
        for &n in sizes {
            while b + n <= b_rows {
                tile(gs.clone(), b, n);
                b += n;
            }
        }
    });
}

/// f32 dot product, written so that it vectorizes: four independent 8-lane accumulators
/// hide the FMA latency.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..32 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut lanes = [0f32; 8];
    for (i, v) in acc.iter().enumerate() {
        lanes[i % 8] += v;
    }
    let mut s: f32 = lanes.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Reference: the same product from dequantized f32 weights (for tests).
pub fn matmul_reference(w: &Matrix, x: &Acts, out: &mut [f32]) {
    let mut row = vec![0f32; w.cols];
    for n in 0..w.rows {
        w.row_f32(n, &mut row);
        for b in 0..x.rows {
            out[b * w.rows + n] = x.row(b).iter().zip(&row).map(|(a, c)| a * c).sum();
        }
    }
}
