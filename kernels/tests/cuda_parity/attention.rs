//! Attention (prefill and decode, and the tensor-core kernel) against its twin, in every
//! build and launch shape.

use super::*;

// The general build with 4 warps per block (and a 16-warp launch, whose extra warps it
// must leave idle), and the build the backend loads for SmolLM2 with 4 to 16 warps: each
// build and head shape of [`attention_builds`] a test of its own, so that they run side
// by side (together they are the suite's longest).

#[test]
fn attention_prefill_and_decode_match_their_twin_general_smollm2() {
    attention_in_builds(0);
}

#[test]
fn attention_prefill_and_decode_match_their_twin_general_groups_of_8() {
    attention_in_builds(1);
}

#[test]
fn attention_prefill_and_decode_match_their_twin_general_heads_96() {
    attention_in_builds(2);
}

#[test]
fn attention_prefill_and_decode_match_their_twin_fitted_smollm2() {
    attention_in_builds(3);
}

#[test]
fn attention_prefill_and_decode_match_their_twin_fitted_windowed() {
    attention_in_builds(4);
}

/// Case `i` of [`attention_builds`] on the emulator and on a GPU.
fn attention_in_builds(i: usize) {
    if let (Some(general), Some(fitted)) = (emu(), emu_for(&smol())) {
        attention_builds(&general, &fitted, i);
    }
    if let (Some(general), Some(fitted)) = (gpu(), gpu_for(&smol())) {
        attention_builds(&general, &fitted, i);
    }
}

/// Heads 256 wide (Gemma 3's 1B–12B, Gemma 2's 2B and 9B: 32 lanes a key, one key a warp
/// at a time), in pairs on a KV head, in the build the backend loads for them: against the
/// twin and the same bits for other launches, with a sliding window and soft cap and
/// without.
#[test]
fn attention_on_heads_256_wide_matches_its_twin() {
    let wide = wide_heads();
    let windowed = LlamaConfig {
        window: windowed().window,
        attn_softcap: windowed().attn_softcap,
        ..wide.clone()
    };
    let launches = [(256, Spread::One), (128, Spread::HalfRows(5))];
    if let Some(fitted) = emu_for(&wide) {
        same_bits_for_every_launch(&fitted, &wide, false, &launches);
        same_bits_for_every_launch(&fitted, &windowed, false, &launches);
    }
    if let Some(fitted) = gpu_for(&wide) {
        same_bits_for_every_launch(&fitted, &wide, false, &launches);
        same_bits_for_every_launch(&fitted, &windowed, false, &launches);
    }
}

/// 4 query heads on 2 KV heads, 256 wide (Gemma 2-2B's group, Gemma 3's head width).
fn wide_heads() -> LlamaConfig {
    LlamaConfig {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 256,
        ..smol()
    }
}

/// Each build against the twin at every launch width and split; and within a build, the
/// same bits whatever the width (the keys' split into slices does not depend on it) and
/// whatever the number of blocks a row's chunks are spread over (they are merged in chunk
/// order either way), so a row's output does not depend on the batch around it.
/// The general build also runs the other head shapes it supports: groups of 8 with
/// head_dim 128 (16 lanes per key), and head_dim 96 (lanes past the head in each key's
/// group of 16).
/// Case `i` (0 to 4) of them: the general build with SmolLM2's heads, groups of 8 and
/// head_dim 96; the fitted build with SmolLM2's heads, and with a sliding window.
fn attention_builds<E: Exec>(general: &E, fitted: &E, i: usize) {
    let (wide, odd) = other_head_shapes();
    let cases = [
        (general, smol()),
        (general, wide),
        (general, odd),
        (fitted, smol()),
        (fitted, windowed()),
    ];
    if let Some((g, c)) = cases.into_iter().nth(i) {
        // Wider blocks; chunks spread over 2 and 5 blocks (with 5, only the first half of
        // the rows may split: the rest keep one block); more blocks than any row's chunks.
        same_bits_for_every_launch(
            g,
            &c,
            false,
            &[
                (256, Spread::One),
                (512, Spread::One),
                (128, Spread::Blocks(2)),
                (512, Spread::HalfRows(5)),
                (256, Spread::Blocks(64)),
            ],
        );
    }
}

/// Runs [`attention_case`] with 128 threads in one block, then at each (threads, spread) of
/// `launches`, each of which must give the same bits. On the racecheck build (which looks
/// for races, not for other bits: the plain build compares every launch), the SIMT kernel
/// runs only the launches that merge a row's chunks across blocks unevenly (`HalfRows`)
/// or a chunk a block (`Blocks` of more than 2): with the first launch they take every
/// width of `launches` (128, 256, 512) and every way blocks meet, and the others, minutes
/// of instrumented accesses there, add no other pattern (`scripts/test.sh`).
fn same_bits_for_every_launch<E: Exec>(
    g: &E,
    c: &LlamaConfig,
    tc: bool,
    launches: &[(u32, Spread)],
) {
    let base = attention_case(g, 128, Spread::One, c, tc);
    let racecheck = cfg!(tollgate_emu_racecheck);
    for &(threads, spread) in launches {
        if racecheck && !tc && matches!(spread, Spread::One | Spread::Blocks(..=2)) {
            continue;
        }
        let other = attention_case(g, threads, spread, c, tc);
        assert!(
            other == base,
            "{}: {}head_dim {}: {threads} threads, {spread:?} give other bits than 128 \
             threads in one block",
            g.describe(),
            if tc { "attention_tc, " } else { "" },
            c.head_dim
        );
    }
}

/// SmolLM2's attention on a sliding window of 200 positions (Gemma 2's and 3's windowed
/// layers): the short rows' first keys, and the long rows' first chunks, fall outside it),
/// with a soft cap of 4 on the scores (Gemma 2's).
fn windowed() -> LlamaConfig {
    LlamaConfig {
        window: Some(kernels::model::SlidingWindow {
            size: 200,
            period: 0,
            rope_base: None,
        }),
        attn_softcap: Some(4.0),
        ..smol()
    }
}

/// The other head shapes the general build supports: groups of 8 with head_dim 128 (16
/// lanes per key), and head_dim 96 (lanes past the head in each key's group of 16).
fn other_head_shapes() -> (LlamaConfig, LlamaConfig) {
    let wide = LlamaConfig {
        n_heads: 16,
        n_kv_heads: 2,
        head_dim: 128,
        ..smol()
    };
    let odd = LlamaConfig {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 96,
        ..smol()
    };
    (wide, odd)
}

/// How an attention launch spreads a row's chunks over blocks.
#[derive(Debug, Clone, Copy)]
enum Spread {
    One,
    /// Over this many blocks (the grid's z).
    Blocks(u32),
    /// Over this many blocks, rows in the first half of the batch only.
    HalfRows(u32),
}

/// Prefill and decode attention on random batches (the same for every call) with
/// `threads` per block and the chunks spread as `spread`, each against the twin; returns
/// the outputs' bits. With `tc`, every case runs `attention_tc` instead (which takes the
/// prefill kernel's arguments), and each prefill case runs again with every row alone,
/// as a decode step would hold it: the bits must not change.
fn attention_case<E: Exec>(
    g: &E,
    threads: u32,
    spread: Spread,
    c: &LlamaConfig,
    tc: bool,
) -> Vec<Vec<u16>> {
    let mut outs = Vec::new();
    let mut rng = Rng(6);
    let c = c.clone();
    let (bs, n_blocks) = (16, 1024);
    let max_blocks = c.context_len / bs;
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    // Short contexts (up to ~360 keys, one chunk); a decode step at long ones (1,200–2,000
    // keys: every stream walks many keys and table entries, over 3–4 chunks); a decode step
    // at the chunks' edges; and a prefill whose rows cross them. The racecheck build
    // (every access instrumented: most of its time is these prefills' rows) takes fewer
    // prefill rows of the same kinds — 3 sequences of up to 24 rows, and 28 rows from 20
    // keys before a chunk's edge — so that a row still crosses an edge.
    let (seqs, rows, across) = match cfg!(tollgate_emu_racecheck) {
        true => (3, 24, 28),
        false => (9, 60, 40),
    };
    for (name, decode, kind) in [
        ("attention_prefill", false, "short"),
        ("attention_decode", true, "short"),
        ("attention_decode", true, "long"),
        ("attention_decode", true, "edges"),
        ("attention_prefill", false, "across"),
    ] {
        let b = match kind {
            "long" | "edges" => {
                let keys: Vec<usize> = if kind == "long" {
                    (0..5).map(|_| 1201 + rng.below(800)).collect()
                } else {
                    let ck = ATTENTION_CHUNK_KEYS;
                    vec![1, ck - 1, ck, ck + 1, 2 * ck, 2 * ck + 1, 3 * ck - 1]
                };
                let mut b = Batch::default();
                let mut next = 0u32;
                for n in keys {
                    let need = n.div_ceil(bs) as u32;
                    b.push(
                        &[rng.below(49152) as u32],
                        n - 1,
                        (next..next + need).collect(),
                        true,
                    );
                    next += need;
                }
                b
            }
            "across" => {
                let mut b = Batch::default();
                let mut next = 0u32;
                for pos0 in [ATTENTION_CHUNK_KEYS - 20, 1000] {
                    let len = across;
                    let need = (pos0 + len).div_ceil(bs) as u32;
                    let toks: Vec<u32> = (0..len).map(|_| rng.below(49152) as u32).collect();
                    b.push(&toks, pos0, (next..next + need).collect(), true);
                    next += need;
                }
                b
            }
            _ if decode => random_batch(&mut rng, 33, 1, bs, max_blocks),
            _ => random_batch(&mut rng, seqs, rows, bs, max_blocks),
        };
        let (cache, (_, kc, vc)) = rope_kv(g, &c, &b, bs, n_blocks, &mut rng, false, false, 0);
        let t = b.tokens.len();
        let inp = twins::build_batch(
            &twins::stage(&b, max_blocks),
            &[],
            b.seqs.len(),
            t,
            max_blocks,
            bs,
        );
        // Both sides read the twin's rotated rows; the caches were written by each side.
        let want = twins::attention(
            &cache.qkv,
            cache.stride,
            &cache.k,
            &cache.v,
            &inp.block_tables,
            &inp.seq_of_row,
            &inp.positions,
            max_blocks,
            &c,
            0,
            bs,
        );
        let (qd, tb, sr, pd) = (
            up(g, &cache.qkv),
            up(g, &inp.block_tables),
            up(g, &inp.seq_of_row),
            up(g, &inp.positions),
        );
        let out = up(g, &nan16(t * c.n_heads * c.head_dim));
        let name = if tc { "attention_tc" } else { name };
        let mut args = vec![qd.arg(), i(cache.stride), kc.arg(), vc.arg(), tb.arg()];
        if !decode || tc {
            args.push(sr.arg());
        }
        args.extend([
            pd.arg(),
            out.arg(),
            i(max_blocks),
            i(c.n_heads),
            i(c.n_kv_heads),
            i(c.head_dim),
            i(bs),
            Arg::F32(scale),
            i(c.window_at(0).unwrap_or(0)),
            Arg::F32(c.attn_softcap.unwrap_or(0.0)),
        ]);
        // Partial states poisoned (a merge of one never written shows as NaN), arrival
        // counts zeroed as the backend allocates them.
        let (z, part_rows) = match spread {
            Spread::One => (1, t),
            Spread::Blocks(z) => (z, t),
            Spread::HalfRows(z) => (z, t / 2),
        };
        let chunks = (max_blocks * bs).div_ceil(ATTENTION_CHUNK_KEYS);
        let width = c.n_heads * c.head_dim;
        let part = up(g, &vec![f32::NAN; t * chunks * width * 3]);
        let arrive = up(g, &vec![0i32; t * c.n_kv_heads]);
        args.extend([part.arg(), arrive.arg(), i(part_rows), i(chunks)]);
        let launch = LaunchConfig {
            grid_dim: (t as u32, c.n_kv_heads as u32, z),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        g.launch(name, launch, &args).unwrap();
        let got = down(g, &out);
        let e = rel(&f32s(&got), &f32s(&want));
        // attention_tc rounds the queries and the softmax weights to f16: on the
        // emulator it is within 0.4–0.9e-3 of the twin on these cases.
        assert!(
            e < 3e-3,
            "{}: {name} ({kind}), head_dim {}, {threads} threads, {spread:?}: {e}",
            g.describe(),
            c.head_dim
        );
        assert!(
            down(g, &arrive).iter().all(|&n| n == 0),
            "{}: {name} ({kind}), {spread:?}: the arrival counts are left at 0 for the next \
             launch",
            g.describe()
        );
        if tc && !decode {
            // Each row alone: its own sequence (its table copied), a tile of one.
            let alone: Vec<i32> = (0..t as i32).collect();
            let tables: Vec<i32> = inp
                .seq_of_row
                .iter()
                .flat_map(|&s| inp.block_tables[s as usize * max_blocks..][..max_blocks].to_vec())
                .collect();
            let (tb1, sr1) = (up(g, &tables), up(g, &alone));
            let out1 = up(g, &nan16(t * c.n_heads * c.head_dim));
            let mut args1 = args.clone();
            args1[4] = tb1.arg();
            args1[5] = sr1.arg();
            args1[7] = out1.arg();
            g.launch(name, launch, &args1).unwrap();
            assert!(
                down(g, &out1) == got,
                "{}: attention_tc ({kind}), head_dim {}, {spread:?}: a row alone gives other \
                 bits than the same row in its prompt's tile",
                g.describe(),
                c.head_dim
            );
        }
        outs.push(got.iter().map(|h| h.to_bits()).collect());
    }
    outs
}

#[test]
fn tensor_core_attention_matches_its_twin_and_a_rows_bits_do_not_depend_on_its_tile() {
    if let (Some(general), Some(fitted)) = (emu(), emu_for(&smol())) {
        tensor_core_builds(&general, &fitted);
    }
    if let (Some(general), Some(fitted)) = (gpu(), gpu_for(&smol())) {
        tensor_core_builds(&general, &fitted);
    }
}

/// `attention_tc` against the twin for each head shape, and within the build for SmolLM2
/// the same bits for a wider launch and for any split of a row's chunks over blocks (the
/// emulator runs each tensor-core product lane by lane: the other shapes run once).
fn tensor_core_builds<E: Exec>(general: &E, fitted: &E) {
    let (wide, odd) = other_head_shapes();
    for (g, c) in [(general, wide), (general, odd)] {
        attention_case(g, 128, Spread::One, &c, true);
    }
    same_bits_for_every_launch(
        fitted,
        &smol(),
        true,
        &[
            (256, Spread::One),
            (128, Spread::Blocks(2)),
            (128, Spread::HalfRows(5)),
            (128, Spread::Blocks(64)),
        ],
    );
    same_bits_for_every_launch(fitted, &windowed(), true, &[(128, Spread::HalfRows(5))]);
}
