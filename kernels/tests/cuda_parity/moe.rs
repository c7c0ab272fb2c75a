//! A mixture of experts' kernels (`kernels/cuda/moe.cu`) against their twins, each fed its
//! twin's inputs: routing (ties included), the places by expert (ties within a warp's 32
//! entries, several rounds of 32 a warp, warps with part of a share or none; all 256
//! experts a block has threads for), both expert
//! products over f16 weights and over Q8_0's values, and the combination with and without
//! a shared expert; and the experts' products on the tensor cores (`moe_tc_*`) over their
//! file's own blocks.

use super::*;
use kernels::cuda::gemv::QuantRows;
use kernels::cuda::twins::{ExpertBlocks, ExpertRows, MoePlaces, Q8Rows};

#[test]
fn moe_kernels_match_their_twins() {
    on_each!(moe_case);
}

fn moe_case<E: Exec>(g: &E) {
    let mut rng = Rng(11);
    let what = g.describe();
    // (experts, used, rows, dim, expert width, normalized, shared expert width)
    let shapes = [
        (8, 2, 5, 64, 96, true, Some(32)),
        (128, 8, 300, 64, 32, false, None),
        (256, 1, 40, 32, 16, true, Some(16)),
    ];
    for (ne, k, t, d, f, norm, shared) in shapes {
        let label = format!("{what}: {ne} experts, {k} used, {t} rows");
        let places = t * k;
        let mut logits = rng.vec(t * ne, 4.0);
        // Ties: row 0's first two experts equal and greatest, row 1's all equal.
        let top = logits[..ne].iter().copied().fold(f32::MIN, f32::max) + 1.0;
        logits[0] = top;
        logits[1] = top;
        logits[ne..2 * ne].fill(0.5);
        // `moe_route` over `rows` rows of `logits`, into poisoned outputs: their experts
        // and weights.
        let route = |logits: &[f32], rows: usize| {
            let l = up(g, logits);
            let expert = up(g, &vec![-7i32; rows * k]);
            let weight = up(g, &vec![f32::NAN; rows * k]);
            let args = [
                l.arg(),
                i(rows),
                i(ne),
                i(k),
                i(norm as usize),
                expert.arg(),
                weight.arg(),
            ];
            g.launch("moe_route", norm_launch(rows), &args).unwrap();
            (down(g, &expert), down(g, &weight))
        };
        let (want_e, want_w) = twins::moe_route(&logits, t, ne, k, norm);
        let (got_e, got_w) = route(&logits, t);
        assert_eq!(got_e, want_e, "{label}: experts");
        let err = rel(&got_w, &want_w);
        assert!(err < 1e-5, "{label}: weights {err}");
        if k > 1 {
            assert_eq!(
                &want_e[..2],
                &[0, 1],
                "{label}: a tie goes to the lower index"
            );
            assert_eq!(&want_e[k..k + 2], &[0, 1], "{label}");
        }
        // Rows of NaNs (a model's overflowed activations) still name valid experts, so
        // that every place is an expert's; and each at most once where only some of the
        // row's logits are NaN (row 0's expert 3; row 1's all but its first max(k/2, 1), so
        // that its choices run past the numbers into the NaNs), as the twin orders them.
        let mut partly = rng.vec(2 * ne, 4.0);
        for (e, x) in partly[ne..2 * ne].iter_mut().enumerate() {
            if e >= (k / 2).max(1) {
                *x = f32::NAN;
            }
        }
        partly[3] = f32::NAN;
        let (want_partly, _) = twins::moe_route(&partly, 2, ne, k, norm);
        assert_eq!(route(&partly, 2).0, want_partly, "{label}: partly NaN rows");
        for row in want_partly.chunks(k) {
            let mut seen = row.to_vec();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), k, "{label}: an expert twice in {row:?}");
        }
        let got = route(&vec![f32::NAN; 2 * ne], 2).0;
        assert!(
            got.iter().all(|&x| (0..ne as i32).contains(&x)),
            "{label}: {got:?}"
        );
        let sums: Vec<f32> = want_w.chunks(k).map(|w| w.iter().sum()).collect();
        assert_eq!(
            sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
            norm || k == ne,
            "{label}: {sums:?}"
        );

        let want = twins::moe_sort(&want_e, ne);
        let ex = up(g, &want_e);
        let offsets = up(g, &vec![-7i32; ne + 1]);
        let order = up(g, &vec![-7i32; places]);
        let slot = up(g, &vec![-7i32; places]);
        let active = up(g, &vec![-7i32; ne]);
        g.launch(
            "moe_sort",
            cfg(1, 256),
            &[
                ex.arg(),
                i(places),
                i(ne),
                offsets.arg(),
                order.arg(),
                slot.arg(),
                active.arg(),
            ],
        )
        .unwrap();
        let got = MoePlaces {
            offsets: down(g, &offsets),
            order: down(g, &order),
            slot: down(g, &slot),
            active: down(g, &active),
        };
        assert_eq!(got, want, "{label}: places");
        // The experts with places, in order, then −1s.
        let chosen: Vec<i32> = (0..ne as i32).filter(|e| want_e.contains(e)).collect();
        assert_eq!(&want.active[..chosen.len()], chosen, "{label}");
        assert!(
            want.active[chosen.len()..].iter().all(|&a| a == -1),
            "{label}"
        );
        assert_eq!(want.offsets[ne] as usize, places);
        for (p, &e) in want.order.iter().enumerate() {
            let x = want_e[e as usize] as usize;
            assert!((want.offsets[x]..want.offsets[x + 1]).contains(&(p as i32)));
        }

        // gate|up over the token's rows of h, then down over the places' rows; the
        // weights in f16 and, where the widths are multiples of 32, as Q8_0's values.
        let h: Vec<f16> = rng.vec(t * d, 1.0).into_iter().map(f16::from_f32).collect();
        let w_gu: Vec<f16> = rng
            .vec(ne * 2 * f * d, 0.5)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let gv: Vec<f16> = rng
            .vec(places * f, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let w_down: Vec<f16> = rng
            .vec(ne * d * f, 0.5)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let (hb, gb) = (up(g, &h), up(g, &gv));
        let mut forms = vec![(ExpertRows::F16(w_gu), ExpertRows::F16(w_down))];
        if d % 32 == 0 && f % 32 == 0 {
            let ExpertRows::F16(gu16) = &forms[0].0 else {
                unreachable!()
            };
            let ExpertRows::F16(down16) = &forms[0].1 else {
                unreachable!()
            };
            let q = (
                ExpertRows::Q8(Q8Rows::quantize(gu16)),
                ExpertRows::Q8(Q8Rows::quantize(down16)),
            );
            forms.push(q);
        }
        for (w_gu, w_down) in &forms {
            let want_gu = twins::moe_gemv(&h, &want, k, w_gu, d, 2 * f);
            let want_y = twins::moe_gemv(&gv, &want, 0, w_down, f, d);
            for (x, gather, w, kk, n, want_out, name) in [
                (&hb, k, w_gu, d, 2 * f, &want_gu, "gate|up"),
                (&gb, 0, w_down, f, d, &want_y, "down"),
            ] {
                let y = up(g, &vec![f32::NAN; places * n]);
                // A slot of blocks for each expert with places (at most the places).
                let launch = LaunchConfig {
                    grid_dim: ((n as u32).div_ceil(8), ne.min(places) as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let head = [x.arg(), order.arg(), offsets.arg(), active.arg(), i(gather)];
                let tail = [y.arg(), i(kk), i(n)];
                let (kernel, bufs) = match w {
                    ExpertRows::F16(w) => ("moe_gemv", (Some(up(g, w)), None, None)),
                    ExpertRows::Q8(m) => (
                        "moe_gemv_q8",
                        (None, Some(up(g, &m.q)), Some(up(g, &m.scales))),
                    ),
                    ExpertRows::Blocks(_) => unreachable!("the tensor cores' test's"),
                };
                let weights: Vec<Arg> = match &bufs {
                    (Some(w), _, _) => vec![w.arg()],
                    (_, Some(q), Some(sc)) => vec![q.arg(), sc.arg()],
                    _ => unreachable!("f16 or Q8_0's values here"),
                };
                let args: Vec<Arg> = head.into_iter().chain(weights).chain(tail).collect();
                g.launch(kernel, launch, &args).unwrap();
                let err = rel(&down(g, &y), want_out);
                assert!(err < 1e-5, "{label}: {kernel} {name} product {err}");
            }
        }

        // The combination, with the shared expert's gate and output where there is one.
        let y = rng.vec(places * d, 1.0);
        let gate = rng.vec(d, 0.5);
        let s_out = rng.vec(t * d, 1.0);
        let with = shared.map(|_| (&h[..], &gate[..], &s_out[..]));
        let want_o = twins::moe_combine(&y, &want, &want_w, k, with, t, d);
        let (yb, wb, gate_b, s_b) = (up(g, &y), up(g, &want_w), up(g, &gate), up(g, &s_out));
        let out = up(g, &vec![f32::NAN; t * d]);
        g.launch(
            "moe_combine",
            cfg(t as u32, 256),
            &[
                yb.arg(),
                slot.arg(),
                wb.arg(),
                i(k),
                hb.arg(),
                shared.map_or(Arg::Null, |_| gate_b.arg()),
                shared.map_or(Arg::Null, |_| s_b.arg()),
                out.arg(),
                i(d),
            ],
        )
        .unwrap();
        let err = rel(&down(g, &out), &want_o);
        assert!(err < 1e-5, "{label}: combined {err}");
    }
}

#[test]
fn expert_products_on_tensor_cores_match_gemv_and_their_twin() {
    on_each!(moe_tc_case);
}

/// A matrix of random weights in `ty`'s blocks as the backend lays it out (its file
/// blocks as the CPU holds them, else its packed form, else its blocks and offsets per 16).
fn laid_out(rng: &mut Rng, ty: GgmlType, n: usize, k: usize) -> QuantRows {
    let (blocks, _) = super::gemv::quant_weights(rng, ty, n, k);
    let m = kernels::model::matrix_of(ty, n, k, &blocks);
    let rows = match (m.file_blocks(), m.packed_values(), m.blocks_with_offsets()) {
        (Some((held, data)), ..) => QuantRows::from_blocks(held, data, n, k),
        (None, Some(p), _) => QuantRows::from_packed(p),
        (None, None, Some((held, data, o))) => QuantRows::from_offsets(held, data, &o, n, k),
        _ => None,
    };
    rows.unwrap_or_else(|| panic!("{ty:?}: no layout"))
}

/// `moe_tc_*` over each layout the files' experts come in (gate and up of two layouts,
/// as two parts, once): the gate|up product over the tokens' rows of h, then the down
/// product with swiglu made in it, each place's row **bit for bit** the dense `gemv` of
/// the same rows and the expert's matrix (the same product, 16 rows a pass: expert 0 has
/// all 20 rows, two passes) and within 1e-5 of the twin (the same weights, summed in f32
/// in order); an expert no row chose (the last slot returns), poisoned outputs; and rows too
/// wide for the shared memory, read in runs of their columns.
fn moe_tc_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{
        column_run, expert_products, gemv_from, ExpertBuf, ExpertInput, Input, QuantBuf, Routing,
        Staged, Weights, MAX_ROWS,
    };
    let mut rng = Rng(23);
    let what = g.describe();
    // (gate's and down's layout, up's, dim, expert width)
    let mut cases = vec![
        (GgmlType::Q4_0, GgmlType::Q4_0, 256, 256),
        (GgmlType::Q8_0, GgmlType::Q8_0, 256, 256),
        (GgmlType::Q4_1, GgmlType::Q4_1, 256, 256),
        (GgmlType::Q2_K, GgmlType::Q2_K, 256, 256),
        (GgmlType::Q3_K, GgmlType::Q3_K, 256, 256),
        // Rows too wide to stage whole: read in runs.
        (GgmlType::Q4_0, GgmlType::Q4_0, 7168, 32),
    ];
    if kernels::packed::available() {
        cases.extend([
            (GgmlType::Q4_K, GgmlType::Q4_K, 256, 256),
            (GgmlType::Q5_K, GgmlType::Q5_K, 256, 256),
            (GgmlType::Q6_K, GgmlType::Q6_K, 256, 256),
            (GgmlType::IQ4_XS, GgmlType::IQ4_XS, 256, 256),
            (GgmlType::Q4_K, GgmlType::Q6_K, 256, 256),
        ]);
    } else {
        println!("skipped the K-quant experts: this CPU has no packed kernels to make them");
    }
    // 5 experts, 2 a row: expert 0 every row's first choice, 2..=4 the second, 1 none (so
    // that slot y's expert is not y).
    let (ne, used, t) = (5, 2, 20);
    let expert: Vec<i32> = (0..t as i32).flat_map(|r| [0, 2 + r % 3]).collect();
    let places = twins::moe_sort(&expert, ne);
    assert_eq!(places.active, [0, 2, 3, 4, -1]);
    let n_places = t * used;
    let order = up(g, &places.order);
    let offsets = up(g, &places.offsets);
    let active = up(g, &places.active);
    let routing = Routing {
        order: &order,
        offsets: &offsets,
        active: &active,
        rows: t,
        used,
    };
    let max_shared = g.max_shared_bytes().unwrap();
    for (ty, ty_up, d, f) in cases {
        let label = format!("{what}: {ty:?} (up {ty_up:?}), {d} wide, experts of {f}");
        if d > 256 {
            let run = column_run(MAX_ROWS, d, max_shared, Staged::MOST);
            assert!(
                run.is_some_and(|r| r < d),
                "{label}: read in runs ({run:?})"
            );
        }
        let stacks: Vec<Vec<QuantRows>> = (0..ne)
            .map(|_| {
                let gate = laid_out(&mut rng, ty, f, d);
                let upr = laid_out(&mut rng, ty_up, f, d);
                QuantRows::stack(vec![gate, upr])
            })
            .collect();
        let downs: Vec<Vec<QuantRows>> = (0..ne)
            .map(|_| vec![laid_out(&mut rng, ty, d, f)])
            .collect();
        let gu_blocks = ExpertBlocks::new(stacks).expect("a layout moe_tc reads");
        let down_blocks = ExpertBlocks::new(downs).expect("a layout moe_tc reads");
        assert_eq!(
            gu_blocks.parts.len(),
            if ty == ty_up { 1 } else { 2 },
            "{label}"
        );
        let bufs = |b: &ExpertBlocks| -> Vec<ExpertBuf<E>> {
            b.parts
                .iter()
                .map(|p| ExpertBuf::upload(g, p).unwrap())
                .collect()
        };
        let (gu_bufs, down_bufs) = (bufs(&gu_blocks), bufs(&down_blocks));
        let h: Vec<f16> = rng.vec(t * d, 1.0).into_iter().map(f16::from_f32).collect();
        let hb = up(g, &h);

        let mut gu = up(g, &vec![f32::NAN; n_places * 2 * f]);
        let input = ExpertInput::Rows {
            x: &hb,
            gather: used,
        };
        expert_products(g, input, &gu_bufs, &routing, &mut gu, d, 2 * f).unwrap();
        let mut y = up(g, &vec![f32::NAN; n_places * d]);
        expert_products(
            g,
            ExpertInput::Swiglu(&gu),
            &down_bufs,
            &routing,
            &mut y,
            f,
            d,
        )
        .unwrap();
        let (got_gu, got_y) = (down(g, &gu), down(g, &y));

        let gu_rows = ExpertRows::Blocks(gu_blocks.clone());
        let want_gu = twins::moe_gemv(&h, &places, used, &gu_rows, d, 2 * f);
        let err = rel(&got_gu, &want_gu);
        assert!(err < 1e-5, "{label}: gate|up against the twin: {err}");
        let gv = twins::swiglu(&got_gu, n_places, f);
        let down_rows = ExpertRows::Blocks(down_blocks.clone());
        let want_y = twins::moe_gemv(&gv, &places, 0, &down_rows, f, d);
        let err = rel(&got_y, &want_y);
        assert!(err < 1e-5, "{label}: down against the twin: {err}");

        // Each expert's places, 16 at a time, through the dense product.
        for e in 0..ne {
            let (p0, p1) = (places.offsets[e] as usize, places.offsets[e + 1] as usize);
            let expert_bufs = |b: &ExpertBlocks| -> Vec<QuantBuf<E>> {
                b.parts
                    .iter()
                    .map(|p| QuantBuf::upload(g, &p[e]).unwrap())
                    .collect()
            };
            let (wgu, wdown) = (expert_bufs(&gu_blocks), expert_bufs(&down_blocks));
            for c0 in (p0..p1).step_by(MAX_ROWS) {
                let m = MAX_ROWS.min(p1 - c0);
                // gemv's bits where it reads the rows in the runs the experts' product
                // reads them in (those of 16 rows, whatever the rows: a row's sums the same
                // alone and in a batch); within the bound where gemv's fewer rows take
                // fewer runs.
                let check = |dense: &[f32], want: &[f32], m: usize, k: usize, what: &str| {
                    let runs = |rows| column_run(rows, k, max_shared, Staged::MOST);
                    let here = format!("{label}: expert {e}, places {c0}.., {what}");
                    if runs(m) == runs(MAX_ROWS) {
                        let same = dense
                            .iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{here}: not gemv's bits");
                    } else {
                        let err = rel(dense, want);
                        assert!(err < 1e-5, "{here}: {err} from gemv's");
                    }
                };
                let x: Vec<f16> = (c0..c0 + m)
                    .flat_map(|p| {
                        let r = places.order[p] as usize / used;
                        h[r * d..(r + 1) * d].to_vec()
                    })
                    .collect();
                let mut dense = up(g, &vec![f32::NAN; m * 2 * f]);
                let xd = up(g, &x);
                gemv_from(
                    g,
                    Input::Rows(&xd),
                    Weights::Quant(&wgu),
                    &mut dense,
                    m,
                    d,
                    2 * f,
                )
                .unwrap();
                let want = &got_gu[c0 * 2 * f..(c0 + m) * 2 * f];
                check(&down(g, &dense), want, m, d, "gate|up");
                let rows = up(g, &got_gu[c0 * 2 * f..(c0 + m) * 2 * f]);
                let mut dense = up(g, &vec![f32::NAN; m * d]);
                gemv_from(
                    g,
                    Input::Swiglu(&rows),
                    Weights::Quant(&wdown),
                    &mut dense,
                    m,
                    f,
                    d,
                )
                .unwrap();
                let want = &got_y[c0 * d..(c0 + m) * d];
                check(&down(g, &dense), want, m, f, "down");
            }
        }
    }
}
