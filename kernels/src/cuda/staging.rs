//! The one host-to-device copy of a step: what the host writes into its pinned staging
//! buffer, and where each part lies.
//!
//! Words (u32), for `S` sequences and `T` rows with `max_blocks` table entries each:
//!
//! ```text
//! [0, 4S)            headers {start, len, pos0, logits rows}   ┐ read by `build_batch`
//! [4S, 4S+T)         token ids                                 │ (its twin:
//! [.., +S·max_blocks) block tables                             │  `twins::stage`)
//! [.., +S·max_blocks) the windowed layers' tables, where they   ┘
//!                    keep a pool of their own (`Layout::windowed`)
//! sample (even)      temperature[L] f32 | top_k[L] i32 | top_p[L] f32 | step[L] u32
//! sample + 4L        seed[L] u64 (two words each, 8-byte aligned)
//! sample + 6L        adjust[L]: where the row's adjustment starts in the extra part,
//!                    or 0xFFFFFFFF for none
//! sample + 7L        min_p[L] f32
//! len ..             the extra part: the adjustments' words ([`Adjust::write`]),
//!                    then three words per scored row ([`Score::words`])
//! ```
//!
//! The sampling part is indexed by logits row (the `sample` kernel's block index), for
//! the `L` logits rows (at least one per sequence, for the sequences' headers). The
//! extra part's length varies from step to step, but where it starts depends only on the
//! layout, so that a captured graph reads each step's adjustments (the scored rows'
//! words, after them, are read by the `logprobs` kernel, launched outside graphs). A step
//! may be padded to a CUDA-graph bucket with dummy decode rows: each is one token at
//! position 0 whose whole block table is the cache's spare `trash` block marked
//! [`READ_ONLY`] (it reads the block, never written, so zeros, and writes no key or value:
//! two dummy rows writing one slot would race), and wants logits (sampled greedily, then
//! dropped).

use super::twins::SampleParams;
use crate::adjust::Adjust;
use crate::forward::Batch;
use crate::logprobs::Score;

/// Delta words per row, on average, that the extra part makes room for (on top of a mask
/// per row): a `logit_bias` of up to 300 tokens, or the counts of a few hundred distinct
/// generated tokens under presence and frequency penalties. A step's rows that do not
/// fit are read back and adjusted on the host instead.
const DELTAS_PER_ROW: usize = 256;

/// A block-table entry's flag: the row reads the block but writes no key or value
/// (`build_batch` gives it slot −1, which the cache writes skip). Dummy rows' only.
pub const READ_ONLY: u32 = 1 << 31;

/// The extra part's room, in words, for steps of `rows` logits rows over `vocab` logits: a
/// mask and [`DELTAS_PER_ROW`] deltas per row.
pub fn adjust_room(rows: usize, vocab: usize) -> usize {
    rows * (2 + vocab.div_ceil(32) + 2 * DELTAS_PER_ROW)
}

/// The extra part's room, in words, for the scored rows of steps of `rows` logits rows.
pub fn score_room(rows: usize) -> usize {
    3 * rows
}

/// Offsets of one step's staging words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub n_seqs: usize,
    pub n_tokens: usize,
    /// Logits rows the sampling part has room for.
    pub n_logits: usize,
    /// Whether the sequences' tables in the windowed layers' own pool follow theirs.
    pub windowed: bool,
    /// First word of the sampling part (even).
    pub sample: usize,
    /// Words in all.
    pub len: usize,
}

impl Layout {
    /// `n_logits` is raised to `n_seqs` (a step of one row per sequence, as a decode
    /// graph's, keeps its layout whatever its rows want).
    pub fn new(n_seqs: usize, n_tokens: usize, max_blocks: usize, n_logits: usize) -> Self {
        Self::with_window(n_seqs, n_tokens, max_blocks, n_logits, false)
    }

    /// The same, with the windowed layers' tables too where `windowed`.
    pub fn with_window(
        n_seqs: usize,
        n_tokens: usize,
        max_blocks: usize,
        n_logits: usize,
        windowed: bool,
    ) -> Self {
        let n_logits = n_logits.max(n_seqs);
        let end = Self::tables_end(n_seqs, n_tokens, max_blocks, windowed);
        let sample = end + (end & 1);
        Self {
            n_seqs,
            n_tokens,
            n_logits,
            windowed,
            sample,
            len: sample + 8 * n_logits,
        }
    }
    /// Where the block tables (the part `build_batch` reads) end.
    fn tables_end(n_seqs: usize, n_tokens: usize, max_blocks: usize, windowed: bool) -> usize {
        4 * n_seqs + n_tokens + (1 + windowed as usize) * n_seqs * max_blocks
    }

    fn part(&self, i: usize, words: usize) -> std::ops::Range<usize> {
        let a = self.sample + i * self.n_logits;
        a..a + words * self.n_logits
    }
    pub fn temperature(&self) -> std::ops::Range<usize> {
        self.part(0, 1)
    }
    pub fn top_k(&self) -> std::ops::Range<usize> {
        self.part(1, 1)
    }
    pub fn top_p(&self) -> std::ops::Range<usize> {
        self.part(2, 1)
    }
    pub fn steps(&self) -> std::ops::Range<usize> {
        self.part(3, 1)
    }
    /// The seeds, in words (two per seed).
    pub fn seeds(&self) -> std::ops::Range<usize> {
        self.part(4, 2)
    }
    /// Each row's adjustment, by its first word in the extra part.
    pub fn adjust(&self) -> std::ops::Range<usize> {
        self.part(6, 1)
    }
    pub fn min_p(&self) -> std::ops::Range<usize> {
        self.part(7, 1)
    }
}

/// A step's staging words: its layout, and its extra part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub lay: Layout,
    pub extra: Extra,
}

impl Written {
    /// Words in all, to copy.
    pub fn words(&self) -> usize {
        self.lay.len + self.extra.words()
    }
}

/// A step's extra part: its adjustments' words, then its scored rows' (three each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extra {
    pub adjust: usize,
    pub scores: usize,
}

impl Extra {
    /// Its words.
    pub fn words(&self) -> usize {
        self.adjust + self.scores
    }

    /// Where the scored rows' words start in the staging buffer of a step laid out as
    /// `lay`.
    pub fn scores_at(&self, lay: Layout) -> usize {
        lay.len + self.adjust
    }
}

/// Writes `batch`, padded with `pad` dummy decode rows, the sampling parameters of its
/// logits rows (`params[i]` for the i-th row that wants logits; greedy where absent),
/// their adjustments (`adjust[i]`, none where absent) and the rows scored on the device
/// into `out`. `out` must hold the layout's `len` words; `None` when the adjustments and
/// scored rows do not fit in the rest. `trash_w`: the windowed layers' own pool's spare
/// block, where they keep a pool of their own: the sequences' tables there follow
/// theirs (entries let go, [`u32::MAX`], and padded rows' name it, [`READ_ONLY`]).
#[allow(clippy::too_many_arguments)]
pub fn write(
    out: &mut [u32],
    batch: &Batch,
    pad: usize,
    max_blocks: usize,
    trash: u32,
    trash_w: Option<u32>,
    params: &[SampleParams],
    adjust: &[Option<Adjust>],
    scores: &[Score],
) -> Option<Written> {
    let n = batch.seqs.len();
    let t = batch.tokens.len();
    let lay = Layout::with_window(
        n + pad,
        t + pad,
        max_blocks,
        batch.n_logits() + pad,
        trash_w.is_some(),
    );
    if out.len() < lay.len {
        return None;
    }
    let out_all = &mut *out;
    let out = &mut out_all[..lay.len];
    let mut w = 0;
    for sq in &batch.seqs {
        out[w..w + 4].copy_from_slice(&[
            sq.start as u32,
            sq.len as u32,
            batch.positions[sq.start],
            sq.logits as u32,
        ]);
        w += 4;
    }
    for i in 0..pad {
        out[w..w + 4].copy_from_slice(&[(t + i) as u32, 1, 0, 1]);
        w += 4;
    }
    out[w..w + t].copy_from_slice(&batch.tokens);
    w += t;
    out[w..w + pad].fill(0);
    w += pad;
    for sq in &batch.seqs {
        let k = sq.block_table.len().min(max_blocks);
        out[w..w + k].copy_from_slice(&sq.block_table[..k]);
        out[w + k..w + max_blocks].fill(0);
        w += max_blocks;
    }
    out[w..w + pad * max_blocks].fill(trash | READ_ONLY);
    w += pad * max_blocks;
    if let Some(trash_w) = trash_w {
        for sq in &batch.seqs {
            let k = sq.window_table.len().min(max_blocks);
            for (to, &b) in out[w..w + k].iter_mut().zip(&sq.window_table) {
                *to = if b == u32::MAX {
                    trash_w | READ_ONLY
                } else {
                    b
                };
            }
            out[w + k..w + max_blocks].fill(0);
            w += max_blocks;
        }
        out[w..w + pad * max_blocks].fill(trash_w | READ_ONLY);
    }
    let end = Layout::tables_end(lay.n_seqs, lay.n_tokens, max_blocks, lay.windowed);
    if lay.sample > end {
        out[lay.sample - 1] = 0;
    }
    let extra = write_sample(out_all, lay, params, adjust, scores)?;
    Some(Written { lay, extra })
}

/// Writes the sampling part of a step laid out as `lay` into `out` (the same words as in
/// the staging buffer: from `lay.sample`, and the extra part from `lay.len`): the
/// parameters of its logits rows (greedy where absent), their adjustments and the rows
/// scored on the device. Returns the extra part; `None` when it does not fit in `out`.
pub fn write_sample(
    out: &mut [u32],
    lay: Layout,
    params: &[SampleParams],
    adjust: &[Option<Adjust>],
    scores: &[Score],
) -> Option<Extra> {
    let (out, rest) = out.split_at_mut(lay.len);
    for row in 0..lay.n_logits {
        let p = params.get(row).copied().unwrap_or(SampleParams::GREEDY);
        out[lay.temperature().start + row] = p.temperature.to_bits();
        out[lay.top_k().start + row] = p.top_k as u32;
        out[lay.top_p().start + row] = p.top_p.to_bits();
        out[lay.min_p().start + row] = p.min_p.to_bits();
        out[lay.steps().start + row] = p.step;
        let s = lay.seeds().start + 2 * row;
        out[s] = p.seed as u32;
        out[s + 1] = (p.seed >> 32) as u32;
    }
    let mut extra = 0;
    let mut words = Vec::new();
    for row in 0..lay.n_logits {
        out[lay.adjust().start + row] = match adjust.get(row).and_then(Option::as_ref) {
            Some(a) => {
                words.clear();
                a.write(&mut words);
                rest.get_mut(extra..extra + words.len())?
                    .copy_from_slice(&words);
                extra += words.len();
                (extra - words.len()) as u32
            }
            None => u32::MAX,
        };
    }
    let at = rest.get_mut(extra..extra + 3 * scores.len())?;
    for (w, s) in at.chunks_exact_mut(3).zip(scores) {
        w.copy_from_slice(&s.words());
    }
    Some(Extra {
        adjust: extra,
        scores: 3 * scores.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::twins;

    fn batch() -> Batch {
        let mut b = Batch::default();
        b.push(&[5, 6, 7], 0, vec![3, 4], true);
        b.push(&[9], 20, vec![1, 2], false);
        b.push(&[11], 7, vec![8], true);
        b
    }

    #[test]
    fn the_build_batch_part_is_the_twins_staging() {
        let b = batch();
        let poison = 0xdead_beef;
        let mut out = vec![poison; 4096];
        let lay = write(&mut out, &b, 0, 4, 99, None, &[], &[], &[])
            .unwrap()
            .lay;
        let twin = twins::stage(&b, 4);
        assert_eq!(&out[..twin.len()], &twin[..]);
        assert_eq!(lay.len, lay.sample + 24);
        assert!(
            out[..lay.len].iter().all(|&w| w != poison),
            "every word written"
        );
        assert!(
            out[lay.adjust()].iter().all(|&w| w == u32::MAX),
            "no adjustments"
        );
    }

    #[test]
    fn padding_adds_trash_decode_rows_that_build_batch_understands() {
        let b = batch();
        let (mb, bs, trash) = (4, 16, 99u32);
        let mut out = vec![u32::MAX; 4096];
        let lay = write(&mut out, &b, 2, mb, trash, None, &[], &[], &[])
            .unwrap()
            .lay;
        assert_eq!((lay.n_seqs, lay.n_tokens), (5, 7));
        let inputs = twins::build_batch(&out[..lay.len], &[], 5, 7, mb, bs);
        // The real rows are unchanged; the dummy rows read the trash block and write no
        // slot.
        assert_eq!(&inputs.tokens[..5], &b.tokens[..]);
        assert_eq!(&inputs.slot_mapping[5..], &[-1, -1]);
        assert_eq!(&inputs.block_tables[3 * mb..], &[trash as i32; 8]);
        assert_eq!(&inputs.positions[5..], &[0, 0]);
        assert_eq!(&inputs.seq_of_row[5..], &[3, 4]);
        // Logits rows: the two real ones that want logits, then both dummies.
        assert_eq!(&inputs.logit_rows[..4], &[2, 4, 5, 6]);
    }

    #[test]
    fn sampling_parameters_sit_by_logits_row_and_seeds_are_aligned() {
        let b = batch();
        let p = |t: f32, k: i32, seed: u64| SampleParams {
            temperature: t,
            top_k: k,
            top_p: 0.9,
            min_p: 0.05,
            seed,
            step: 3,
        };
        let params = [p(0.7, 40, 0x1234_5678_9abc_def0), p(0.0, 0, 7)];
        let mut out = vec![u32::MAX; 4096];
        let lay = write(&mut out, &b, 1, 3, 0, None, &params, &[], &[])
            .unwrap()
            .lay;
        assert_eq!(lay.sample % 2, 0);
        assert_eq!(f32::from_bits(out[lay.temperature().start]), 0.7);
        assert_eq!(out[lay.top_k().start] as i32, 40);
        assert_eq!(f32::from_bits(out[lay.top_p().start + 1]), 0.9);
        assert_eq!(out[lay.steps().start], 3);
        assert_eq!(f32::from_bits(out[lay.min_p().start + 1]), 0.05);
        let s = lay.seeds().start;
        assert_eq!(
            out[s] as u64 | (out[s + 1] as u64) << 32,
            0x1234_5678_9abc_def0
        );
        // Rows past the given parameters (the dummy) are greedy.
        assert_eq!(f32::from_bits(out[lay.temperature().start + 2]), 0.0);
        assert_eq!(f32::from_bits(out[lay.top_p().start + 3]), 1.0);
        assert_eq!(f32::from_bits(out[lay.min_p().start + 3]), 0.0);
        assert_eq!(lay.min_p().end, lay.len);
    }

    #[test]
    fn adjustments_follow_the_layout_by_row_and_must_fit() {
        let b = batch();
        let a = |t: u32| Adjust {
            repeat: None,
            deltas: vec![(t, -1.5)],
            mask: Some(vec![1 << t, 0]),
            carry: None,
        };
        let adjust = [None, Some(a(3)), Some(a(5))];
        let mut out = vec![u32::MAX; 4096];
        let scores = [Score {
            row: 2,
            token: None,
            top: 5,
        }];
        let w = write(&mut out, &b, 1, 3, 0, None, &[], &adjust, &scores).unwrap();
        let lay = w.lay;
        assert_eq!(w.extra.adjust, 12);
        assert_eq!(w.words(), lay.len + 15);
        // The scored rows' words follow the adjustments.
        let at = w.extra.scores_at(lay);
        assert_eq!(at, lay.len + 12);
        assert_eq!(&out[at..at + 3], &[2, u32::MAX, 5]);
        let offs = &out[lay.adjust()];
        assert_eq!(offs, &[u32::MAX, 0, 6, u32::MAX][..lay.n_logits]);
        let mut words = Vec::new();
        a(5).write(&mut words);
        assert_eq!(&out[lay.len + 6..lay.len + 12], &words[..]);
        // Adjustments past the buffer are refused, not cut.
        let mut small = vec![0u32; lay.len + 11];
        assert!(write(&mut small, &b, 1, 3, 0, None, &[], &adjust, &[]).is_none());
        let mut small = vec![0u32; lay.len + 14];
        assert!(write(&mut small, &b, 1, 3, 0, None, &[], &adjust, &scores).is_none());
    }
}
