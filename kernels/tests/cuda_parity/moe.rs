//! A mixture of experts' kernels (`kernels/cuda/moe.cu`) against their twins, each fed its
//! twin's inputs: routing (ties included), the places by expert (more entries than
//! `moe_sort` stages at once; all 256 experts a block has threads for), both expert
//! products over f16 weights and over Q8_0's values, and the combination with and without
//! a shared expert.

use super::*;
use kernels::cuda::twins::{ExpertRows, MoePlaces, Q8Rows};

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
        let (want_e, want_w) = twins::moe_route(&logits, t, ne, k, norm);
        let l = up(g, &logits);
        let expert = up(g, &vec![-7i32; places]);
        let weight = up(g, &vec![f32::NAN; places]);
        g.launch(
            "moe_route",
            norm_launch(t),
            &[
                l.arg(),
                i(t),
                i(ne),
                i(k),
                i(norm as usize),
                expert.arg(),
                weight.arg(),
            ],
        )
        .unwrap();
        assert_eq!(down(g, &expert), want_e, "{label}: experts");
        let err = rel(&down(g, &weight), &want_w);
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
        // that every place is an expert's.
        let nan = up(g, &vec![f32::NAN; 2 * ne]);
        let nan_experts = up(g, &vec![-7i32; 2 * k]);
        let nan_weights = up(g, &vec![0f32; 2 * k]);
        let args = [
            nan.arg(),
            i(2),
            i(ne),
            i(k),
            i(norm as usize),
            nan_experts.arg(),
            nan_weights.arg(),
        ];
        g.launch("moe_route", norm_launch(2), &args).unwrap();
        let got = down(g, &nan_experts);
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
            ],
        )
        .unwrap();
        let got = MoePlaces {
            offsets: down(g, &offsets),
            order: down(g, &order),
            slot: down(g, &slot),
        };
        assert_eq!(got, want, "{label}: places");
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
                let launch = LaunchConfig {
                    grid_dim: ((n as u32).div_ceil(8), ne as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let head = [x.arg(), order.arg(), offsets.arg(), i(gather)];
                let tail = [y.arg(), i(kk), i(n)];
                let (kernel, bufs) = match w {
                    ExpertRows::F16(w) => ("moe_gemv", (Some(up(g, w)), None, None)),
                    ExpertRows::Q8(m) => (
                        "moe_gemv_q8",
                        (None, Some(up(g, &m.q)), Some(up(g, &m.scales))),
                    ),
                };
                let weights: Vec<Arg> = match &bufs {
                    (Some(w), _, _) => vec![w.arg()],
                    (_, Some(q), Some(sc)) => vec![q.arg(), sc.arg()],
                    _ => unreachable!(),
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
