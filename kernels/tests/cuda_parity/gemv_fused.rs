//! The small products as the decode step launches them: stacks of layouts, rows read in
//! runs of their columns, and fused with the norm, SwiGLU and RoPE, against the kernels
//! apart and the twins.

use super::*;
use crate::gemv::{exact_product, quant_weights};

#[test]
fn a_stack_of_two_layouts_matches_the_product_of_the_files_values() {
    if !kernels::packed::available() {
        println!("SKIPPED: this CPU has no packed kernels to make the K-quant layouts");
        return;
    }
    on_each!(gemv_stack_case);
}

/// The blocks of `parts` (a type and rows each, `k` wide) as the backend holds a stack of
/// them (`QuantRows::stack`), and the values the file's blocks dequantize to, stacked.
fn stack_of<E: Exec>(
    g: &E,
    rng: &mut Rng,
    parts: &[(GgmlType, usize)],
    k: usize,
) -> (Vec<kernels::cuda::gemv::QuantBuf<E>>, Vec<f32>) {
    stack_as(g, rng, parts, k, None)
}

/// [`stack_of`], its packed parts' scales held as `scales` says where it names a form
/// (`TOLLGATE_KQUANT_SCALES`' choice: f32 pairs, say, where the backend holds them factored).
fn stack_as<E: Exec>(
    g: &E,
    rng: &mut Rng,
    parts: &[(GgmlType, usize)],
    k: usize,
    scales: Option<kernels::cuda::gemv::Scales>,
) -> (Vec<kernels::cuda::gemv::QuantBuf<E>>, Vec<f32>) {
    use kernels::cuda::gemv::{QuantBuf, QuantRows};
    let mut values = Vec::new();
    let rows = parts
        .iter()
        .map(|&(ty, n)| {
            let (blocks, w) = quant_weights(rng, ty, n, k);
            values.extend(w);
            QuantRows::from_blocks(ty, &blocks, n, k).unwrap_or_else(|| {
                let m = kernels::model::matrix_of(ty, n, k, &blocks);
                let p = m.packed_values().expect("exact packed values");
                scales
                    .and_then(|s| QuantRows::from_packed_as(p, s))
                    .or_else(|| QuantRows::from_packed(p))
                    .expect("a kernel layout")
            })
        })
        .collect();
    let bufs = QuantRows::stack(rows)
        .iter()
        .map(|r| QuantBuf::upload(g, r).unwrap())
        .collect();
    (bufs, values)
}

/// RoPE at `base` and the cache write of `heads` (query heads, KV heads, head size, cache
/// block size): a QKV product's epilogue, or `rope_kv_write`'s work ([`rope_apart`]).
fn rope_at<'a, E: Exec>(
    positions: &'a E::Buf<u32>,
    slots: &'a E::Buf<i32>,
    k_cache: &'a mut E::Buf<f16>,
    v_cache: &'a mut E::Buf<f16>,
    (n_heads, n_kv_heads, head_dim, block_size): (usize, usize, usize, usize),
    base: f32,
) -> kernels::cuda::gemv::RopeKv<'a, E> {
    kernels::cuda::gemv::RopeKv {
        positions,
        slots,
        k_cache,
        v_cache,
        n_heads,
        n_kv_heads,
        head_dim,
        block_size,
        base,
    }
}

/// The QKV product (`n = (heads.0 + 2 · heads.1) · heads.2` columns) over `w` of `m` rows
/// of `x0 + delta` normed by `nw` with RoPE and the cache write in its epilogue
/// (`gemv_*_norm_rope`, in runs of columns where the rows are too wide to stage whole), at
/// random positions into caches that start as `fill`; against `ya`, the same product with
/// the norm apart ([`norm_both_ways`]), then `rope_kv_write`: the rotated rows and both
/// caches have the same bits. The value cache it made.
#[allow(clippy::too_many_arguments)]
fn rope_both_ways<E: Exec>(
    g: &E,
    rng: &mut Rng,
    w: kernels::cuda::gemv::Weights<'_, E>,
    (x0, delta, nw, eps): (&[f32], &[f32], &E::Buf<f32>, f32),
    ya: &E::Buf<f32>,
    (heads, fill): ((usize, usize, usize, usize), &[f16]),
    (m, k): (usize, usize),
    what: &str,
) -> Vec<f16> {
    use kernels::cuda::gemv::{gemv_rope, Input};
    let n = (heads.0 + 2 * heads.1) * heads.2;
    let positions: Vec<u32> = (0..m).map(|_| rng.below(2000) as u32).collect();
    let slots: Vec<i32> = (0..m).map(|r| (r * 61 % 1024) as i32).collect();
    let (xd, dd, pd, sd) = (up(g, x0), up(g, delta), up(g, &positions), up(g, &slots));
    let (mut kc, mut vc) = (up(g, fill), up(g, fill));
    let mut qkv_y = up(g, &vec![f32::NAN; m * n]);
    let input = Input::Norm {
        x: &xd,
        delta: Some(&dd),
        weight: nw,
        x_out: None,
        rows: None,
        eps,
    };
    let rope = rope_at(&pd, &sd, &mut kc, &mut vc, heads, 10000.0);
    gemv_rope(g, input, w, &mut qkv_y, m, k, rope).unwrap();
    let (got, got_k, got_v) = (down(g, &qkv_y), down(g, &kc), down(g, &vc));
    let (mut ka, mut va) = (up(g, fill), up(g, fill));
    let rope = rope_at(&pd, &sd, &mut ka, &mut va, heads, 10000.0);
    rope_apart(g, ya, n, m, rope);
    assert!(same_bits(&got, &down(g, ya)), "{what}: {m} rows: QKV rows");
    assert_eq!(got_k, down(g, &ka), "{what}: {m} rows: key cache");
    assert_eq!(got_v, down(g, &va), "{what}: {m} rows: value cache");
    got_v
}

/// `rope_kv_write` over `rows` QKV rows `stride` apart, as `rope` says (its frequencies
/// from `base`, as the table a model without scaled RoPE uploads).
fn rope_apart<E: Exec>(
    g: &E,
    qkv: &E::Buf<f32>,
    stride: usize,
    rows: usize,
    rope: kernels::cuda::gemv::RopeKv<'_, E>,
) {
    let inv_freq = up(g, &kernels::ops::rope_inv_freq(rope.head_dim, rope.base));
    let args = [
        qkv.arg(),
        i(stride),
        rope.positions.arg(),
        rope.slots.arg(),
        rope.k_cache.arg(),
        rope.v_cache.arg(),
        i(rows),
        i(rope.n_heads),
        i(rope.n_kv_heads),
        i(rope.head_dim),
        i(rope.block_size),
        inv_freq.arg(),
        i(rope.head_dim / 2),
        Arg::F32(1.0),
        Arg::Null,
    ];
    let threads = (rows * rope.head_dim / 2) as u32;
    g.launch("rope_kv_write", cfg(threads.div_ceil(256), 256), &args)
        .unwrap();
}

/// A stack whose parts need different kernels, one launch each writing its columns of
/// the output rows: Q4_K_M's QKV (Q4_K Q and K on `gemv_q4f`, Q6_K V on `gemv_q6h`: its
/// integers at 6 bits; both as f32 pairs too, `gemv_q4f32`, `gemv_q8h32`), and
/// parts of one layout where the first ends inside a tile. For 1 to 16 rows: the product
/// of the file's values; fused with the norm (x + delta written once), with the norm and
/// RoPE and the cache write (the V part's columns at their place in the QKV rows and the
/// cache), and with SwiGLU, the same bits as the kernels apart; poisoned outputs. Refused:
/// parts that are not the product's rows, no parts, a part starting inside a rotation pair.
fn gemv_stack_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{gemv_from, gemv_rope, Input, Weights};
    let what = g.describe();
    let mut rng = Rng(41);
    let k = 1536;
    let odd = [
        (GgmlType::Q8_0, 40),
        (GgmlType::Q8_0, 24),
        (GgmlType::Q4_K, 48),
    ];
    let (parts, w) = stack_of(g, &mut rng, &odd, k);
    let kinds: Vec<_> = parts.iter().map(|q| q.kind().unwrap()).collect();
    assert_eq!(kinds, ["q8s", "q8s", "q4f"], "{what}");
    let n = 112;
    for m in [1, 3, 8, 9, 16] {
        let x: Vec<f16> = rng.vec(m * k, 1.0).into_iter().map(f16::from_f32).collect();
        let xd = up(g, &x);
        let mut y = up(g, &vec![f32::NAN; m * n]);
        gemv_from(g, Input::Rows(&xd), Weights::Quant(&parts), &mut y, m, k, n).unwrap();
        let e = rel(&down(g, &y), &exact_product(&x, &w, (m, k, n)));
        assert!(e < 1e-5, "{what}: three parts, {m} rows: {e}");
    }

    // Q4_K_M's QKV: 4 heads and 2 of keys and values, of 64.
    let (nh, nkv, hd, bs) = (4, 2, 64, 16);
    let (qd, kvd) = (nh * hd, nkv * hd);
    let n = qd + 2 * kvd;
    let qkv = [
        (GgmlType::Q4_K, qd),
        (GgmlType::Q4_K, kvd),
        (GgmlType::Q6_K, kvd),
    ];
    // The K-quants' scales as the backend holds them (factored), and as f32 pairs.
    let forms = [
        (None, ["q4f", "q6h"]),
        (
            Some(kernels::cuda::gemv::Scales::F32Pairs),
            ["q4f32", "q8h32"],
        ),
    ];
    let nw = rng.vec(k, 1.0);
    let nwd = up(g, &nw);
    let fill: Vec<f16> = rng
        .vec(64 * bs * kvd, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let eps = 1e-5f32;
    let heads = (nh, nkv, hd, bs);
    for (scales, want) in forms {
        let (parts, w) = stack_as(g, &mut rng, &qkv, k, scales);
        let kinds: Vec<_> = parts.iter().map(|q| q.kind().unwrap()).collect();
        assert_eq!(kinds, want, "{what}");
        for m in [1, 2, 5, 8, 9, 16] {
            let x0 = rng.vec(m * k, 3.0);
            let delta = rng.vec(m * k, 1.0);
            // The norm fused (x + delta written once), and apart.
            let wq = Weights::Quant(&parts);
            let (normed, x_out, ya, sums) =
                norm_both_ways(g, wq, (&x0, &delta, &nwd), eps, (m, k, n));
            assert!(same_bits(&normed, &down(g, &ya)), "{what}: {m} rows: norm");
            assert_eq!(x_out, sums, "{what}: {m} rows: x_out");
            let mut xw = x0.clone();
            let h = twins::add_rmsnorm(&mut xw, Some(&delta), &nw, None, k, eps);
            let e = rel(&normed, &exact_product(&h, &w, (m, k, n)));
            assert!(e < 1e-3, "{what}: {m} rows: the normed rows' product: {e}");
            // With RoPE and the cache write, and apart.
            let norm = (&x0[..], &delta[..], &nwd, eps);
            let got_v = rope_both_ways(g, &mut rng, wq, norm, &ya, (heads, &fill), (m, k), &what);
            assert_ne!(got_v, fill, "{what}: {m} rows: the V part wrote the cache");
        }
        // SwiGLU fused over a gate|up of 2k, against swiglu then the product.
        for m in [1, 9] {
            let gu = rng.vec(m * 2 * k, 4.0);
            let (fused, apart) = swiglu_both_ways(g, Weights::Quant(&parts), &gu, (m, k, n));
            assert!(same_bits(&fused, &apart), "{what}: {m} rows: swiglu");
        }
    }
    // Refused: parts that are not the n rows; none; a part starting inside a pair.
    let (parts, _) = stack_of(g, &mut rng, &qkv, k);
    let xd = up(g, &vec![f16::ZERO; k]);
    let mut y = up(g, &vec![0f32; n + 1]);
    for (cols, why) in [
        (n + 1, "a column past the parts"),
        (n - 1, "a part's row left"),
    ] {
        let r = gemv_from(
            g,
            Input::Rows(&xd),
            Weights::Quant(&parts),
            &mut y,
            1,
            k,
            cols,
        );
        assert!(r.is_err(), "{what}: {why}");
    }
    let none: &[kernels::cuda::gemv::QuantBuf<E>] = &[];
    let r = gemv_from(g, Input::Rows(&xd), Weights::Quant(none), &mut y, 1, k, n);
    assert!(r.is_err(), "{what}: no parts");
    let uneven = [(GgmlType::Q8_0, qd - 1), (GgmlType::Q8_0, 2 * kvd + 1)];
    let (uneven, _) = stack_of(g, &mut rng, &uneven, k);
    assert_eq!(uneven.len(), 2);
    let (x32, pd, sd) = (up(g, &vec![0f32; k]), up(g, &[0u32]), up(g, &[0i32]));
    let (mut kc, mut vc) = (up(g, &fill), up(g, &fill));
    let input = Input::Norm {
        x: &x32,
        delta: None,
        weight: &nwd,
        x_out: None,
        rows: None,
        eps,
    };
    let rope = rope_at(&pd, &sd, &mut kc, &mut vc, heads, 10000.0);
    let r = gemv_rope(g, input, Weights::Quant(&uneven), &mut y, 1, k, rope);
    assert!(r.is_err(), "{what}: a part starting at an odd column");
}

#[test]
fn products_of_rows_too_wide_to_stage_whole_run_in_runs_of_columns() {
    on_each!(gemv_runs_case);
}

/// Rows of 14,336 (Llama-3-8B's `ffn_down`): at 8 and 16 rows their staging does not fit
/// in a block's shared memory, so the product is 2 or 3 launches over runs of the columns,
/// each adding its sums. Over f16 rows, Q8_0 and (where the CPU makes it) Q4_K blocks and
/// a stack of the two: the exact product of the weights within 1e-5; the norm fused (the
/// whole row's norm, x + delta written once), the norm with RoPE and the cache write (the
/// last run's epilogue) and SwiGLU fused, the same bits as the kernels apart.
fn gemv_runs_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{column_run, gemv_from, Input, Staged, Weights};
    let what = g.describe();
    let max_shared = g.max_shared_bytes().unwrap();
    let (k, n) = (14336, 48);
    let mut rng = Rng(43);
    let mut types = vec![GgmlType::Q8_0];
    if kernels::packed::available() {
        types.push(GgmlType::Q4_K);
    }
    let (w16, w16v): (Vec<f16>, Vec<f32>) = {
        let h: Vec<f16> = rng.vec(n * k, 0.5).into_iter().map(f16::from_f32).collect();
        let v = f32s(&h);
        (h, v)
    };
    let w16d = up(g, &w16);
    // Read as QKV rows too: 2 query heads and a KV head of 12 (n = 48), caches of 16-slot
    // blocks.
    let heads = (2, 1, 12, 16);
    let fill: Vec<f16> = rng
        .vec(64 * 16 * 12, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let mut layouts = vec![(None, w16v)];
    let mut stacks: Vec<Vec<(GgmlType, usize)>> = types.iter().map(|&ty| vec![(ty, n)]).collect();
    if types.contains(&GgmlType::Q4_K) {
        // A stack of two layouts, each part's launches in runs (16 rows in Q8_0, the
        // other 32 in Q4_K, whose packed form takes whole tiles of 16 rows).
        stacks.push(vec![(GgmlType::Q8_0, 16), (GgmlType::Q4_K, n - 16)]);
    }
    // Q4_K's scales as the backend holds them (factored) and as f32 pairs.
    let forms = [None, Some(kernels::cuda::gemv::Scales::F32Pairs)];
    for stack in &stacks {
        let k_quant = stack.iter().any(|&(ty, _)| ty == GgmlType::Q4_K);
        for &scales in &forms[..if k_quant { 2 } else { 1 }] {
            let (parts, w) = stack_as(g, &mut rng, stack, k, scales);
            assert_eq!(
                parts.len(),
                stack.len(),
                "{what}: {stack:?} in parts of their own"
            );
            layouts.push((Some(parts), w));
        }
    }
    for (parts, w) in &layouts {
        let weights = match parts {
            Some(p) => Weights::Quant(p),
            None => Weights::F16(&w16d, 0),
        };
        for (m, runs) in [(4, 1), (8, 2), (16, 3)] {
            let run = column_run(m, k, max_shared, weights.staged()).unwrap();
            assert_eq!(k.div_ceil(run), runs, "{what}: {m} rows in runs of {run}");
            let x: Vec<f16> = rng.vec(m * k, 1.0).into_iter().map(f16::from_f32).collect();
            let xd = up(g, &x);
            let mut y = up(g, &vec![f32::NAN; m * n]);
            gemv_from(g, Input::Rows(&xd), weights, &mut y, m, k, n).unwrap();
            let want = exact_product(&x, w, (m, k, n));
            let e = rel(&down(g, &y), &want);
            assert!(e < 1e-5, "{what}: {m} rows of {k} in {runs} runs: {e}");

            // The norm fused, against add_rmsnorm then the product.
            let (x0, delta, nw) = (rng.vec(m * k, 3.0), rng.vec(m * k, 1.0), rng.vec(k, 1.0));
            let nwd = up(g, &nw);
            let (got, x_out, apart, sums) =
                norm_both_ways(g, weights, (&x0, &delta, &nwd), 1e-5, (m, k, n));
            assert!(same_bits(&got, &down(g, &apart)), "{what}: {m} rows: norm");
            assert_eq!(x_out, sums, "{what}: {m} rows: x_out");
            // The rows as QKV rows: RoPE and the cache write in the last run's epilogue.
            let norm = (&x0[..], &delta[..], &nwd, 1e-5);
            let runs_of = format!("{what}: {runs} runs");
            rope_both_ways(
                g,
                &mut rng,
                weights,
                norm,
                &apart,
                (heads, &fill),
                (m, k),
                &runs_of,
            );

            // SwiGLU fused, against swiglu then the product.
            let gu = rng.vec(m * 2 * k, 4.0);
            let (fused, apart) = swiglu_both_ways(g, weights, &gu, (m, k, n));
            assert!(same_bits(&fused, &apart), "{what}: {m} rows: swiglu");
        }
    }
    assert_eq!(column_run(17, k, max_shared, Staged::Sums), None, "17 rows");
    assert_eq!(
        column_run(16, 14337, max_shared, Staged::MOST),
        None,
        "k no multiple of 32"
    );
}

/// `gemv_*_norm` over `w` (rows of `x0 + delta`, normed by `nw`; their sums written to a
/// fresh `x_out`), and apart ([`norm_then_gemv`], adding delta in place): the fused output,
/// x_out, the apart output (on the device, for what follows it) and the sums it made.
#[allow(clippy::type_complexity)]
fn norm_both_ways<E: Exec>(
    g: &E,
    w: kernels::cuda::gemv::Weights<'_, E>,
    (x0, delta, nw): (&[f32], &[f32], &E::Buf<f32>),
    eps: f32,
    (m, k, n): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, E::Buf<f32>, Vec<f32>) {
    use kernels::cuda::gemv::{gemv_from, Input};
    let (xd, dd) = (up(g, x0), up(g, delta));
    let mut x_out = up(g, &vec![f32::NAN; m * k]);
    let mut y = up(g, &vec![f32::NAN; m * n]);
    let input = Input::Norm {
        x: &xd,
        delta: Some(&dd),
        weight: nw,
        x_out: Some(&mut x_out),
        rows: None,
        eps,
    };
    gemv_from(g, input, w, &mut y, m, k, n).unwrap();
    let apart = norm_then_gemv(g, &xd, &dd, nw, eps, w, m, k, n);
    (down(g, &y), down(g, &x_out), apart, down(g, &xd))
}

/// `gemv_*_swiglu` over `w` from the gate|up rows `gu` (`m × 2k`), and apart: `swiglu`,
/// then the product of its f16 rows. Both outputs.
fn swiglu_both_ways<E: Exec>(
    g: &E,
    w: kernels::cuda::gemv::Weights<'_, E>,
    gu: &[f32],
    (m, k, n): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    use kernels::cuda::gemv::{gemv_from, Input};
    let gud = up(g, gu);
    let mut fused = up(g, &vec![f32::NAN; m * n]);
    gemv_from(g, Input::Swiglu(&gud), w, &mut fused, m, k, n).unwrap();
    let gd = up(g, &nan16(m * k));
    let args = [gud.arg(), gd.arg(), i(m), i(k)];
    g.launch("swiglu", swiglu_launch(m, k), &args).unwrap();
    let mut apart = up(g, &vec![f32::NAN; m * n]);
    gemv_from(g, Input::Rows(&gd), w, &mut apart, m, k, n).unwrap();
    (down(g, &fused), down(g, &apart))
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
}

/// `add_rmsnorm` (x += delta in place, then the norm by weight) and `gemv_*` by `w`,
/// launched apart: the products of `m` rows of `k` into `n` columns.
#[allow(clippy::too_many_arguments)]
fn norm_then_gemv<E: Exec>(
    g: &E,
    x: &E::Buf<f32>,
    delta: &E::Buf<f32>,
    weight: &E::Buf<f32>,
    eps: f32,
    w: kernels::cuda::gemv::Weights<'_, E>,
    m: usize,
    k: usize,
    n: usize,
) -> E::Buf<f32> {
    let h = up(g, &nan16(m * k));
    let args = [
        x.arg(),
        delta.arg(),
        weight.arg(),
        h.arg(),
        Arg::Null,
        i(m),
        i(k),
        Arg::F32(eps),
    ];
    g.launch("add_rmsnorm", norm_launch(m), &args).unwrap();
    let mut y = up(g, &vec![f32::NAN; m * n]);
    let input = kernels::cuda::gemv::Input::Rows(&h);
    kernels::cuda::gemv::gemv_from(g, input, w, &mut y, m, k, n).unwrap();
    y
}

#[test]
fn fused_gemv_matches_its_kernels_apart_and_the_twins() {
    on_each!(gemv_fused_case);
}

/// `gemv_f16_norm` and `gemv_f16_swiglu` for 1 to 16 rows: the same bits as `add_rmsnorm`
/// (or `swiglu`) then `gemv_f16` on the same device, and within the twins' bound; the
/// residual sums written to `x_out` exactly; picked rows (with a −1 entry, a row of zeros)
/// for the final norm; poisoned outputs; and the launches it refuses.
fn gemv_fused_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{gemv_from, Input, Weights};
    let what = g.describe();
    let mut rng = Rng(21);
    let (d, f, n, eps) = (576, 1536, 1003, 1e-5f32);
    let w16 = |rng: &mut Rng, len: usize| -> Vec<f16> {
        rng.vec(len, 0.5).into_iter().map(f16::from_f32).collect()
    };
    let (wn, wf) = (w16(&mut rng, n * d), w16(&mut rng, n * f));
    let (wnd, wfd) = (up(g, &wn), up(g, &wf));
    let nw = rng.vec(d, 1.0);
    let nwd = up(g, &nw);
    // One mma's rows, and two (9 to 16).
    for m in [1, 2, 3, 5, 8, 9, 12, 16] {
        // Norm over the first m rows of 20, with the residual add written to x_out.
        let x0 = rng.vec(20 * d, 3.0);
        let delta = rng.vec(20 * d, 1.0);
        let (xd, dd) = (up(g, &x0), up(g, &delta));
        let mut x_out = up(g, &vec![f32::NAN; 20 * d]);
        let mut y = up(g, &vec![f32::NAN; m * n]);
        let input = Input::Norm {
            x: &xd,
            delta: Some(&dd),
            weight: &nwd,
            x_out: Some(&mut x_out),
            rows: None,
            eps,
        };
        gemv_from(g, input, Weights::F16(&wnd, 0), &mut y, m, d, n).unwrap();
        let mut xw = x0.clone();
        let h = twins::add_rmsnorm(&mut xw[..m * d], Some(&delta), &nw, None, d, eps);
        let sums = down(g, &x_out);
        assert!(
            same_bits(&sums[..m * d], &xw[..m * d]),
            "{what}: {m} rows: x_out"
        );
        assert!(
            sums[m * d..].iter().all(|v| v.is_nan()),
            "{what}: {m} rows: past x_out's rows"
        );
        assert_eq!(down(g, &xd), x0, "{what}: x is read only");
        let got = down(g, &y);
        let e = rel(&got, &twins::gemm(&h, &wn, m, d, n));
        assert!(e < 1e-3, "{what}: norm then product, {m} rows: {e}");
        // The same two kernels apart: add_rmsnorm in place, then gemv_f16.
        let apart = norm_then_gemv(g, &xd, &dd, &nwd, eps, Weights::F16(&wnd, 0), m, d, n);
        assert!(
            same_bits(&got, &down(g, &apart)),
            "{what}: norm fused vs apart, {m} rows"
        );

        // The final norm's shape: picked rows of x, no x_out.
        let rows: Vec<i32> = [4, -1, 0, 5, 9, 2, 8, 7, 19, 11, 3, 17, 12, -1, 6, 14][..m].to_vec();
        let rd = up(g, &rows);
        let xd = up(g, &x0);
        let mut y = up(g, &vec![f32::NAN; m * n]);
        let input = Input::Norm {
            x: &xd,
            delta: Some(&dd),
            weight: &nwd,
            x_out: None,
            rows: Some(&rd),
            eps,
        };
        gemv_from(g, input, Weights::F16(&wnd, 0), &mut y, m, d, n).unwrap();
        let mut xw = x0.clone();
        let h = twins::add_rmsnorm(&mut xw, Some(&delta), &nw, Some(&rows), d, eps);
        let got = down(g, &y);
        let e = rel(&got, &twins::gemm(&h, &wn, m, d, n));
        assert!(e < 1e-3, "{what}: picked rows, {m} rows: {e}");
        if m > 1 {
            assert!(
                got[n..2 * n].iter().all(|&v| v == 0.0),
                "{what}: the −1 row"
            );
        }
        assert_eq!(down(g, &xd), x0, "{what}: x is read only");

        // SwiGLU then the down product (k = 1536).
        let gu = rng.vec(m * 2 * f, 4.0);
        let (got, apart) = swiglu_both_ways(g, Weights::F16(&wfd, 0), &gu, (m, f, n));
        let e = rel(&got, &twins::gemm(&twins::swiglu(&gu, m, f), &wf, m, f, n));
        assert!(e < 1e-3, "{what}: swiglu then product, {m} rows: {e}");
        assert!(
            same_bits(&got, &apart),
            "{what}: swiglu fused vs apart, {m} rows"
        );
    }
    // Refused: 17 rows, a short input.
    let xd = up(g, &vec![0f32; 20 * d]);
    let mut same = up(g, &vec![0f32; 20 * d]);
    let mut y = up(g, &vec![0f32; 17 * n]);
    let input = Input::Norm {
        x: &xd,
        delta: None,
        weight: &nwd,
        x_out: Some(&mut same),
        rows: None,
        eps,
    };
    assert!(
        gemv_from(g, input, Weights::F16(&wnd, 0), &mut y, 17, d, n).is_err(),
        "{what}: 17 rows"
    );
    let gud = up(g, &vec![0f32; 2 * f]);
    assert!(
        gemv_from(
            g,
            Input::Swiglu(&gud),
            Weights::F16(&wfd, 0),
            &mut y,
            2,
            f,
            n
        )
        .is_err(),
        "{what}: gate|up rows for 1 row, not 2"
    );
}

#[test]
fn qkv_product_with_rope_matches_its_kernels_apart_and_the_twins() {
    on_each!(gemv_rope_case);
}

/// `gemv_f16_norm_rope` for 1 to 16 rows of SmolLM2's shape at positions up to 2,000: the
/// QKV rows and both caches (every element, the slots no row writes included) have the
/// bits of `add_rmsnorm`, `gemv_f16` and `rope_kv_write` on the same device, and are
/// within the twins' bound.
fn gemv_rope_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{gemv_rope, Input, Weights};
    let what = g.describe();
    let c = smol();
    let (d, hd, bs, n_blocks) = (c.dim, c.head_dim, 16, 64);
    let (qd, kd) = (c.n_heads * hd, c.kv_dim());
    let n = qd + 2 * kd;
    let mut rng = Rng(31);
    let w: Vec<f16> = rng.vec(n * d, 0.5).into_iter().map(f16::from_f32).collect();
    let wd = up(g, &w);
    let nw = rng.vec(d, 1.0);
    let nwd = up(g, &nw);
    let fill: Vec<f16> = rng
        .vec(n_blocks * bs * kd, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let eps = 1e-5f32;
    for m in [1, 2, 3, 5, 8, 9, 12, 16] {
        let x0 = rng.vec(m * d, 3.0);
        let delta = rng.vec(m * d, 1.0);
        let positions: Vec<u32> = (0..m).map(|_| rng.below(2000) as u32).collect();
        // Row 1's slot −1: a padded row's, written nowhere.
        let slots = [
            5, -1, 77, 513, 16, 1023, 600, 31, 200, 901, 64, 330, 777, 2, 450, 999,
        ];
        let slots: Vec<i32> = slots[..m].to_vec();
        let (xd, dd, pd, sd) = (up(g, &x0), up(g, &delta), up(g, &positions), up(g, &slots));
        // Fused.
        let mut x_out = up(g, &vec![f32::NAN; m * d]);
        let mut qkv = up(g, &vec![f32::NAN; m * n]);
        let (mut kc, mut vc) = (up(g, &fill), up(g, &fill));
        let input = Input::Norm {
            x: &xd,
            delta: Some(&dd),
            weight: &nwd,
            x_out: Some(&mut x_out),
            rows: None,
            eps,
        };
        let heads = (c.n_heads, c.n_kv_heads, hd, bs);
        let rope = rope_at(&pd, &sd, &mut kc, &mut vc, heads, c.rope_base);
        gemv_rope(g, input, Weights::F16(&wd, 0), &mut qkv, m, d, rope).unwrap();
        let (got, got_k, got_v) = (down(g, &qkv), down(g, &kc), down(g, &vc));
        // Apart, on the same device.
        let qa = norm_then_gemv(g, &xd, &dd, &nwd, eps, Weights::F16(&wd, 0), m, d, n);
        let (mut ka, mut va) = (up(g, &fill), up(g, &fill));
        let rope = rope_at(&pd, &sd, &mut ka, &mut va, heads, c.rope_base);
        rope_apart(g, &qa, n, m, rope);
        assert!(
            same_bits(&got, &down(g, &qa)),
            "{what}: {m} rows: QKV rows, fused vs apart"
        );
        assert_eq!(
            got_k,
            down(g, &ka),
            "{what}: {m} rows: key cache, fused vs apart"
        );
        assert_eq!(
            got_v,
            down(g, &va),
            "{what}: {m} rows: value cache, fused vs apart"
        );
        assert_eq!(
            down(g, &x_out),
            down(g, &xd),
            "{what}: {m} rows: x_out (x += delta)"
        );
        // The twins.
        let mut xw = x0.clone();
        let h = twins::add_rmsnorm(&mut xw, Some(&delta), &nw, None, d, eps);
        let mut want = twins::gemm(&h, &w, m, d, n);
        let (mut wk, mut wv) = (fill.clone(), fill.clone());
        twins::rope_kv_write(
            &mut want, n, &positions, &slots, &mut wk, &mut wv, &c, bs, None, 0,
        );
        assert!(
            rel(&got, &want) < 1e-3,
            "{what}: {m} rows: QKV vs the twins"
        );
        let close = |a: &[f16], b: &[f16]| rel(&f32s(a), &f32s(b));
        assert!(
            close(&got_k, &wk) < 2e-3,
            "{what}: {m} rows: keys vs the twin"
        );
        assert!(
            close(&got_v, &wv) < 2e-3,
            "{what}: {m} rows: values vs the twin"
        );
    }
    // RoPE fuses only into the product of normalized rows.
    let (xd, pd, sd) = (up(g, &nan16(d)), up(g, &[0u32]), up(g, &[0i32]));
    let (mut kc, mut vc) = (up(g, &fill), up(g, &fill));
    let mut qkv = up(g, &vec![0f32; n]);
    let heads = (c.n_heads, c.n_kv_heads, hd, bs);
    let rope = rope_at(&pd, &sd, &mut kc, &mut vc, heads, c.rope_base);
    assert!(
        gemv_rope(
            g,
            Input::Rows(&xd),
            Weights::F16(&wd, 0),
            &mut qkv,
            1,
            d,
            rope
        )
        .is_err(),
        "{what}: RoPE after a product of f16 rows"
    );
}
