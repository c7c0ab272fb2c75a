//! A mixture of experts' feed-forward block on the device (`kernels/cuda/moe.cu`): its
//! weights (the router, every expert's matrices one after another, Qwen2-MoE's shared
//! expert), its per-step scratch, and the launches that replace the dense block's
//! products: the router's product, `moe_route`, `moe_sort`, `moe_gemv` over the experts'
//! gate|up rows, `swiglu`, `moe_gemv` over their down rows, the shared expert's products,
//! and `moe_combine` into the block's output (`moe_gemv_q8` where the experts are held as
//! Q8_0's values; where they are held in the file's own blocks, the tensor-core
//! `moe_tc_*` over gate|up, then over down with `swiglu` made in the product:
//! `kernels/cuda/moe_tc.cu`, [`crate::cuda::twins::ExpertHolding`]). Every launch's grid
//! depends on the step's rows alone, so a captured graph replays it whatever the routing.

use super::small::{product, Small};
use crate::cuda::exec::{Arg, DevBuf, Exec, ExecError};
use crate::cuda::gemv::{expert_products, ExpertBuf, ExpertInput, Routing};
use crate::cuda::twins::{ExpertRows, TwinMoe};
use crate::cuda::{norm_launch, swiglu_launch};
use crate::model::MoeConfig;
use cudarc::driver::LaunchConfig;
use half::f16;

/// Threads of `moe_sort`'s one block (`MOE_MAX_EXPERTS`): the most experts a mixture may
/// have on the device.
pub const MAX_EXPERTS: usize = 256;

/// Warps per `moe_gemv` block, one output column each.
const GEMV_WARPS: u32 = 8;

/// A layer's mixture of experts on the device.
pub(super) struct Experts<E: Exec> {
    config: MoeConfig,
    router: E::Buf<f16>,
    gate_up: Rows<E>,
    down: Rows<E>,
    shared: Option<Shared<E>>,
}

/// The experts' matrices of one role on the device ([`ExpertRows`]).
enum Rows<E: Exec> {
    F16(E::Buf<f16>),
    Q8 {
        q: E::Buf<u8>,
        scales: E::Buf<f16>,
    },
    /// The file's own blocks, a part at a time (`moe_tc_*`).
    Blocks(Vec<ExpertBuf<E>>),
}

impl<E: Exec> Rows<E> {
    fn upload(e: &E, r: &ExpertRows) -> Result<Self, ExecError> {
        Ok(match r {
            ExpertRows::F16(w) => Self::F16(e.upload(w)?),
            ExpertRows::Q8(m) => Self::Q8 {
                q: e.upload(&m.q)?,
                scales: e.upload(&m.scales)?,
            },
            ExpertRows::Blocks(b) => Self::Blocks(
                b.parts
                    .iter()
                    .map(|p| ExpertBuf::upload(e, p))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// The CUDA-core product's kernel and its weights' arguments (`None` for blocks).
    fn args(&self) -> Option<(&'static str, Vec<Arg>)> {
        match self {
            Self::F16(w) => Some(("moe_gemv", vec![w.arg()])),
            Self::Q8 { q, scales } => Some(("moe_gemv_q8", vec![q.arg(), scales.arg()])),
            Self::Blocks(_) => None,
        }
    }
}

/// Qwen2-MoE's shared expert on the device.
struct Shared<E: Exec> {
    gate: E::Buf<f32>,
    gate_up: E::Buf<f16>,
    down: E::Buf<f16>,
    ffn: usize,
}

impl<E: Exec> Experts<E> {
    pub(super) fn upload(e: &E, m: &TwinMoe, dim: usize) -> Result<Self, ExecError> {
        let shared = match &m.shared {
            Some(s) => Some(Shared {
                gate: e.upload(&s.gate)?,
                gate_up: e.upload(&s.gate_up)?,
                down: e.upload(&s.down)?,
                ffn: s.down.len() / dim,
            }),
            None => None,
        };
        Ok(Self {
            config: m.config,
            router: e.upload(&m.router)?,
            gate_up: Rows::upload(e, &m.gate_up)?,
            down: Rows::upload(e, &m.down)?,
            shared,
        })
    }
}

/// A step's scratch for its mixtures of experts, sized for `t` rows.
pub(super) struct Scratch<E: Exec> {
    logits: E::Buf<f32>,
    expert: E::Buf<i32>,
    weight: E::Buf<f32>,
    offsets: E::Buf<i32>,
    order: E::Buf<i32>,
    slot: E::Buf<i32>,
    active: E::Buf<i32>,
    gu: E::Buf<f32>,
    /// `swiglu`'s output for the CUDA-core products, where a layer's experts take them
    /// (the tensor cores' make it in the down product).
    g: Option<E::Buf<f16>>,
    y: E::Buf<f32>,
    /// The shared expert's output, where the model has one.
    shared: Option<E::Buf<f32>>,
}

impl<E: Exec> Scratch<E> {
    /// `cuda_cores`: whether some layer's experts are held for the CUDA-core products.
    pub(super) fn new(
        e: &E,
        c: &MoeConfig,
        t: usize,
        d: usize,
        cuda_cores: bool,
    ) -> Result<Self, ExecError> {
        let places = t * c.used;
        Ok(Self {
            logits: e.zeros(t * c.count)?,
            expert: e.zeros(places)?,
            weight: e.zeros(places)?,
            offsets: e.zeros(c.count + 1)?,
            order: e.zeros(places)?,
            slot: e.zeros(places)?,
            active: e.zeros(c.count)?,
            gu: e.zeros(places * 2 * c.ffn)?,
            g: cuda_cores.then(|| e.zeros(places * c.ffn)).transpose()?,
            y: e.zeros(places * d)?,
            shared: c.shared_ffn.map(|_| e.zeros(t * d)).transpose()?,
        })
    }
}

/// Where the block reads and writes: `h` (the normed rows, `t × d`), the dense block's
/// buffers the shared expert uses (`gu`, `g`), and `out` (`t × d`, the block's output).
pub(super) struct Io<'a, E: Exec> {
    pub h: &'a E::Buf<f16>,
    pub gu: &'a mut E::Buf<f32>,
    pub g: &'a mut E::Buf<f16>,
    pub out: &'a mut E::Buf<f32>,
    pub t: usize,
    pub d: usize,
}

/// Enqueues the mixture `x`'s block over `io`'s rows.
pub(super) fn enqueue<E: Exec>(
    e: &E,
    small: Small,
    x: &Experts<E>,
    s: &mut Scratch<E>,
    io: Io<'_, E>,
) -> Result<(), ExecError> {
    let c = &x.config;
    let Io {
        h,
        gu,
        g,
        out,
        t,
        d,
    } = io;
    let (ne, k, f) = (c.count, c.used, c.ffn);
    let places = t * k;
    let (nei, ki) = (Arg::I32(ne as i32), Arg::I32(k as i32));
    product(e, small, h, (&x.router, &[]), &mut s.logits, t, d, ne)?;
    e.launch(
        "moe_route",
        norm_launch(t),
        &[
            s.logits.arg(),
            Arg::I32(t as i32),
            nei,
            ki,
            Arg::I32(c.norm as i32),
            s.expert.arg(),
            s.weight.arg(),
        ],
    )?;
    e.launch(
        "moe_sort",
        LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (MAX_EXPERTS as u32, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            s.expert.arg(),
            Arg::I32(places as i32),
            nei,
            s.offsets.arg(),
            s.order.arg(),
            s.slot.arg(),
            s.active.arg(),
        ],
    )?;
    let routing = Routing {
        order: &s.order,
        offsets: &s.offsets,
        active: &s.active,
        rows: t,
        used: k,
    };
    // A slot of blocks an expert with places (at most the places).
    let slots = routing.slots(ne) as u32;
    let gemv = |n: usize| LaunchConfig {
        grid_dim: ((n as u32).div_ceil(GEMV_WARPS), slots, 1),
        block_dim: (32 * GEMV_WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    // The experts' CUDA-core products: gate|up over the tokens' rows of h, down over the
    // places'.
    let products = |kernel: &str, weights: Vec<Arg>, x: Arg, gather: usize, y: Arg, k, n| {
        let mut args = vec![
            x,
            s.order.arg(),
            s.offsets.arg(),
            s.active.arg(),
            Arg::I32(gather as i32),
        ];
        args.extend(weights);
        args.extend([y, Arg::I32(k as i32), Arg::I32(n as i32)]);
        e.launch(kernel, gemv(n), &args)
    };
    match (&x.gate_up, &x.down) {
        // On the tensor cores, swiglu made in the down product.
        (Rows::Blocks(gu), Rows::Blocks(down)) => {
            let input = ExpertInput::Rows { x: h, gather: k };
            expert_products(e, input, gu, &routing, &mut s.gu, d, 2 * f)?;
            let input = ExpertInput::Swiglu(&s.gu);
            expert_products(e, input, down, &routing, &mut s.y, f, d)?;
        }
        (gate_up, down) => {
            let refused =
                || ExecError::Bounds("experts held in blocks for one product only".into());
            let g = s
                .g
                .as_ref()
                .ok_or_else(|| ExecError::Bounds("no scratch for the CUDA-core experts".into()))?;
            let (kernel, weights) = gate_up.args().ok_or_else(refused)?;
            products(kernel, weights, h.arg(), k, s.gu.arg(), d, 2 * f)?;
            e.launch(
                "swiglu",
                swiglu_launch(places, f),
                &[
                    s.gu.arg(),
                    g.arg(),
                    Arg::I32(places as i32),
                    Arg::I32(f as i32),
                ],
            )?;
            let (kernel, weights) = down.args().ok_or_else(refused)?;
            products(kernel, weights, g.arg(), 0, s.y.arg(), f, d)?;
        }
    }
    let shared = match (&x.shared, &mut s.shared) {
        (Some(sh), Some(sy)) => {
            let sf = sh.ffn;
            product(e, small, h, (&sh.gate_up, &[]), gu, t, d, 2 * sf)?;
            e.launch(
                "swiglu",
                swiglu_launch(t, sf),
                &[gu.arg(), g.arg(), Arg::I32(t as i32), Arg::I32(sf as i32)],
            )?;
            product(e, small, g, (&sh.down, &[]), sy, t, sf, d)?;
            Some((&sh.gate, &*sy))
        }
        _ => None,
    };
    e.launch(
        "moe_combine",
        LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            s.y.arg(),
            s.slot.arg(),
            s.weight.arg(),
            ki,
            h.arg(),
            shared.map_or(Arg::Null, |(gate, _)| gate.arg()),
            shared.map_or(Arg::Null, |(_, sy)| sy.arg()),
            out.arg(),
            Arg::I32(d as i32),
        ],
    )
}
