//! Each CUDA kernel against its CPU twin (`kernels::cuda::twins`) on fresh random inputs.
//! Output buffers are poisoned before each launch (NaN, or a sentinel for integers), so an
//! element the kernel fails to write fails the comparison. Skips with a printed reason
//! where there is no GPU (the CUDA driver library or a device is missing).
//!
//! On a GPU machine: `kernels/gpu-check.sh` runs this binary (built here with
//! `cargo test --release -p kernels --test cuda_parity --no-run`).

mod common;

use common::rel_err as rel;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;
use kernels::cuda::device::Gpu;
use kernels::cuda::twins::{self, SampleParams};
use kernels::forward::Batch;
use kernels::model::LlamaConfig;

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => {
            eprintln!("GPU: {}", g.describe());
            Some(g)
        }
        Err(e) => {
            eprintln!("SKIPPED: no GPU for the parity tests: {e}");
            None
        }
    }
}

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

fn up<T: DeviceRepr>(g: &Gpu, v: &[T]) -> CudaSlice<T> {
    g.stream.memcpy_stod(v).unwrap()
}

fn down<T: DeviceRepr + Default + Clone>(g: &Gpu, v: &CudaSlice<T>) -> Vec<T> {
    g.stream.memcpy_dtov(v).unwrap()
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

#[test]
fn build_batch_matches_its_twin() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(1);
    let (bs, mb) = (16, 64);
    // 600 sequences: the logit-rows scan runs over several chunks of one block.
    for (seqs, max_len) in [(37, 40), (600, 3)] {
        let b = random_batch(&mut rng, seqs, max_len, bs, mb);
        let (s, t) = (b.seqs.len(), b.tokens.len());
        let staging = twins::stage(&b, mb);
        let want = twins::build_batch(&staging, s, t, mb, bs);
        let st = up(&g, &staging);
        let mut tokens = up(&g, &vec![0xDEAD_BEEFu32; t]);
        let mut positions = up(&g, &vec![0xDEAD_BEEFu32; t]);
        let mut slots = up(&g, &vec![-7i32; t]);
        let mut seq_of_row = up(&g, &vec![-7i32; t]);
        let mut tables = up(&g, &vec![-7i32; s * mb]);
        let mut logit_rows = up(&g, &vec![-7i32; s]);
        let n = t.max(s * mb).max(s) as u32;
        let f = g.kernel("build_batch").unwrap();
        let a0 = s as i32;
        let a1 = t as i32;
        let a2 = mb as i32;
        let a3 = bs as i32;
        let mut l = g.stream.launch_builder(f);
        l.arg(&st)
            .arg(&a0)
            .arg(&a1)
            .arg(&a2)
            .arg(&a3)
            .arg(&mut tokens)
            .arg(&mut positions)
            .arg(&mut slots)
            .arg(&mut seq_of_row)
            .arg(&mut tables)
            .arg(&mut logit_rows);
        unsafe { l.launch(cfg(n.div_ceil(256), 256)) }.unwrap();
        assert_eq!(down(&g, &tokens), want.tokens);
        assert_eq!(down(&g, &positions), want.positions);
        assert_eq!(down(&g, &slots), want.slot_mapping);
        assert_eq!(down(&g, &seq_of_row), want.seq_of_row);
        assert_eq!(down(&g, &tables), want.block_tables);
        assert_eq!(down(&g, &logit_rows), want.logit_rows, "{seqs} sequences");
    }
}

#[test]
fn embed_matches_its_twin() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(2);
    let (vocab, dim, t) = (5000, 576, 300);
    let table: Vec<f16> = rng
        .vec(vocab * dim, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let toks: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
    let want = twins::embed(&table, &toks, dim);
    let (td, tk) = (up(&g, &table), up(&g, &toks));
    let mut x = up(&g, &vec![f32::NAN; t * dim]);
    let a0 = dim as i32;
    let mut l = g.stream.launch_builder(g.kernel("embed").unwrap());
    l.arg(&td).arg(&tk).arg(&mut x).arg(&a0);
    unsafe { l.launch(cfg(t as u32, 256)) }.unwrap();
    assert_eq!(down(&g, &x), want);
}

#[test]
fn add_rmsnorm_matches_its_twin() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(3);
    let (t, dim, eps) = (257, 576, 1e-5f32);
    let x0 = rng.vec(t * dim, 3.0);
    let delta = rng.vec(t * dim, 1.0);
    let w = rng.vec(dim, 1.0);
    let mut xw = x0.clone();
    let want = twins::add_rmsnorm(&mut xw, Some(&delta), &w, None, dim, eps);
    let mut xd = up(&g, &x0);
    let (dd, wd) = (up(&g, &delta), up(&g, &w));
    let mut out = up(&g, &nan16(t * dim));
    let a0 = dim as i32;
    let mut l = g.stream.launch_builder(g.kernel("add_rmsnorm").unwrap());
    l.arg(&mut xd)
        .arg(&dd)
        .arg(&wd)
        .arg(&mut out)
        .arg(&0u64)
        .arg(&a0)
        .arg(&eps);
    unsafe { l.launch(cfg(t as u32, 256)) }.unwrap();
    assert!(rel(&down(&g, &xd), &xw) < 1e-6, "residual add");
    let e = rel(&f32s(&down(&g, &out)), &f32s(&want));
    assert!(e < 2e-3, "normalized rows: {e}");
    // Selected rows with the add (the logits path), with an unused −1 entry.
    let rows = vec![5i32, 0, 256, -1];
    let want = twins::add_rmsnorm(&mut xw, Some(&delta), &w, Some(&rows), dim, eps);
    let rd = up(&g, &rows);
    let mut out = up(&g, &nan16(rows.len() * dim));
    let a0 = dim as i32;
    let mut l = g.stream.launch_builder(g.kernel("add_rmsnorm").unwrap());
    l.arg(&mut xd)
        .arg(&dd)
        .arg(&wd)
        .arg(&mut out)
        .arg(&rd)
        .arg(&a0)
        .arg(&eps);
    unsafe { l.launch(cfg(rows.len() as u32, 256)) }.unwrap();
    let e = rel(&f32s(&down(&g, &out)), &f32s(&want));
    assert!(e < 2e-3, "selected rows: {e}");
    assert!(
        rel(&down(&g, &xd), &xw) < 1e-6,
        "residual add of the selected rows"
    );
}

struct Cache {
    k: Vec<f16>,
    v: Vec<f16>,
    /// The QKV rows after RoPE (queries and keys rotated), `stride` floats each.
    qkv: Vec<f32>,
    stride: usize,
}

/// A random batch's QKV rows through `rope_kv_write` into a cache filled with arbitrary
/// values, on both sides; returns the twin's cache and rows and the GPU's.
fn rope_kv(
    g: &Gpu,
    c: &LlamaConfig,
    b: &Batch,
    bs: usize,
    n_blocks: usize,
    rng: &mut Rng,
) -> (Cache, CudaSlice<f32>, CudaSlice<f16>, CudaSlice<f16>) {
    let t = b.tokens.len();
    let (qd, kd) = (c.n_heads * c.head_dim, c.kv_dim());
    // A row stride wider than q|k|v, as a guard that the kernel follows it.
    let stride = qd + 2 * kd + 8;
    let mut qkv = rng.vec(t * stride, 2.0);
    let max_blocks = c.context_len / bs;
    let inp = twins::build_batch(
        &twins::stage(b, max_blocks),
        b.seqs.len(),
        t,
        max_blocks,
        bs,
    );
    let n = n_blocks * bs * kd;
    // Slots no row writes hold arbitrary (finite) values on both sides.
    let fill: Vec<f16> = rng.vec(n, 1.0).into_iter().map(f16::from_f32).collect();
    let (qg, sm, pd) = (up(g, &qkv), up(g, &inp.slot_mapping), up(g, &inp.positions));
    let mut qg = qg;
    let (mut kc, mut vc) = (up(g, &fill), up(g, &fill));
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
    let n_threads = (t * (c.n_heads + c.n_kv_heads) * c.head_dim / 2) as u32;
    let (a0, a1, a2, a3, a4, a5) = (
        stride as i32,
        t as i32,
        c.n_heads as i32,
        c.n_kv_heads as i32,
        c.head_dim as i32,
        bs as i32,
    );
    let mut l = g.stream.launch_builder(g.kernel("rope_kv_write").unwrap());
    l.arg(&mut qg)
        .arg(&a0)
        .arg(&pd)
        .arg(&sm)
        .arg(&mut kc)
        .arg(&mut vc)
        .arg(&a1)
        .arg(&a2)
        .arg(&a3)
        .arg(&a4)
        .arg(&a5)
        .arg(&c.rope_base);
    unsafe { l.launch(cfg(n_threads.div_ceil(256), 256)) }.unwrap();
    let cache = Cache {
        k: cache_k,
        v: cache_v,
        qkv,
        stride,
    };
    (cache, qg, kc, vc)
}

#[test]
fn rope_kv_write_matches_its_twin() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(4);
    let c = smol();
    // Positions up to ~2000 (the batch's own), rows of many sequences.
    let b = random_batch(&mut rng, 20, 30, 16, 128);
    let (want, qg, kc, vc) = rope_kv(&g, &c, &b, 16, 1024, &mut rng);
    // Angles of hundreds of radians: float argument reduction differs in the last bits.
    assert!(rel(&down(&g, &qg), &want.qkv) < 1e-3, "rotated rows");
    let close = |a: &[f16], b: &[f16]| rel(&f32s(a), &f32s(b));
    assert!(close(&down(&g, &kc), &want.k) < 2e-3, "keys in the cache");
    assert_eq!(down(&g, &vc), want.v, "values in the cache");
}

#[test]
fn attention_prefill_and_decode_match_their_twin() {
    let Some(general) = gpu() else { return };
    // The general build with 4 warps per block (and a 16-warp launch, whose extra warps it
    // must leave idle), and the build the backend loads for SmolLM2 with 4 and 16 warps.
    let fitted = Gpu::open_for(0, &smol()).unwrap();
    for (g, threads) in [
        (&general, 128u32),
        (&general, 512),
        (&fitted, 128),
        (&fitted, 512),
    ] {
        attention_case(g, threads);
    }
}

fn attention_case(g: &Gpu, threads: u32) {
    let mut rng = Rng(6);
    let c = smol();
    let (bs, n_blocks) = (16, 1024);
    let max_blocks = c.context_len / bs;
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    for (name, decode) in [("attention_prefill", false), ("attention_decode", true)] {
        let b = if decode {
            random_batch(&mut rng, 33, 1, bs, max_blocks)
        } else {
            random_batch(&mut rng, 9, 60, bs, max_blocks)
        };
        let (cache, _, kc, vc) = rope_kv(g, &c, &b, bs, n_blocks, &mut rng);
        let t = b.tokens.len();
        let inp = twins::build_batch(
            &twins::stage(&b, max_blocks),
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
        let mut out = up(g, &nan16(t * c.n_heads * c.head_dim));
        let stride = cache.stride as i32;
        let a0 = max_blocks as i32;
        let a1 = c.n_heads as i32;
        let a2 = c.n_kv_heads as i32;
        let a3 = c.head_dim as i32;
        let a4 = bs as i32;
        let mut l = g.stream.launch_builder(g.kernel(name).unwrap());
        l.arg(&qd).arg(&stride).arg(&kc).arg(&vc).arg(&tb);
        if !decode {
            l.arg(&sr);
        }
        l.arg(&pd)
            .arg(&mut out)
            .arg(&a0)
            .arg(&a1)
            .arg(&a2)
            .arg(&a3)
            .arg(&a4)
            .arg(&scale);
        let launch = LaunchConfig {
            grid_dim: (t as u32, c.n_kv_heads as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(launch) }.unwrap();
        let e = rel(&f32s(&down(g, &out)), &f32s(&want));
        assert!(e < 3e-3, "{name}, {threads} threads: {e}");
    }
}

#[test]
fn swiglu_matches_its_twin() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(7);
    let (t, ffn) = (100, 1536);
    let gu = rng.vec(t * 2 * ffn, 4.0);
    let want = twins::swiglu(&gu, t, ffn);
    let gd = up(&g, &gu);
    let mut out = up(&g, &nan16(t * ffn));
    let a0 = t as i32;
    let a1 = ffn as i32;
    let mut l = g.stream.launch_builder(g.kernel("swiglu").unwrap());
    l.arg(&gd).arg(&mut out).arg(&a0).arg(&a1);
    unsafe { l.launch(cfg(((t * ffn) as u32).div_ceil(256), 256)) }.unwrap();
    assert!(rel(&f32s(&down(&g, &out)), &f32s(&want)) < 2e-3);
}

#[test]
fn sampling_matches_its_twin() {
    let Some(g) = gpu() else { return };
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
            top_k: [0, 1, 20, 200][i % 4],
            top_p: [1.0, 0.9, 0.5, 0.95][(i / 4) % 4],
            seed: 1000 + i as u64,
            step: i as u32 * 3,
        })
        .collect();
    let want: Vec<u32> = (0..s)
        .map(|i| twins::sample(&logits[i * vocab..(i + 1) * vocab], params[i]))
        .collect();
    let ld = up(&g, &logits);
    let temp = up(
        &g,
        &params.iter().map(|p| p.temperature).collect::<Vec<_>>(),
    );
    let topk = up(&g, &params.iter().map(|p| p.top_k).collect::<Vec<_>>());
    let topp = up(&g, &params.iter().map(|p| p.top_p).collect::<Vec<_>>());
    let seeds = up(&g, &params.iter().map(|p| p.seed).collect::<Vec<_>>());
    let steps = up(&g, &params.iter().map(|p| p.step).collect::<Vec<_>>());
    let mut out = up(&g, &vec![u32::MAX; s]);
    let a0 = vocab as i32;
    let mut l = g.stream.launch_builder(g.kernel("sample").unwrap());
    l.arg(&ld)
        .arg(&a0)
        .arg(&temp)
        .arg(&topk)
        .arg(&topp)
        .arg(&seeds)
        .arg(&steps)
        .arg(&mut out);
    unsafe { l.launch(cfg(s as u32, twins::SAMPLE_THREADS as u32)) }.unwrap();
    let got = down(&g, &out);
    for i in (0..s).step_by(4) {
        assert_eq!(got[i], want[i], "greedy row {i}");
    }
    // Sums in another order may move a draw that lands within ~1e-6 of a boundary.
    let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(same >= s - 1, "{same}/{s} sampled tokens agree");
}

#[test]
fn whole_model_gpu_matches_cpu_and_the_twin_chain() {
    use kernels::backend::{Backend, CpuBackend};
    use kernels::cuda::backend::CudaBackend;
    if gpu().is_none() {
        return;
    }
    let model = common::tiny("gpu-model");
    let mut cuda = CudaBackend::new(&model, 0, 16, 64, 512, 16).unwrap();
    let mut cpu = CpuBackend::new(model.clone(), 16, 64, 2).unwrap();
    let twin = twins::TwinModel::from_model(&model);
    let mut twin_kv = twin.kv(16, 64);
    let (agree, total) = common::greedy_compare(
        model.config.vocab,
        8,
        2e-2,
        |b| {
            let got = cuda.step(b).unwrap();
            let chain = twin.forward(b, &mut twin_kv);
            let e = common::rel_err(&got, &chain);
            assert!(e < 2e-3, "GPU vs the twin chain: {e}");
            got
        },
        |b| cpu.step(b).unwrap(),
    );
    assert!(
        agree * 10 >= total * 9,
        "greedy tokens agree {agree}/{total}"
    );
}
