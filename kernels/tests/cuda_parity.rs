//! Each CUDA kernel against its CPU twin (`kernels::cuda::twins`) on fresh random inputs.
//! Output buffers are poisoned before each launch (NaN, or a sentinel for integers), so an
//! element the kernel fails to write fails the comparison.
//!
//! Every test runs twice: on the CPU emulator (`kernels::cuda::emu`, the kernel sources
//! themselves built for the host; always, where the build has it) and on GPU 0 (skipped
//! with a printed reason where there is none). On a GPU machine `kernels/gpu-check.sh` runs
//! this binary (built here with `cargo test --release -p kernels --test cuda_parity
//! --no-run`).

mod common;

use common::rel_err as rel;
use common::{emu, emu_for, gpu, gpu_for};
use cudarc::driver::LaunchConfig;
use half::f16;
use kernels::adjust::{allowed, Adjust, Carry};
use kernels::backend::FROM_LAST;
use kernels::cuda::device::ATTENTION_CHUNK_KEYS;
use kernels::cuda::exec::{Arg, DevBuf, Elem, Exec};
use kernels::cuda::twins::{self, SampleParams};
use kernels::cuda::{norm_launch, swiglu_launch};
use kernels::forward::Batch;
use kernels::gguf::GgmlType;
use kernels::model::LlamaConfig;

/// xorshift64*: reproducible random inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

fn cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn up<E: Exec, T: Elem>(e: &E, v: &[T]) -> E::Buf<T> {
    e.upload(v).unwrap()
}

fn down<E: Exec, T: Elem>(e: &E, v: &E::Buf<T>) -> Vec<T> {
    e.download(v, v.elems()).unwrap()
}

fn i(v: usize) -> Arg {
    Arg::I32(v as i32)
}

fn nan16(n: usize) -> Vec<f16> {
    vec![f16::NAN; n]
}

fn f32s(v: &[f16]) -> Vec<f32> {
    v.iter().map(|h| h.to_f32()).collect()
}

/// SmolLM2's attention shape.
fn smol() -> LlamaConfig {
    LlamaConfig {
        context_len: 2048,
        ..LlamaConfig::smollm2_135m()
    }
}

fn random_batch(
    rng: &mut Rng,
    seqs: usize,
    max_len: usize,
    block_size: usize,
    max_blocks: usize,
) -> Batch {
    let mut b = Batch::default();
    let mut next_block = 0u32;
    for _ in 0..seqs {
        let len = 1 + rng.below(max_len);
        let pos0 = rng.below(300);
        let need = (pos0 + len).div_ceil(block_size);
        assert!(need <= max_blocks);
        let table: Vec<u32> = (0..need as u32).map(|i| next_block + i).collect();
        next_block += need as u32;
        let toks: Vec<u32> = (0..len).map(|_| rng.below(49152) as u32).collect();
        b.push(&toks, pos0, table, rng.below(2) == 0);
    }
    b
}

/// Runs `case` on the emulator (the general build) and on GPU 0, where each is present.
macro_rules! on_each {
    ($case:ident) => {{
        if let Some(e) = emu() {
            $case(&e);
        }
        if let Some(g) = gpu() {
            $case(&g);
        }
    }};
}

#[test]
fn build_batch_matches_its_twin() {
    on_each!(build_batch_case);
}

fn build_batch_case<E: Exec>(g: &E) {
    let mut rng = Rng(1);
    let (bs, mb) = (16, 64);
    // 600 sequences: each thread of the logit-rows scan counts a run of 3.
    for (seqs, max_len) in [(37, 40), (600, 3)] {
        let b = random_batch(&mut rng, seqs, max_len, bs, mb);
        let (s, t) = (b.seqs.len(), b.tokens.len());
        let mut staging = twins::stage(&b, mb);
        // Every fifth token stands for one the step before sampled.
        let sampled: Vec<u32> = (0..64).map(|_| rng.below(50_000) as u32).collect();
        for w in staging[4 * s..4 * s + t].iter_mut().step_by(5) {
            *w = FROM_LAST | rng.below(sampled.len()) as u32;
        }
        let want = twins::build_batch(&staging, &sampled, s, t, mb, bs);
        assert!(want.tokens.iter().all(|&t| t & FROM_LAST == 0));
        let st = up(g, &staging);
        let last = up(g, &sampled);
        let tokens = up(g, &vec![0xDEAD_BEEFu32; t]);
        let positions = up(g, &vec![0xDEAD_BEEFu32; t]);
        let slots = up(g, &vec![-7i32; t]);
        let seq_of_row = up(g, &vec![-7i32; t]);
        let tables = up(g, &vec![-7i32; s * mb]);
        let logit_rows = up(g, &vec![-7i32; s]);
        let n = t.max(s * mb).max(s) as u32;
        let args = [
            st.arg(),
            last.arg(),
            i(s),
            i(t),
            i(mb),
            i(bs),
            tokens.arg(),
            positions.arg(),
            slots.arg(),
            seq_of_row.arg(),
            tables.arg(),
            logit_rows.arg(),
        ];
        g.launch("build_batch", cfg(n.div_ceil(256), 256), &args)
            .unwrap();
        let what = g.describe();
        assert_eq!(down(g, &tokens), want.tokens, "{what}");
        assert_eq!(down(g, &positions), want.positions, "{what}");
        assert_eq!(down(g, &slots), want.slot_mapping, "{what}");
        assert_eq!(down(g, &seq_of_row), want.seq_of_row, "{what}");
        assert_eq!(down(g, &tables), want.block_tables, "{what}");
        assert_eq!(
            down(g, &logit_rows),
            want.logit_rows,
            "{what}: {seqs} sequences"
        );
    }
}

#[test]
fn embed_matches_its_twin() {
    on_each!(embed_case);
}

fn embed_case<E: Exec>(g: &E) {
    let mut rng = Rng(2);
    let (vocab, dim, t) = (5000, 576, 300);
    let table: Vec<f16> = rng
        .vec(vocab * dim, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let toks: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
    let want = twins::embed(&table, &toks, dim);
    let (td, tk) = (up(g, &table), up(g, &toks));
    let x = up(g, &vec![f32::NAN; t * dim]);
    let args = [td.arg(), tk.arg(), x.arg(), i(dim)];
    g.launch("embed", cfg(t as u32, 256), &args).unwrap();
    assert_eq!(down(g, &x), want, "{}", g.describe());
}

#[test]
fn add_rmsnorm_matches_its_twin() {
    on_each!(add_rmsnorm_case);
}

fn add_rmsnorm_case<E: Exec>(g: &E) {
    let what = g.describe();
    let mut rng = Rng(3);
    let (t, dim, eps) = (257, 576, 1e-5f32);
    let x0 = rng.vec(t * dim, 3.0);
    let delta = rng.vec(t * dim, 1.0);
    let w = rng.vec(dim, 1.0);
    let mut xw = x0.clone();
    let want = twins::add_rmsnorm(&mut xw, Some(&delta), &w, None, dim, eps);
    let xd = up(g, &x0);
    let (dd, wd) = (up(g, &delta), up(g, &w));
    let out = up(g, &nan16(t * dim));
    let args = [
        xd.arg(),
        dd.arg(),
        wd.arg(),
        out.arg(),
        Arg::Null,
        i(t),
        i(dim),
        Arg::F32(eps),
    ];
    g.launch("add_rmsnorm", norm_launch(t), &args).unwrap();
    assert!(rel(&down(g, &xd), &xw) < 1e-6, "{what}: residual add");
    let e = rel(&f32s(&down(g, &out)), &f32s(&want));
    assert!(e < 2e-3, "{what}: normalized rows: {e}");
    // Selected rows with the add (the logits path), with an unused −1 entry.
    let rows = vec![5i32, 0, 256, -1];
    let want = twins::add_rmsnorm(&mut xw, Some(&delta), &w, Some(&rows), dim, eps);
    let rd = up(g, &rows);
    let out = up(g, &nan16(rows.len() * dim));
    let args = [
        xd.arg(),
        dd.arg(),
        wd.arg(),
        out.arg(),
        rd.arg(),
        i(rows.len()),
        i(dim),
        Arg::F32(eps),
    ];
    g.launch("add_rmsnorm", norm_launch(rows.len()), &args)
        .unwrap();
    let e = rel(&f32s(&down(g, &out)), &f32s(&want));
    assert!(e < 2e-3, "{what}: selected rows: {e}");
    assert!(
        rel(&down(g, &xd), &xw) < 1e-6,
        "{what}: residual add of the selected rows"
    );
}

struct Cache {
    k: Vec<f16>,
    v: Vec<f16>,
    /// The QKV rows after RoPE (queries and keys rotated), `stride` floats each.
    qkv: Vec<f32>,
    stride: usize,
}

/// The device's rotated rows, key cache and value cache.
type Written<E> = (
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<f16>,
    <E as Exec>::Buf<f16>,
);

/// A random batch's QKV rows through `rope_kv_write` into a cache filled with arbitrary
/// values, on both sides; returns the twin's cache and rows and the device's.
fn rope_kv<E: Exec>(
    g: &E,
    c: &LlamaConfig,
    b: &Batch,
    bs: usize,
    n_blocks: usize,
    rng: &mut Rng,
) -> (Cache, Written<E>) {
    let t = b.tokens.len();
    let (qd, kd) = (c.n_heads * c.head_dim, c.kv_dim());
    // A row stride wider than q|k|v, as a guard that the kernel follows it.
    let stride = qd + 2 * kd + 8;
    let mut qkv = rng.vec(t * stride, 2.0);
    let max_blocks = c.context_len / bs;
    let inp = twins::build_batch(
        &twins::stage(b, max_blocks),
        &[],
        b.seqs.len(),
        t,
        max_blocks,
        bs,
    );
    let n = n_blocks * bs * kd;
    // Slots no row writes hold arbitrary (finite) values on both sides.
    let fill: Vec<f16> = rng.vec(n, 1.0).into_iter().map(f16::from_f32).collect();
    let (qg, sm, pd) = (up(g, &qkv), up(g, &inp.slot_mapping), up(g, &inp.positions));
    let (kc, vc) = (up(g, &fill), up(g, &fill));
    let mut cache_k = fill.clone();
    let mut cache_v = fill;
    twins::rope_kv_write(
        &mut qkv,
        stride,
        &inp.positions,
        &inp.slot_mapping,
        &mut cache_k,
        &mut cache_v,
        c,
        bs,
    );
    let n_threads = (t * c.head_dim / 2) as u32;
    let args = [
        qg.arg(),
        i(stride),
        pd.arg(),
        sm.arg(),
        kc.arg(),
        vc.arg(),
        i(t),
        i(c.n_heads),
        i(c.n_kv_heads),
        i(c.head_dim),
        i(bs),
        Arg::F32(c.rope_base),
    ];
    g.launch("rope_kv_write", cfg(n_threads.div_ceil(256), 256), &args)
        .unwrap();
    let cache = Cache {
        k: cache_k,
        v: cache_v,
        qkv,
        stride,
    };
    (cache, (qg, kc, vc))
}

#[test]
fn rope_kv_write_matches_its_twin() {
    on_each!(rope_case);
}

fn rope_case<E: Exec>(g: &E) {
    let what = g.describe();
    let mut rng = Rng(4);
    let c = smol();
    // Positions up to ~2000 (the batch's own), rows of many sequences.
    let b = random_batch(&mut rng, 20, 30, 16, 128);
    let (want, (qg, kc, vc)) = rope_kv(g, &c, &b, 16, 1024, &mut rng);
    // Angles of hundreds of radians: float argument reduction differs in the last bits.
    assert!(rel(&down(g, &qg), &want.qkv) < 1e-3, "{what}: rotated rows");
    let close = |a: &[f16], b: &[f16]| rel(&f32s(a), &f32s(b));
    assert!(
        close(&down(g, &kc), &want.k) < 2e-3,
        "{what}: keys in the cache"
    );
    assert_eq!(down(g, &vc), want.v, "{what}: values in the cache");
}

#[test]
fn attention_prefill_and_decode_match_their_twin() {
    // The general build with 4 warps per block (and a 16-warp launch, whose extra warps it
    // must leave idle), and the build the backend loads for SmolLM2 with 4 to 16 warps.
    if let (Some(general), Some(fitted)) = (emu(), emu_for(&smol())) {
        attention_builds(&general, &fitted);
    }
    if let (Some(general), Some(fitted)) = (gpu(), gpu_for(&smol())) {
        attention_builds(&general, &fitted);
    }
}

/// Each build against the twin at every launch width and split; and within a build, the
/// same bits whatever the width (the keys' split into slices does not depend on it) and
/// whatever the number of blocks a row's chunks are spread over (they are merged in chunk
/// order either way), so a row's output does not depend on the batch around it.
/// The general build also runs the other head shapes it supports: groups of 8 with
/// head_dim 128 (16 lanes per key), and head_dim 96 (lanes past the head in each key's
/// group of 16).
fn attention_builds<E: Exec>(general: &E, fitted: &E) {
    let (wide, odd) = other_head_shapes();
    for (g, c) in [
        (general, smol()),
        (general, wide),
        (general, odd),
        (fitted, smol()),
    ] {
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
/// `launches`, each of which must give the same bits.
fn same_bits_for_every_launch<E: Exec>(
    g: &E,
    c: &LlamaConfig,
    tc: bool,
    launches: &[(u32, Spread)],
) {
    let base = attention_case(g, 128, Spread::One, c, tc);
    for &(threads, spread) in launches {
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
    // at the chunks' edges; and a prefill whose rows cross them.
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
                    let len = 40;
                    let need = (pos0 + len).div_ceil(bs) as u32;
                    let toks: Vec<u32> = (0..len).map(|_| rng.below(49152) as u32).collect();
                    b.push(&toks, pos0, (next..next + need).collect(), true);
                    next += need;
                }
                b
            }
            _ if decode => random_batch(&mut rng, 33, 1, bs, max_blocks),
            _ => random_batch(&mut rng, 9, 60, bs, max_blocks),
        };
        let (cache, (_, kc, vc)) = rope_kv(g, &c, &b, bs, n_blocks, &mut rng);
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
}

#[test]
fn swiglu_matches_its_twin() {
    on_each!(swiglu_case);
}

fn swiglu_case<E: Exec>(g: &E) {
    let mut rng = Rng(7);
    // SmolLM2's width with the usual launch; then a width that leaves a block partly
    // idle, and 7 rows of blocks for 100 rows (each block row takes every 7th row).
    let narrow = LaunchConfig {
        grid_dim: (4, 7, 1),
        ..swiglu_launch(100, 1000)
    };
    for (t, ffn, launch) in [(100, 1536, swiglu_launch(100, 1536)), (100, 1000, narrow)] {
        let gu = rng.vec(t * 2 * ffn, 4.0);
        let want = twins::swiglu(&gu, t, ffn);
        let gd = up(g, &gu);
        let out = up(g, &nan16(t * ffn));
        let args = [gd.arg(), out.arg(), i(t), i(ffn)];
        g.launch("swiglu", launch, &args).unwrap();
        let e = rel(&f32s(&down(g, &out)), &f32s(&want));
        assert!(e < 2e-3, "{}: {t}×{ffn}: {e}", g.describe());
    }
}

#[test]
fn gemv_matches_the_product_twin() {
    on_each!(gemv_case);
}

/// `gemv_f16` against the product's twin (cuBLAS's arithmetic: f16 inputs, f32 sums) for
/// 1 to 16 rows, with a weight offset, a column count that is no multiple of 16, and a
/// poisoned output; rows too wide for the shared memory, or no multiple of 32, refused.
fn gemv_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{fits, gemv, shared_bytes, Staged, MAX_ROWS};
    let mut rng = Rng(9);
    let max_shared = g.max_shared_bytes().unwrap();
    // SmolLM2's width, and rows of several batches of blocks a warp (a 7B model's 4,096).
    for (k, n, row0) in [(576, 1003, 5), (2048, 77, 3), (4096, 37, 1)] {
        let w: Vec<f16> = rng
            .vec((n + row0) * k, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let wd = up(g, &w);
        for m in (1..=MAX_ROWS).filter(|&m| fits(m, k, max_shared, Staged::Sums)) {
            let x: Vec<f16> = rng.vec(m * k, 1.0).into_iter().map(f16::from_f32).collect();
            let want = twins::gemm(&x, &w[row0 * k..], m, k, n);
            let xd = up(g, &x);
            let mut y = up(g, &vec![f32::NAN; m * n]);
            gemv(g, &xd, &wd, row0, &mut y, m, k, n).unwrap();
            let e = rel(&down(g, &y), &want);
            assert!(e < 1e-5, "{}: {m} rows of {k}: {e}", g.describe());
        }
        let over = MAX_ROWS + 1;
        let (xd, mut y) = (
            up(g, &vec![f16::ZERO; over * k]),
            up(g, &vec![0f32; over * n]),
        );
        assert!(gemv(g, &xd, &wd, 0, &mut y, over, k, n).is_err(), "17 rows");
    }
    // The widest row whose staging fits whole, then one block wider; and k no multiple of
    // 32.
    let widest = (1..)
        .map(|b| 32 * b)
        .take_while(|&k| shared_bytes(1, k, Staged::Sums) <= max_shared)
        .last();
    let widest = widest.expect("some row fits");
    assert!(
        fits(1, widest, max_shared, Staged::Sums)
            && !fits(1, widest + 32, max_shared, Staged::Sums)
    );
    // Past it, the row is read in runs of its columns (two here), up to MAX_RUNS of them.
    let too_wide = (widest + 32) * kernels::cuda::gemv::MAX_RUNS;
    let (xd, wd) = (
        up(g, &vec![f16::ONE; too_wide]),
        up(g, &vec![f16::ONE; too_wide]),
    );
    let mut y = up(g, &[f32::NAN; 1]);
    for k in [widest, widest + 32] {
        gemv(g, &xd, &wd, 0, &mut y, 1, k, 1).unwrap();
        assert_eq!(down(g, &y), [k as f32], "a row of {k}");
    }
    for (k, what) in [
        (too_wide, "a row past the most runs of the shared memory"),
        (96 + 8, "k no multiple of 32"),
    ] {
        assert!(gemv(g, &xd, &wd, 0, &mut y, 1, k, 1).is_err(), "{what}");
    }
}

/// A `gemv` launch that gives its blocks less dynamic shared memory than the staged rows
/// take traps rather than writing past it (on the emulator only: a trap spoils a GPU's
/// context for the rest of the process).
#[test]
fn a_gemv_launch_short_of_shared_memory_traps() {
    use kernels::cuda::gemv::{shared_bytes, Staged};
    let Some(g) = emu() else { return };
    let (m, k, n) = (3, 576, 32);
    let (x, w) = (
        up(&g, &vec![f16::ONE; m * k]),
        up(&g, &vec![f16::ONE; n * k]),
    );
    let y = up(&g, &vec![f32::NAN; m * n]);
    let args = [
        x.arg(),
        w.arg(),
        y.arg(),
        i(m),
        i(k),
        i(n),
        i(n),
        i(0),
        i(0),
        i(k),
    ];
    for (bytes, ok) in [
        (shared_bytes(m, k, Staged::Sums), true),
        (shared_bytes(m, k, Staged::Sums) - 16, false),
    ] {
        let launch = LaunchConfig {
            shared_mem_bytes: bytes as u32,
            ..cfg(2, 256)
        };
        let r = g.launch("gemv_f16", launch, &args);
        assert_eq!(r.is_ok(), ok, "{bytes} bytes: {r:?}");
    }
    assert!(
        down(&g, &y).iter().all(|&v| v == k as f32),
        "the launch that fit"
    );
}

#[test]
fn quantized_gemv_matches_the_product_of_the_files_values() {
    on_each!(gemv_quant_case);
}

/// The file's blocks in `ty` of `n × k` random weights, and the values they dequantize to.
/// `x · wᵀ` for `m` rows of `k` (f16 inputs, f32 weights `n × k`), summed in f64.
fn exact_product(x: &[f16], w: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    (0..m * n)
        .map(|e| {
            let (r, j) = (e / n, e % n);
            (0..k)
                .map(|i| x[r * k + i].to_f64() * w[j * k + i] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

fn quant_weights(rng: &mut Rng, ty: GgmlType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let w = rng.vec(n * k, 1.0);
    let mut blocks = Vec::new();
    match ty {
        GgmlType::Q4_0 => kernels::quant::quantize_row_q4_0(&w, &mut blocks),
        GgmlType::Q4_1 => kernels::quant::quantize_row_q4_1(&w, &mut blocks),
        GgmlType::Q8_0 => kernels::quant::quantize_row_q8_0(&w, &mut blocks),
        ty => kernels::kquant::quantize_row(ty, &w, &mut blocks),
    }
    let mut values = vec![0f32; n * k];
    kernels::quant::dequantize_row(ty, &blocks, &mut values);
    (blocks, values)
}

/// `gemv_q4` / `gemv_q8` over the file's own Q4_0, Q4_1 and Q8_0 blocks for 1 to 16 rows,
/// and over Q4_K, Q5_K, IQ4_XS and Q6_K (f32 or factored scales, a scale per 16: `gemv_q4f32`
/// and `gemv_q4f`, `gemv_q8f` and `gemv_q8f32`, Q6_K's integers at 6 bits, `gemv_q6h`, and
/// at 8, `gemv_q8h32`; IQ4_XS's
/// levels from 4-bit indices, `gemv_iq4f`, and as 8-bit integers, `gemv_q8f32`; Q5_K's
/// integers at 5 bits, `gemv_q5f`, and at 8, `gemv_q8f32`), IQ4_NL's levels (`gemv_iq4`),
/// Q3_K's integers at 4 bits under their scales per 16 (`gemv_q4h`; and as the CPU's
/// Q8_0 blocks, `gemv_q8s`), Q2_K's at 2 bits under their scales and offsets per 16
/// (`gemv_q2h`),
/// `gemv_q5` over Q5_1 (offsets), against the product of the values the file's blocks
/// dequantize to (f16 inputs, sums in f64):
/// SmolLM2's widths and wider rows (4,096: three batches a warp), column counts that are no
/// multiple of the block's warps, a poisoned output; and the launches refused.
fn gemv_quant_case<E: Exec>(g: &E) {
    use kernels::cuda::gemv::{
        fits, gemv_from, Input, QuantBuf, QuantRows, Scales, Weights, MAX_ROWS,
    };
    let mut rng = Rng(17);
    // The K-quant layouts (factored scales, Q6_K's per 16: `gemv_q4f`, `gemv_q5f`,
    // `gemv_q6h`) and Q5_1's offsets, as a model holds them where the CPU has packed kernels.
    let k_quants: &[(GgmlType, usize, usize)] = if kernels::packed::available() {
        &[
            (GgmlType::Q4_K, 1536, 80),
            (GgmlType::Q5_K, 512, 800),
            (GgmlType::IQ4_XS, 1024, 96),
            (GgmlType::Q6_K, 1024, 400),
            (GgmlType::Q5_1, 576, 32),
        ]
    } else {
        println!("skipped the K-quant layouts: this CPU has no packed kernels to make them");
        &[]
    };
    let cases = [
        (GgmlType::Q4_1, 576, 1003),
        (GgmlType::Q4_0, 1536, 77),
        (GgmlType::Q8_0, 576, 259),
        (GgmlType::Q8_0, 2048, 33),
        (GgmlType::Q4_1, 4096, 41),
        (GgmlType::IQ4_NL, 576, 50),
        (GgmlType::Q5_0, 576, 48),
        (GgmlType::Q3_K, 1024, 48),
        (GgmlType::Q2_K, 768, 40),
    ];
    for &(ty, k, n) in cases.iter().chain(k_quants) {
        let (blocks, w) = quant_weights(&mut rng, ty, n, k);
        // As the backend takes a matrix: its file blocks as the CPU holds them (IQ4_NL's
        // as Q8_0), else its packed form, else its blocks and offsets per 16 (Q2_K's).
        let m = kernels::model::matrix_of(ty, n, k, &blocks);
        let rows = match (m.file_blocks(), m.packed_values(), m.blocks_with_offsets()) {
            (Some((held, data)), ..) => QuantRows::from_blocks(held, data, n, k),
            (None, Some(p), _) => QuantRows::from_packed(p),
            (None, None, Some((held, data, o))) => QuantRows::from_offsets(held, data, &o, n, k),
            _ => panic!("{ty:?}: no blocks the kernels read"),
        };
        let rows = rows.expect("a kernel layout");
        let wq = &[QuantBuf::upload(g, &rows).unwrap()];
        let want_kind = match ty {
            GgmlType::Q4_K => "q4f",
            GgmlType::Q5_K => "q5f",
            GgmlType::IQ4_XS => "iq4f",
            GgmlType::IQ4_NL => "iq4s",
            GgmlType::Q6_K => "q6h",
            GgmlType::Q5_1 => "q5",
            GgmlType::Q5_0 => "q5s",
            GgmlType::Q8_0 => "q8s",
            GgmlType::Q4_0 => "q4s",
            GgmlType::Q3_K => "q4h",
            GgmlType::Q2_K => "q2h",
            _ => "q4",
        };
        assert_eq!(wq[0].kind(), Some(want_kind), "{ty:?}");
        // The K-quants' scales the other way too (as f32 pairs, `gemv_q4f32`,
        // `gemv_q8f32`, `gemv_q8h32`: each kept to be timed against the factored); the
        // file blocks' scales alone as f16 pairs too (`gemv_q4`, `gemv_q8`, `gemv_iq4`,
        // `gemv_q5`).
        let other = match rows.scales {
            Scales::F16Pairs | Scales::F32Pairs | Scales::F32Halves | Scales::FactoredHalfPairs => {
                None
            }
            // Q3_K's integers at 4 bits under their scales per 16, and as the CPU's Q8_0
            // blocks of `sc · q` (`gemv_q8s`).
            Scales::FactoredHalves if ty == GgmlType::Q3_K => {
                Some((Scales::F16Scales, "q8s".to_string()))
            }
            Scales::F16Scales => Some((
                Scales::F16Pairs,
                want_kind.trim_end_matches('s').to_string(),
            )),
            Scales::Factored | Scales::FactoredHalves => Some((
                Scales::F32Pairs,
                match (rows.bits, rows.scales) {
                    (_, Scales::FactoredHalves) => "q8h32",
                    (4, _) if !rows.iq4 => "q4f32",
                    _ => "q8f32", // IQ4_XS's levels, Q5_K's integers at 8 bits
                }
                .to_string(),
            )),
        };
        let other_form = other.map(|(scales, kind)| {
            let m = kernels::model::matrix_of(ty, n, k, &blocks);
            let r = match m.file_blocks() {
                Some((held, data)) => QuantRows::from_blocks_as(held, data, n, k, scales),
                None => QuantRows::from_packed_as(m.packed_values().unwrap(), scales),
            };
            let r = r.expect("the other scales");
            let b = [QuantBuf::upload(g, &r).unwrap()];
            assert_eq!(b[0].kind(), Some(kind.as_str()), "{ty:?}");
            b
        });
        let staged = rows.scales.staged();
        for m in (1..=MAX_ROWS).filter(|&m| fits(m, k, g.max_shared_bytes().unwrap(), staged)) {
            let x: Vec<f16> = rng.vec(m * k, 1.0).into_iter().map(f16::from_f32).collect();
            let want = exact_product(&x, &w, (m, k, n));
            let xd = up(g, &x);
            let mut got = Vec::new();
            for wq in std::iter::once(wq).chain(other_form.as_ref()) {
                let mut y = up(g, &vec![f32::NAN; m * n]);
                gemv_from(g, Input::Rows(&xd), Weights::Quant(wq), &mut y, m, k, n).unwrap();
                let y = down(g, &y);
                let e = rel(&y, &want);
                assert!(e < 1e-5, "{}: {ty:?}, {m} rows of {k}: {e}", g.describe());
                got.push(y);
            }
            // The same scales, the same sums in the same order: the same bits (but for
            // Q5_0's, whose pairs take `q` and the offset `−16d` where its scale alone
            // takes `q − 16`, and Q3_K's, summed a 16 at a time or a 32: other sums, within
            // the same bound).
            if let ([a, b], false) = (&got[..], matches!(ty, GgmlType::Q5_0 | GgmlType::Q3_K)) {
                assert!(
                    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?}, {m} rows"
                );
            }
        }
        let over = MAX_ROWS + 1;
        let (xd, mut y) = (
            up(g, &vec![f16::ZERO; over * k]),
            up(g, &vec![0f32; over * n]),
        );
        assert!(
            gemv_from(g, Input::Rows(&xd), Weights::Quant(wq), &mut y, over, k, n).is_err(),
            "17 rows"
        );
        // Layouts no kernel reads: 7 bits; 2 bits without offsets per 16; 5 bits with a
        // scale per 16.
        for (bits, scales, what) in [
            (7, rows.scales, "7 bits"),
            (2, Scales::FactoredHalves, "2 bits without offsets per 16"),
            (5, Scales::FactoredHalves, "5 bits with a scale per 16"),
        ] {
            let none = [QuantBuf {
                bits,
                scales,
                ..QuantBuf::upload(g, &rows).unwrap()
            }];
            assert!(
                gemv_from(g, Input::Rows(&xd), Weights::Quant(&none), &mut y, 1, k, n).is_err(),
                "{what}"
            );
        }
        assert!(
            gemv_from(g, Input::Rows(&xd), Weights::Quant(wq), &mut y, 1, k, n + 1).is_err(),
            "a column past the weights"
        );
        assert!(
            gemv_from(g, Input::Rows(&xd), Weights::Quant(wq), &mut y, 1, k - 8, n).is_err(),
            "k no multiple of 32"
        );
    }
}

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

/// `rope_kv_write` over `rows` QKV rows `stride` apart, as `rope` says.
fn rope_apart<E: Exec>(
    g: &E,
    qkv: &E::Buf<f32>,
    stride: usize,
    rows: usize,
    rope: kernels::cuda::gemv::RopeKv<'_, E>,
) {
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
        Arg::F32(rope.base),
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
    use kernels::cuda::gemv::{gemv_rope, Input, RopeKv, Weights};
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
        let slots = [
            5, 1000, 77, 513, 16, 1023, 600, 31, 200, 901, 64, 330, 777, 2, 450, 999,
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
        let rope = RopeKv {
            positions: &pd,
            slots: &sd,
            k_cache: &mut kc,
            v_cache: &mut vc,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: hd,
            block_size: bs,
            base: c.rope_base,
        };
        gemv_rope(g, input, Weights::F16(&wd, 0), &mut qkv, m, d, rope).unwrap();
        let (got, got_k, got_v) = (down(g, &qkv), down(g, &kc), down(g, &vc));
        // Apart, on the same device.
        let qa = norm_then_gemv(g, &xd, &dd, &nwd, eps, Weights::F16(&wd, 0), m, d, n);
        let (mut ka, mut va) = (up(g, &fill), up(g, &fill));
        let heads = (c.n_heads, c.n_kv_heads, hd, bs);
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
        twins::rope_kv_write(&mut want, n, &positions, &slots, &mut wk, &mut wv, &c, bs);
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
    let rope = RopeKv {
        positions: &pd,
        slots: &sd,
        k_cache: &mut kc,
        v_cache: &mut vc,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: hd,
        block_size: bs,
        base: c.rope_base,
    };
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

#[test]
fn sampling_matches_its_twin() {
    on_each!(sampling_case);
}

fn sampling_case<E: Exec>(g: &E) {
    let mut rng = Rng(8);
    let (s, vocab) = (64, 49152);
    let logits = rng.vec(s * vocab, 8.0);
    let params: Vec<SampleParams> = (0..s)
        .map(|i| SampleParams {
            temperature: if i % 4 == 0 {
                0.0
            } else {
                0.3 + (i % 5) as f32 * 0.3
            },
            // Every cut alone and with the other: none, k = 1, ties at a small k, a
            // large k, k past the vocabulary; top_p 1 (none), 0 (the top only), others.
            top_k: [0, 1, 20, 200, 0, 60000][i % 6],
            top_p: [1.0, 0.9, 0.5, 0.95, 0.0][(i / 3) % 5],
            seed: 1000 + i as u64,
            step: i as u32 * 3,
        })
        .collect();
    // Rows 8 and on are adjusted, in turn: deltas only (every other such row with its
    // input token carried: penalties counting a token the step before drew); a mask
    // keeping about half the tokens; one keeping about 1 in 500 with deltas on some kept
    // ones (a grammar's row); a mask shorter than the row (the rest refused), every other
    // one carried.
    let adjust: Vec<Option<Adjust>> = (0..s)
        .map(|i| {
            let deltas = |rng: &mut Rng, n: usize| {
                Adjust::merged((0..n).map(|_| (rng.below(vocab + 10) as u32, rng.f32() * 3.0)))
            };
            let mask = |rng: &mut Rng, words: usize, keep_in: usize| {
                let mut m = vec![0u32; words];
                for t in 0..(words * 32).min(vocab) {
                    if rng.below(keep_in) == 0 {
                        m[t / 32] |= 1 << (t % 32);
                    }
                }
                m
            };
            let words = vocab.div_ceil(32);
            match (i >= 8).then_some(i % 4) {
                None => None,
                Some(0) => {
                    let deltas = deltas(&mut rng, 300);
                    let carry = (i % 8 == 0).then(|| Carry {
                        fresh: -rng.f32() * 2.0,
                        alt: deltas.iter().map(|_| -rng.f32() * 4.0).collect(),
                    });
                    Some(Adjust {
                        deltas,
                        mask: None,
                        carry,
                    })
                }
                Some(1) => Some(Adjust {
                    deltas: vec![],
                    mask: Some(mask(&mut rng, words, 2)),
                    carry: None,
                }),
                Some(2) => {
                    let m = mask(&mut rng, words, 500);
                    let kept: Vec<u32> = (0..vocab as u32)
                        .filter(|&t| allowed(&m, t as usize))
                        .collect();
                    Some(Adjust {
                        deltas: Adjust::merged(kept.iter().step_by(3).map(|&t| (t, 2.5))),
                        mask: Some(m),
                        carry: None,
                    })
                }
                // Every other one with its input token carried too (its fresh delta
                // only where the mask allows the token).
                _ => {
                    let deltas = deltas(&mut rng, 5);
                    let carry = (i % 8 == 7).then(|| Carry {
                        fresh: 3.0 + rng.f32(),
                        alt: deltas.iter().map(|_| rng.f32()).collect(),
                    });
                    Some(Adjust {
                        deltas,
                        mask: Some(mask(&mut rng, words / 2, 4)),
                        carry,
                    })
                }
            }
        })
        .collect();
    // Each row's input token, at position 2i + 1 of a step's 2s tokens: for carried rows,
    // in turn one of its listed tokens and one most likely not listed.
    let logit_rows: Vec<i32> = (0..s as i32).map(|i| 2 * i + 1).collect();
    let mut inputs: Vec<u32> = (0..2 * s).map(|_| rng.below(vocab) as u32).collect();
    for (i, a) in adjust.iter().enumerate() {
        if let Some(a) = a.as_ref().filter(|a| a.carry.is_some() && i % 16 == 0) {
            let listed: Vec<u32> = a
                .deltas
                .iter()
                .map(|d| d.0)
                .filter(|&t| (t as usize) < vocab)
                .collect();
            inputs[2 * i + 1] = listed[rng.below(listed.len())];
        }
        // A masked carried row: in turn an input token the mask allows (most are refused).
        if let Some(m) = a
            .as_ref()
            .filter(|a| a.carry.is_some() && i % 16 == 15)
            .and_then(|a| a.mask.as_ref())
        {
            let from = rng.below(vocab / 2);
            let t = (from..vocab).find(|&t| allowed(m, t)).unwrap();
            inputs[2 * i + 1] = t as u32;
        }
    }
    let mut adjusted = logits.clone();
    for (i, (row, a)) in adjusted.chunks_exact_mut(vocab).zip(&adjust).enumerate() {
        if let Some(a) = a {
            a.apply_after(row, inputs[2 * i + 1]);
        }
    }
    let want: Vec<u32> = (0..s)
        .map(|i| twins::sample(&adjusted[i * vocab..(i + 1) * vocab], params[i]))
        .collect();
    let mut extra = Vec::new();
    let offsets: Vec<u32> = adjust
        .iter()
        .map(|a| match a {
            Some(a) => {
                let at = extra.len() as u32;
                a.write(&mut extra);
                at
            }
            None => u32::MAX,
        })
        .collect();
    let ld = up(g, &logits);
    let temp = up(g, &params.iter().map(|p| p.temperature).collect::<Vec<_>>());
    let topk = up(g, &params.iter().map(|p| p.top_k).collect::<Vec<_>>());
    let topp = up(g, &params.iter().map(|p| p.top_p).collect::<Vec<_>>());
    let seeds = up(g, &params.iter().map(|p| p.seed).collect::<Vec<_>>());
    let steps = up(g, &params.iter().map(|p| p.step).collect::<Vec<_>>());
    let (offs, extra) = (up(g, &offsets), up(g, &extra));
    let (inputs, logit_rows) = (up(g, &inputs), up(g, &logit_rows));
    let out = up(g, &vec![u32::MAX; s]);
    // Poisoned: an adjusted row's every element must be written.
    let scratch = up(g, &vec![f32::NAN; s * vocab]);
    let args = [
        ld.arg(),
        scratch.arg(),
        i(vocab),
        temp.arg(),
        topk.arg(),
        topp.arg(),
        seeds.arg(),
        steps.arg(),
        offs.arg(),
        extra.arg(),
        inputs.arg(),
        logit_rows.arg(),
        out.arg(),
    ];
    g.launch("sample", cfg(s as u32, twins::SAMPLE_THREADS as u32), &args)
        .unwrap();
    let got = down(g, &out);
    let what = g.describe();
    // The logits stay the model's (what a row read back for its log-probabilities
    // shows); the adjusted rows, beside them, are exactly the twin's (one f32 add per
    // delta).
    assert!(
        down(g, &ld).iter().zip(&logits).all(|(a, b)| a == b),
        "{what}: the sample kernel changed the logits"
    );
    let rows = down(g, &scratch);
    for (i, (a, b)) in rows
        .chunks_exact(vocab)
        .zip(adjusted.chunks_exact(vocab))
        .enumerate()
        .filter(|(i, _)| adjust[*i].is_some())
    {
        assert!(
            a.iter()
                .zip(b)
                .all(|(x, y)| x == y || x.is_nan() && y.is_nan()),
            "{what}: row {i} adjusted unlike its twin"
        );
    }
    for i in (0..s).step_by(4) {
        assert_eq!(got[i], want[i], "{what}: greedy row {i}");
    }
    for (i, (&t, a)) in got.iter().zip(&adjust).enumerate() {
        if let Some(m) = a.as_ref().and_then(|a| a.mask.as_ref()) {
            assert!(
                allowed(m, t as usize),
                "{what}: row {i} drew refused token {t}"
            );
        }
    }
    // Masses are integers and the probabilities the same fused multiply-adds: every
    // draw is the twin's.
    assert_eq!(got, want, "{what}: sampled tokens");
}

#[test]
fn logprobs_match_their_twin() {
    on_each!(logprobs_case);
}

fn logprobs_case<E: Exec>(g: &E) {
    let mut rng = Rng(11);
    let (rows, vocab) = (12, 49152);
    let mut logits = rng.vec(rows * vocab, 12.0);
    let row = |r: usize| r * vocab..(r + 1) * vocab;
    // Row 1: whole numbers only (ties at every rank, the 20th among them); row 2: one
    // value everywhere; row 3: NaNs, infinities and both zeros as its largest; row 4:
    // fewer numbers than asked for (the rest NaN); row 5: every logit −∞.
    for x in &mut logits[row(1)] {
        *x = x.round();
    }
    logits[row(2)].fill(-3.5);
    for (j, x) in logits[row(3)].iter_mut().enumerate() {
        *x = match j % 7 {
            0 => f32::NAN,
            1 => f32::NEG_INFINITY,
            _ if j % 1000 == 5 => -0.0,
            _ if j % 1000 == 9 => 0.0,
            _ => *x - 13.0,
        };
    }
    for (j, x) in logits[row(4)].iter_mut().enumerate() {
        if j % 4096 != 7 {
            *x = f32::NAN;
        }
    }
    logits[row(5)].fill(f32::NEG_INFINITY);
    let sampled: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    // (row, token, top): drawn tokens and given ones, one past the vocabulary; top from 0
    // to past the most (20).
    let specs: Vec<(u32, u32, u32)> = vec![
        (0, u32::MAX, 20),
        (1, u32::MAX, 20),
        (2, 77, 20),
        (3, u32::MAX, 20),
        (4, 7, 20),
        (5, 3, 4),
        (6, 123, 0),
        (7, vocab as u32 + 5, 1),
        (8, u32::MAX, 25),
        (11, u32::MAX, 5),
        (0, 9, 2),
    ];
    let spec: Vec<u32> = specs.iter().flat_map(|&(r, t, k)| [r, t, k]).collect();
    let words = kernels::logprobs::SCORE_WORDS;
    let poison = 0xDEAD_BEEFu32;
    let (ld, sd, sp) = (up(g, &logits), up(g, &sampled), up(g, &spec));
    let out = up(g, &vec![poison; specs.len() * words]);
    let args = [ld.arg(), i(vocab), sp.arg(), sd.arg(), out.arg()];
    g.launch(
        "logprobs",
        cfg(specs.len() as u32, twins::SAMPLE_THREADS as u32),
        &args,
    )
    .unwrap();
    let got = down(g, &out);
    let what = g.describe();
    for (k, (&(r, t, top), w)) in specs.iter().zip(got.chunks_exact(words)).enumerate() {
        let r = r as usize;
        let token = if t == u32::MAX { sampled[r] } else { t };
        let l = &logits[r * vocab..(r + 1) * vocab];
        let want = kernels::logprobs::token_logprobs(l, token, top as usize);
        let n = want.top.len();
        assert!(
            w[..4 + 2 * n].iter().all(|&x| x != poison) && w[3] == 0,
            "{what}: score {k}: words unwritten"
        );
        let d = kernels::logprobs::from_words(w);
        common::assert_logprobs(&d, &want, &format!("{what}: score {k}"));
    }
}

#[test]
fn whole_model_matches_cpu_and_the_twin_chain() {
    use kernels::cuda::backend::{CudaBackend, KvCapacity};
    let model = common::tiny("gpu-model");
    let twin = twins::TwinModel::from_model(&model);
    if let Some(e) = emu_for(&twin.config) {
        let what = e.describe();
        let kv = KvCapacity::Blocks(64);
        whole_model_case(
            &model,
            CudaBackend::on(e, what, &twin, 16, kv, 128, 16).unwrap(),
        );
    }
    if gpu().is_some() {
        whole_model_case(
            &model,
            CudaBackend::new(&model, 0, 16, 64, 512, 16).unwrap(),
        );
    }
}

/// Greedy decoding of two prompts on `cuda`, step by step against the CPU engine (logits
/// within 2 %, 90 % of greedy tokens equal) and the twin chain (logits within 0.2 %).
fn whole_model_case<E: Exec>(
    model: &std::sync::Arc<kernels::forward::Model>,
    mut cuda: kernels::cuda::backend::CudaBackend<E>,
) {
    use kernels::backend::{Backend, CpuBackend};
    let mut cpu = CpuBackend::new(model.clone(), 16, 64, 2).unwrap();
    let twin = twins::TwinModel::from_model(model);
    let mut twin_kv = twin.kv(16, 64);
    let what = cuda.name().to_string();
    let (agree, total) = common::greedy_compare(
        model.config.vocab,
        8,
        2e-2,
        |b| {
            let got = cuda.step(b).unwrap();
            let chain = twin.forward(b, &mut twin_kv);
            let e = common::rel_err(&got, &chain);
            assert!(e < 2e-3, "{what} vs the twin chain: {e}");
            got
        },
        |b| cpu.step(b).unwrap(),
    );
    assert!(
        agree * 10 >= total * 9,
        "{what}: greedy tokens agree {agree}/{total}"
    );
}

/// The GPU benchmark's launches (`kernels::cuda::bench`, timed by `examples/gpu_bench.rs`)
/// at small sizes on the emulator: their arguments and extents hold before they spend
/// device time.
#[test]
fn the_kernel_benchmarks_launches_run_on_the_emulator() {
    use kernels::cuda::bench::{run, Sizes};
    let Some(e) = emu_for(&smol()) else { return };
    let sizes = Sizes::smoke();
    let rows = run(&e, &sizes, 1).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    // rmsnorm, rope, one build_batch, attention at two batches (at the step's context;
    // at the long one, batch 1 also split over 3 blocks, the emulator's 8 SMs over 3 KV
    // heads), swiglu, four sampling settings (two with a mask) and log-probabilities
    // over the same rows; at each of the two
    // decode batches a step's norm, rope, swiglu and greedy sampling; one product at
    // three row counts (1, 3, 9) by cuBLAS's stand-in, and by gemv_f16, its three fused
    // forms (the product is the QKV width of one head each of 32) and gemv_q4 / gemv_q8
    // and the K-quant layouts' gemv_q4f / gemv_q8f / gemv_q8h (factored scales),
    // gemv_iq4 / gemv_iq4f (IQ4's levels from 4-bit indices), gemv_q5 / gemv_q5f (5-bit
    // integers), gemv_q6h (Q6_K's at 6 bits), gemv_q4s / gemv_q5s / gemv_q8s / gemv_iq4s
    // (scales alone), gemv_q4h (Q3_K's 4-bit integers under scales per 16), gemv_q2h
    // (Q2_K's 2-bit ones under scales and offsets per 16) and
    // gemv_q4f32 / gemv_q8f32 / gemv_q8h32 (f32 scales), and Q4_K_M's QKV stack
    // (gemv_q4f then gemv_q6h); attention_tc at both batches and contexts, and both
    // kernels over an 80-token prompt.
    assert_eq!(rows.len(), 103, "{names:?}");
    for name in [
        "logprobs 3×3000, drawn token and top 20",
        "attention_tc batch 3, ctx 1100",
        "attention_prefill prefill, prompt 80",
        "attention_tc prefill, prompt 80",
        "gemv_f16_norm small 3×64·64×96",
        "gemv_f16_swiglu small 1×64·64×96",
        "gemv_f16_norm_rope small 3×64·64×96",
        "gemv_q4 small 3×64·64×96",
        "gemv_q8 small 1×64·64×96",
        "gemv_q4f small 3×64·64×96",
        "gemv_q8h small 9×64·64×96",
        "gemv_q4f32 small 3×64·64×96",
        "gemv_q8h32 small 9×64·64×96",
        "gemv_q4f+q6h small 3×64·64×96",
        "gemv_q6h small 1×64·64×96",
        "gemv_q4s small 9×64·64×96",
        "gemv_q5s small 3×64·64×96",
        "gemv_q8s small 1×64·64×96",
        "gemv_iq4s small 9×64·64×96",
        "gemv_q4h small 3×64·64×96",
        "gemv_q2h small 9×64·64×96",
        "gemv_iq4 small 3×64·64×96",
        "gemv_iq4f small 9×64·64×96",
        "gemv_q5 small 1×64·64×96",
        "gemv_q5f small 9×64·64×96",
    ] {
        assert!(names.contains(&name), "{name}: {names:?}");
    }
    assert!(
        names.contains(&"attention_decode batch 1, ctx 1100, 3 blocks per row"),
        "{names:?}"
    );
    assert!(
        rows.iter().all(|r| r.secs > 0.0 && r.bytes > 0.0),
        "{rows:?}"
    );
    // Each decode batch's step adds up products, attention and the other kernels, each
    // counted as often as a step runs it.
    let sums = kernels::cuda::bench::step_sums(&rows);
    assert_eq!(
        sums.iter().map(|s| s.batch).collect::<Vec<_>>(),
        sizes.decode
    );
    for s in &sums {
        assert!(
            s.products > 0.0 && s.attention > 0.0 && s.other > 0.0,
            "{s:?}"
        );
        let attention = rows
            .iter()
            .find(|r| r.name.starts_with("attention") && r.in_step == Some((s.batch, 2)))
            .unwrap();
        assert_eq!(s.attention, attention.secs * sizes.layers as f64);
    }
}
