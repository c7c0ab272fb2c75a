//! Each CUDA kernel against its CPU twin (`kernels::cuda::twins`) on fresh random inputs.
//! Output buffers are poisoned before each launch (NaN, or a sentinel for integers), so an
//! element the kernel fails to write fails the comparison.
//!
//! Every test runs twice: on the CPU emulator (`kernels::cuda::emu`, the kernel sources
//! themselves built for the host; always, where the build has it) and on GPU 0 (skipped
//! with a printed reason where there is none). On a GPU machine `kernels/gpu-check.sh` runs
//! this binary (built here with `cargo test --release -p kernels --test cuda_parity
//! --no-run`).

#[path = "../common/mod.rs"]
mod common;

use common::rel_err as rel;
use common::{emu, emu_for, gpu, gpu_for};
use cudarc::driver::LaunchConfig;
use half::f16;
use kernels::adjust::{allowed, Adjust, Carry, Repeat};
use kernels::backend::FROM_LAST;
use kernels::cuda::device::ATTENTION_CHUNK_KEYS;
use kernels::cuda::exec::{Arg, DevBuf, Elem, Exec};
use kernels::cuda::staging::READ_ONLY;
use kernels::cuda::twins::{self, SampleParams};
use kernels::cuda::{norm_launch, swiglu_launch};
use kernels::forward::Batch;
use kernels::gguf::GgmlType;
use kernels::model::LlamaConfig;

/// xorshift64*: reproducible random inputs without a dependency.
#[derive(Clone)]
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
    // 600 sequences: each thread of the logit-rows scan counts a run of 3; the windowed
    // layers' own pool's tables too (some entries let go: its spare, read-only).
    for (seqs, max_len, windowed) in [(37, 40, false), (600, 3, false), (37, 40, true)] {
        let mut b = random_batch(&mut rng, seqs, max_len, bs, mb);
        let trash_w = windowed.then_some(4000);
        if windowed {
            for q in &mut b.seqs {
                q.window_table = (0..q.block_table.len() as u32)
                    .map(|j| match rng.below(4) {
                        0 => u32::MAX,
                        _ => 3999 - (q.block_table[j as usize] * 7) % 3999,
                    })
                    .collect();
            }
        }
        let (s, t) = (b.seqs.len(), b.tokens.len());
        let mut staging = twins::stage_windowed(&b, mb, trash_w);
        // Every fifth token stands for one the step before sampled.
        let sampled: Vec<u32> = (0..64).map(|_| rng.below(50_000) as u32).collect();
        for w in staging[4 * s..4 * s + t].iter_mut().step_by(5) {
            *w = FROM_LAST | rng.below(sampled.len()) as u32;
        }
        // Every seventh sequence's table is read-only (a padded row's): no slot.
        for q in (0..s).step_by(7) {
            let at = 4 * s + t + q * mb;
            for w in &mut staging[at..at + mb] {
                *w |= READ_ONLY;
            }
        }
        let want = twins::build_batch_windowed(&staging, &sampled, s, t, mb, bs, windowed);
        if windowed {
            let let_go = want.block_tables_w.iter().filter(|&&x| x == 4000).count();
            assert!(let_go > 0 && want.slot_mapping_w.contains(&-1));
        }
        assert!(want.tokens.iter().all(|&t| t & FROM_LAST == 0));
        let nowhere: usize = b.seqs.iter().step_by(7).map(|q| q.len).sum();
        assert_eq!(
            want.slot_mapping.iter().filter(|&&x| x == -1).count(),
            nowhere
        );
        assert!(want.block_tables.iter().all(|&x| x >= 0));
        let st = up(g, &staging);
        let last = up(g, &sampled);
        let tokens = up(g, &vec![0xDEAD_BEEFu32; t]);
        let positions = up(g, &vec![0xDEAD_BEEFu32; t]);
        let slots = up(g, &vec![-7i32; t]);
        let seq_of_row = up(g, &vec![-7i32; t]);
        let tables = up(g, &vec![-7i32; s * mb]);
        let logit_rows = up(g, &vec![-7i32; s]);
        let slots_w = up(g, &vec![-7i32; t]);
        let tables_w = up(g, &vec![-7i32; s * mb]);
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
            i(windowed as usize),
            slots_w.arg(),
            tables_w.arg(),
        ];
        g.launch("build_batch", cfg(n.div_ceil(256), 256), &args)
            .unwrap();
        let what = g.describe();
        assert_eq!(down(g, &tokens), want.tokens, "{what}");
        assert_eq!(down(g, &positions), want.positions, "{what}");
        assert_eq!(down(g, &slots), want.slot_mapping, "{what}");
        assert_eq!(down(g, &seq_of_row), want.seq_of_row, "{what}");
        assert_eq!(down(g, &tables), want.block_tables, "{what}");
        if windowed {
            assert_eq!(down(g, &slots_w), want.slot_mapping_w, "{what}");
            assert_eq!(down(g, &tables_w), want.block_tables_w, "{what}");
        } else {
            assert!(down(g, &slots_w).iter().all(|&x| x == -7), "{what}");
        }
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
    let (td, tk) = (up(g, &table), up(g, &toks));
    // Unscaled, and by Gemma's √dim.
    for scale in [1.0, (dim as f32).sqrt()] {
        let want = twins::embed(&table, &toks, dim, scale);
        let x = up(g, &vec![f32::NAN; t * dim]);
        let args = [td.arg(), tk.arg(), x.arg(), i(dim), Arg::F32(scale)];
        g.launch("embed", cfg(t as u32, 256), &args).unwrap();
        assert_eq!(down(g, &x), want, "{}, scale {scale}", g.describe());
    }
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
/// `read_only_last`: the last sequence's block table marked [`READ_ONLY`], as a padded
/// row's (its rows write no slot); `bias`: random biases on Q, K and V (Qwen2's), added
/// first; `layer`: the layer whose RoPE it is ([`LlamaConfig::rope_pass_at`], a windowed
/// layer's own frequencies).
#[allow(clippy::too_many_arguments)]
fn rope_kv<E: Exec>(
    g: &E,
    c: &LlamaConfig,
    b: &Batch,
    bs: usize,
    n_blocks: usize,
    rng: &mut Rng,
    read_only_last: bool,
    bias: bool,
    layer: usize,
) -> (Cache, Written<E>) {
    let (s, t) = (b.seqs.len(), b.tokens.len());
    let (qd, kd) = (c.n_heads * c.head_dim, c.kv_dim());
    // A row stride wider than q|k|v, as a guard that the kernel follows it.
    let stride = qd + 2 * kd + 8;
    let mut qkv = rng.vec(t * stride, 2.0);
    let max_blocks = c.context_len / bs;
    let mut staging = twins::stage(b, max_blocks);
    if read_only_last {
        let last = 4 * s + t + (s - 1) * max_blocks;
        for w in &mut staging[last..last + max_blocks] {
            *w |= READ_ONLY;
        }
    }
    let inp = twins::build_batch(&staging, &[], s, t, max_blocks, bs);
    let nowhere = inp.slot_mapping.iter().filter(|&&x| x < 0).count();
    assert_eq!(nowhere, if read_only_last { b.seqs[s - 1].len } else { 0 });
    let n = n_blocks * bs * kd;
    // Slots no row writes hold arbitrary (finite) values on both sides.
    let fill: Vec<f16> = rng.vec(n, 1.0).into_iter().map(f16::from_f32).collect();
    let (qg, sm, pd) = (up(g, &qkv), up(g, &inp.slot_mapping), up(g, &inp.positions));
    let (kc, vc) = (up(g, &fill), up(g, &fill));
    let inv_freq = up(g, &c.rope_inv_freq_at(layer));
    let bias = bias.then(|| rng.vec(qd + 2 * kd, 1.0));
    let bias_g = bias.as_ref().map(|b| up(g, b));
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
        bias.as_deref(),
        layer,
    );
    let n_threads = (t * c.head_dim / 2) as u32;
    let (turned, pass_scale) = c.rope_pass_at(layer);
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
        inv_freq.arg(),
        i(turned),
        Arg::F32(pass_scale),
        bias_g.as_ref().map_or(Arg::Null, |b| b.arg()),
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
    // RoPE's frequencies as Llama 3.1's files scale them (each pair over its own factor),
    // so that a pair's angle is its own table entry's.
    let c = LlamaConfig {
        rope_freq_factors: Some(kernels::synth::llama3_rope_factors(64, 100_000.0, 512)),
        ..smol()
    };
    // Partial RoPE (Phi-4-mini's: 96 of 128 dimensions; here 48 of 64) under an
    // attention factor (LongRoPE's), whose pairs past the 24th pass unturned, divided by
    // the factor's square root.
    let partial = LlamaConfig {
        rope_dims: Some(48),
        rope_freq_factors: Some(kernels::synth::llama3_rope_factors(48, 100_000.0, 512)),
        attn_scale: 1.44,
        ..smol()
    };
    // SmolLM3's NoPE layers (every fourth) under YaRN's attention factor: on layer 3 no
    // pair turns, every one passes divided by the factor's square root; layer 2 turns.
    let nope = LlamaConfig {
        no_rope_period: Some(4),
        attn_scale: 1.44,
        ..c.clone()
    };
    // Positions up to ~2000 (the batch's own), rows of many sequences.
    let b = random_batch(&mut rng, 20, 30, 16, 128);
    // Without biases, and with Qwen2's on Q, K and V; partial RoPE; a NoPE layer and the
    // layer before it.
    let cases = [
        (&c, false, 0),
        (&c, true, 0),
        (&partial, false, 0),
        (&nope, false, 3),
        (&nope, false, 2),
    ];
    for (c, bias, layer) in cases {
        let before = rng.clone();
        // The last sequence's rows write no slot (the cache's fill stays, on both sides).
        let (want, (qg, kc, vc)) = rope_kv(g, c, &b, 16, 1024, &mut rng, true, bias, layer);
        let (t, stride) = (b.tokens.len(), want.stride);
        let input = before.clone().vec(t * stride, 2.0);
        let heads = c.n_heads + c.n_kv_heads;
        // The twin itself: each head's entries from the first that passes are its
        // input's over 1.2, and those before it turned.
        let first_pass = 2 * c.rope_pass_at(layer).0;
        if c.rope_dims.is_some() || !c.ropes_at(layer) {
            for r in 0..t {
                for h in 0..heads {
                    let at = r * stride + h * 64;
                    for d in first_pass..64 {
                        let (x, y) = (input[at + d], want.qkv[at + d]);
                        assert!((y - x / 1.2).abs() <= 1e-6 * x.abs(), "pass entry {d}");
                    }
                }
            }
        }
        for r in 0..t {
            for h in 0..heads {
                let at = r * stride + h * 64;
                let turned = (0..first_pass).any(|d| want.qkv[at + d] != input[at + d]);
                assert!(
                    turned || first_pass == 0 || b.positions[r] == 0,
                    "row {r} head {h} turned"
                );
            }
        }
        // Angles of hundreds of radians: float argument reduction differs in the last bits.
        assert!(
            rel(&down(g, &qg), &want.qkv) < 1e-3,
            "{what}: rotated rows (biases {bias}, layer {layer})"
        );
        let close = |a: &[f16], b: &[f16]| rel(&f32s(a), &f32s(b));
        assert!(
            close(&down(g, &kc), &want.k) < 2e-3,
            "{what}: keys in the cache (biases {bias})"
        );
        assert_eq!(
            down(g, &vc),
            want.v,
            "{what}: values in the cache (biases {bias})"
        );
    }
}

#[test]
fn head_rmsnorm_matches_its_twin() {
    on_each!(head_rmsnorm_case);
}

/// Qwen3's norm of each Q and K head on rows of the QKV product: Qwen3-0.6B's heads (16
/// of 128 on 8 KV heads) and SmolLM2's (9 of 64 on 3); every Q and K entry rescaled, the
/// values left bit for bit.
fn head_rmsnorm_case<E: Exec>(g: &E) {
    use kernels::model::QkNorm;
    let what = g.describe();
    let mut rng = Rng(12);
    let qwen3 = LlamaConfig {
        n_heads: 16,
        n_kv_heads: 8,
        head_dim: 128,
        dim: 1024,
        ..smol()
    };
    for c in [qwen3, smol()] {
        let (qd, kvd) = (c.n_heads * c.head_dim, c.kv_dim());
        let (t, stride) = (37, qd + 2 * kvd);
        let x0 = rng.vec(t * stride, 3.0);
        let norm = QkNorm {
            q: rng.vec(c.head_dim, 1.0),
            k: rng.vec(c.head_dim, 1.0),
        };
        let mut want = x0.clone();
        twins::head_rmsnorm(&mut want, stride, t, &c, &norm);
        let xd = up(g, &x0);
        let (qw, kw) = (up(g, &norm.q), up(g, &norm.k));
        let args = [
            xd.arg(),
            i(stride),
            i(t),
            i(c.n_heads),
            i(c.n_kv_heads),
            i(c.head_dim),
            qw.arg(),
            kw.arg(),
            Arg::F32(c.rms_eps),
        ];
        let launch = norm_launch(t * (c.n_heads + c.n_kv_heads));
        g.launch("head_rmsnorm", launch, &args).unwrap();
        let got = down(g, &xd);
        let hd = c.head_dim;
        for r in 0..t {
            let row = r * stride;
            let (qk, v) = (row..row + qd + kvd, row + qd + kvd..row + stride);
            let e = rel(&got[qk.clone()], &want[qk.clone()]);
            assert!(e < 1e-5, "{what}: heads of {hd}, row {r}: {e}");
            let moved = got[qk.clone()].iter().zip(&x0[qk]).all(|(a, b)| a != b);
            assert!(
                moved,
                "{what}: heads of {hd}, row {r}: every Q and K entry normed"
            );
            assert_eq!(
                got[v.clone()],
                x0[v],
                "{what}: heads of {hd}, row {r}: values"
            );
        }
    }
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
        // Gemma's GeGLU, on the same launch.
        let want = twins::glu(kernels::model::Activation::GeluTanh, &gu, t, ffn);
        let out = up(g, &nan16(t * ffn));
        let args = [gd.arg(), out.arg(), i(t), i(ffn)];
        g.launch("geglu", launch, &args).unwrap();
        let e = rel(&f32s(&down(g, &out)), &f32s(&want));
        assert!(e < 2e-3, "{}: geglu {t}×{ffn}: {e}", g.describe());
        // Gemma 2's soft cap, in place over the same rows (as logits).
        let mut capped = gu[..t * ffn].to_vec();
        twins::softcap(&mut capped, 3.0);
        let x = up(g, &gu[..t * ffn]);
        let args = [x.arg(), i(t), i(ffn), Arg::F32(3.0)];
        g.launch("softcap", launch, &args).unwrap();
        let e = rel(&down(g, &x), &capped);
        assert!(e < 1e-5, "{}: softcap {t}×{ffn}: {e}", g.describe());
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
    // rmsnorm, head_rmsnorm, rope, one build_batch, attention at two batches (at the step's context;
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
    // kernels over an 80-token prompt; the experts' gate|up product at each decode batch,
    // over f16 weights, over Q8_0's values and over Q4_K's blocks (moe_tc_q4f).
    assert_eq!(rows.len(), 110, "{names:?}");
    for name in [
        "head_rmsnorm 64 rows",
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
    // The experts' product at each decode batch: 2 of 8 experts for one row, 5 distinct
    // for three.
    assert!(
        names.contains(&"moe_gemv gate|up, 1 rows (2 of 8 experts)")
            && names.contains(&"moe_gemv_q8 gate|up, 1 rows (2 of 8 experts)")
            && names.contains(&"moe_tc_q4f gate|up, 3 rows (5 of 8 experts)")
            && names
                .iter()
                .any(|n| n.starts_with("moe_gemv gate|up, 3 rows")),
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

// The kernels with more cases than fit here, a file each (after `on_each!`).
mod attention;
mod gemv;
mod gemv_fused;
mod moe;
mod sample;
