//! A mixture's experts' products on the `gemv` kernels' tensor-core product
//! (`kernels/cuda/moe_tc.cu`), over the experts' weights in their file's own blocks
//! ([`QuantRows`], every expert's one after another: [`ExpertBuf`]): for each expert, the
//! rows routed to it (gathered from the normed rows, or made by `swiglu` from the places'
//! own gate|up rows) times its matrix, up to 16 rows a pass. The grid is `min(E, k·T)`
//! slots of blocks, slot y the y-th expert with places (`moe_sort`'s `active` list), so it
//! depends on the step's rows alone (a captured graph replays it) and a decode step
//! launches blocks for the experts it chose only.

use super::{column_run, holds, kind_of, shared_bytes, QuantBuf, QuantRows, BLOCK, BLOCKS_PER_SM};
use super::{GROUP, MAX_ROWS, WARPS};
use crate::cuda::exec::{Arg, DevBuf, Exec, ExecError};
use cudarc::driver::LaunchConfig;
use half::f16;

/// The layouts `moe_tc_*` reads (`kernels/cuda/moe_tc.cu`: the files' experts' Q4_1,
/// Q4_0, Q4_K, Q3_K, Q2_K, Q5_K, Q6_K, Q8_0 and IQ4_XS); experts of other layouts (Q5_0's,
/// Q5_1's, IQ4_NL's: rows no multiple of 256, which experts' seldom are) are held another
/// way.
const KINDS: &[&str] = &[
    "q4", "q4s", "q4f", "q4h", "q2h", "q5f", "q6h", "q8s", "iq4f",
];

/// The `moe_tc` kernels' weights part for a layout; `None` where none reads it.
fn moe_kind(bits: u32, scales: super::Scales, iq4: bool) -> Option<&'static str> {
    kind_of(bits, scales, iq4).filter(|k| KINDS.contains(k))
}

/// Whether `experts` (one matrix, or one part of it, of each expert) can be held one after
/// another for `moe_tc`: some, all of one layout and shape that a `moe_tc` kernel reads, an
/// expert's words within the kernels' 32-bit strides.
pub fn readable(experts: &[QuantRows]) -> bool {
    let Some(first) = experts.first() else {
        return false;
    };
    let shape = |r: &QuantRows| (r.bits, r.scales, r.iq4, r.rows, r.k, r.q.len(), r.s.len());
    moe_kind(first.bits, first.scales, first.iq4).is_some()
        && i32::try_from(first.q.len().max(first.s.len())).is_ok()
        && experts.iter().all(|r| shape(r) == shape(first))
}

/// One matrix of every expert (or a part of it: its gate rows, its up rows) in the file's
/// own blocks on the device: each expert's tiles `q_stride` words after the one before,
/// its scales `s_stride` after; `blocks.rows` is one expert's rows.
pub struct ExpertBuf<E: Exec> {
    pub blocks: QuantBuf<E>,
    pub q_stride: usize,
    pub s_stride: usize,
    pub count: usize,
}

impl<E: Exec> ExpertBuf<E> {
    /// `experts`' blocks, one after another; refused unless they are all of one layout and
    /// shape that `moe_tc` reads.
    pub fn upload(e: &E, experts: &[QuantRows]) -> Result<Self, ExecError> {
        let first = match experts.first() {
            Some(first) if readable(experts) => first,
            _ => {
                return Err(ExecError::Bounds(format!(
                    "experts' blocks of {:?}: none, no moe_tc kernel reads them, the experts' \
                     layouts differ, or an expert's words pass 2³¹",
                    experts.first().map(|f| (f.bits, f.scales))
                )))
            }
        };
        let q: Vec<u32> = experts.iter().flat_map(|r| r.q.iter().copied()).collect();
        let s: Vec<u32> = experts.iter().flat_map(|r| r.s.iter().copied()).collect();
        Ok(Self {
            blocks: QuantBuf {
                q: e.upload(&q)?,
                s: e.upload(&s)?,
                bits: first.bits,
                scales: first.scales,
                iq4: first.iq4,
                rows: first.rows,
                k: first.k,
            },
            q_stride: first.q.len(),
            s_stride: first.s.len(),
            count: experts.len(),
        })
    }
}

/// The rows an expert product takes.
pub enum ExpertInput<'a, E: Exec> {
    /// Rows of `x` (f16, `k` wide): a place's token's row `order[p] / gather` where
    /// `gather` > 0 (the gate|up product over the normed rows), the place's own where 0.
    Rows { x: &'a E::Buf<f16>, gather: usize },
    /// `swiglu` over the places' own gate|up rows (f32, `2k` wide), made in the product
    /// (the down product).
    Swiglu(&'a E::Buf<f32>),
}

/// A step's routing (`moe_sort`'s outputs) for `rows` rows of `used` choices.
pub struct Routing<'a, E: Exec> {
    pub order: &'a E::Buf<i32>,
    pub offsets: &'a E::Buf<i32>,
    pub active: &'a E::Buf<i32>,
    pub rows: usize,
    pub used: usize,
}

impl<E: Exec> Routing<'_, E> {
    /// The experts' products' slots: at most one an expert, and no more than the places.
    pub fn slots(&self, experts: usize) -> usize {
        experts.min(self.rows * self.used).max(1)
    }
}

/// `y[p, :]` (places `rows · used`, `n` columns) = the input's row for place p times its
/// expert's matrix (`parts`: its rows whole, or its gate's then its up's, a launch each
/// writing its columns), on tensor cores; rows too wide for the shared memory in runs of
/// their columns, a launch a run.
pub fn expert_products<E: Exec>(
    e: &E,
    input: ExpertInput<'_, E>,
    parts: &[ExpertBuf<E>],
    routing: &Routing<'_, E>,
    y: &mut E::Buf<f32>,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    let places = routing.rows * routing.used;
    let count = parts.first().map_or(0, |p| p.count);
    let held: usize = parts.iter().map(|p| p.blocks.rows).sum();
    if parts.is_empty()
        || parts.iter().any(|p| p.blocks.k != k || p.count != count)
        || (parts.len() == 1 && held < n)
        || (parts.len() > 1 && held != n)
    {
        return Err(ExecError::Bounds(format!(
            "moe_tc: experts' blocks of {held} rows of {:?}, not {n} of {k}",
            parts.iter().map(|p| p.blocks.k).collect::<Vec<_>>()
        )));
    }
    let short = |what: &str, have: usize, need: usize| {
        holds(
            || format!("moe_tc over {places} places of {k}"),
            what,
            have,
            need,
        )
    };
    let (first, form, gather) = match input {
        ExpertInput::Rows { x, gather } => {
            let need = if gather > 0 { routing.rows } else { places };
            short("x", x.elems(), need * k)?;
            (x.arg(), "", gather)
        }
        ExpertInput::Swiglu(gu) => {
            short("gate|up", gu.elems(), places * 2 * k)?;
            (gu.arg(), "_swiglu", 0)
        }
    };
    short("y", y.elems(), places * n)?;
    short("order", routing.order.elems(), places)?;
    short("offsets", routing.offsets.elems(), count + 1)?;
    short("active", routing.active.elems(), count)?;
    let slots = routing.slots(count);
    // An expert's places are staged 16 at a time (an expert may have more than one place
    // of a row only where the router fell back for a row of NaNs: at most the places).
    let rows = places.clamp(1, MAX_ROWS);
    let max_shared = e.max_shared_bytes()?;
    let staged = parts
        .iter()
        .map(|p| p.blocks.scales.staged())
        .max()
        .unwrap_or(super::Staged::Sums);
    // Runs as 16 rows take them whatever the step's rows, so that a row's sums are added in
    // the same order alone and in a batch.
    let run = column_run(MAX_ROWS, k, max_shared, staged).ok_or_else(|| {
        ExecError::Bounds(format!(
            "moe_tc: rows of {k} (a multiple of {BLOCK}) whose staging fits in {max_shared} \
             bytes of shared memory in at most {} runs",
            super::MAX_RUNS
        ))
    })?;
    let sms = e.multiprocessors()?;
    let i = |v: usize| Arg::I32(v as i32);
    let mut j0 = 0;
    for p in parts {
        let kind = expert_kind_of(&p.blocks)?;
        let cols = if parts.len() == 1 { n } else { p.blocks.rows };
        short("q", p.blocks.q.elems(), count * p.q_stride)?;
        short("s", p.blocks.s.elems(), count * p.s_stride)?;
        let padded = p.blocks.rows.next_multiple_of(GROUP);
        let words = padded * k * p.blocks.bits as usize / 32;
        if p.q_stride < words {
            return Err(ExecError::Bounds(format!(
                "moe_tc_{kind}: an expert's tiles {} words apart, not {words}",
                p.q_stride
            )));
        }
        // Each slot's column groups over as many blocks as, with the others', fill the SMs.
        let groups = cols.div_ceil(GROUP);
        let blocks = groups.min((BLOCKS_PER_SM * sms).div_ceil(slots)).max(1);
        for k0 in (0..k).step_by(run) {
            let width = run.min(k - k0);
            let args = [
                first,
                routing.order.arg(),
                routing.offsets.arg(),
                routing.active.arg(),
                i(gather),
                p.blocks.q.arg(),
                p.blocks.s.arg(),
                i(p.q_stride),
                i(p.s_stride),
                y.arg(),
                i(width),
                i(cols),
                i(n),
                i(j0),
                i(k0),
                i(k),
            ];
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, slots as u32, 1),
                block_dim: (32 * WARPS, 1, 1),
                shared_mem_bytes: shared_bytes(rows, width, p.blocks.scales.staged()) as u32,
            };
            e.launch(&format!("moe_tc_{kind}{form}"), cfg, &args)?;
        }
        j0 += cols;
    }
    Ok(())
}

fn expert_kind_of<E: Exec>(b: &QuantBuf<E>) -> Result<&'static str, ExecError> {
    moe_kind(b.bits, b.scales, b.iq4).ok_or_else(|| {
        ExecError::Bounds(format!(
            "no moe_tc kernel reads experts of {} bits under {:?}",
            b.bits, b.scales
        ))
    })
}
