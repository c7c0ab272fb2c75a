//! The usage journal: how a finished request's record becomes durable without leaving the
//! request's thread.
//!
//! Each gateway process appends framed records to segment files of its own in a folder
//! beside the database (`<db>.usage-log/<start ms>-<pid>-<n>`), opened `O_APPEND` and held
//! under an exclusive `flock` for as long as the process writes them. (A folder of their
//! own: the config watcher watches the config's folder, where the database usually is, and
//! would be woken by every append there.) One record is one `write(2)`:
//! the kernel appends it whole (the inode's lock serializes appenders), so once the call
//! returns the record is in the page cache and survives a crash of the process, as a
//! SQLite commit with `synchronous = NORMAL` does. The ledger's thread copies the segment
//! into SQLite a few times a second, in one transaction per pass that also stores how far
//! it has read (`usage_log`), so every record lands in the database exactly once.
//!
//! A frame is `MAGIC`, the payload's length and CRC-32 (little-endian), then the record as
//! JSON. A reader that meets a damaged frame (a short write on a full disk, a torn tail
//! after a power loss) skips to the next `MAGIC` whose frame checks out.
//!
//! Segments whose owner is gone (its lock is free) are copied into the database and
//! removed by the next ledger that starts on the same database, or by `gateway usage`.

use super::UsageRecord;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Marks the start of a frame.
const MAGIC: [u8; 4] = *b"TGU1";
/// Magic, length, CRC-32.
const HEADER: usize = 12;
/// Larger lengths are damage, not records (a record is a few hundred bytes).
const MAX_RECORD: usize = 1 << 16;

/// `record` as one frame.
pub(super) fn encode(record: &UsageRecord) -> serde_json::Result<Vec<u8>> {
    let mut out = vec![0; HEADER];
    serde_json::to_writer(&mut out, record)?;
    let len = (out.len() - HEADER) as u32;
    let crc = crc32fast::hash(&out[HEADER..]);
    out[..4].copy_from_slice(&MAGIC);
    out[4..8].copy_from_slice(&len.to_le_bytes());
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// What [`parse`] found in a run of bytes.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    pub records: Vec<UsageRecord>,
    /// Bytes consumed: whole frames, and damage skipped.
    pub used: usize,
    /// Damaged frames (or runs of bytes that were no frame) skipped.
    pub damaged: u64,
}

/// The records in `buf`. With `complete`, `buf` is all the segment will ever hold (its
/// writer is gone), so a frame cut short at the end is damage; otherwise it may still be
/// being written, and is left for the next read.
pub(super) fn parse(buf: &[u8], complete: bool) -> Parsed {
    let mut p = Parsed::default();
    let mut at = 0;
    // Whether the bytes just before `at` were skipped as damage (one count per run).
    let mut skipping = false;
    while at < buf.len() {
        let rest = &buf[at..];
        match frame(rest) {
            Frame::Record(r, n) => {
                p.records.push(r);
                at += n;
                skipping = false;
            }
            Frame::Short if !complete => break,
            Frame::Short | Frame::Damaged => {
                if !skipping {
                    p.damaged += 1;
                    skipping = true;
                }
                // On to the next possible frame start.
                at += 1 + next_magic(&rest[1..]).unwrap_or(rest.len() - 1);
            }
        }
    }
    p.used = at;
    p
}

enum Frame {
    Record(UsageRecord, usize),
    /// Not all of the frame is there (yet).
    Short,
    Damaged,
}

fn frame(b: &[u8]) -> Frame {
    if b.len() < HEADER {
        return if MAGIC.starts_with(&b[..b.len().min(4)]) {
            Frame::Short
        } else {
            Frame::Damaged
        };
    }
    if b[..4] != MAGIC {
        return Frame::Damaged;
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (len, crc) = (word(4) as usize, word(8));
    if len > MAX_RECORD {
        return Frame::Damaged;
    }
    let Some(payload) = b.get(HEADER..HEADER + len) else {
        return Frame::Short;
    };
    if crc32fast::hash(payload) != crc {
        return Frame::Damaged;
    }
    match serde_json::from_slice(payload) {
        Ok(r) => Frame::Record(r, HEADER + len),
        Err(_) => Frame::Damaged,
    }
}

/// Offset of the next `MAGIC` in `b` (or of a prefix of it at the very end).
fn next_magic(b: &[u8]) -> Option<usize> {
    (0..b.len()).find(|&i| MAGIC.starts_with(&b[i..(i + 4).min(b.len())]))
}

/// The folder of database `db`'s segments: `<db>.usage-log`.
pub(super) fn folder(db: &Path) -> PathBuf {
    let name = db.file_name().map_or_else(
        || "tollgate-usage.db".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    db.with_file_name(format!("{name}.usage-log"))
}

/// The segments of `db` on disk (whoever owns them), oldest name first.
pub(super) fn segments(db: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(folder(db)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            out.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// A segment this process appends to.
#[derive(Debug)]
pub(super) struct Segment {
    /// The file name (the key of its row in `usage_log`).
    pub name: String,
    pub path: PathBuf,
    /// Opened to append, and locked for as long as it is open.
    file: File,
}

impl Segment {
    /// A new segment of `db`, locked; `n` distinguishes this process's segments.
    pub fn create(db: &Path, started_ms: i64, n: u64) -> io::Result<Self> {
        let dir = folder(db);
        std::fs::create_dir_all(&dir)?;
        let pid = std::process::id();
        for extra in 0u64.. {
            let name = format!("{started_ms:013}-{pid}-{}", n + extra);
            let path = dir.join(&name);
            match OpenOptions::new().append(true).create_new(true).open(&path) {
                Ok(file) => {
                    file.try_lock().map_err(|e| match e {
                        TryLockError::Error(e) => e,
                        TryLockError::WouldBlock => {
                            io::Error::other(format!("{} is locked", path.display()))
                        }
                    })?;
                    return Ok(Self { name, path, file });
                }
                // Left by an earlier process with this pid and start time: the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("segment numbers run out")
    }

    /// Appends one frame with one `write(2)`.
    pub fn append(&self, frame: &[u8]) -> io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n != frame.len() {
            // The reader skips what was written of it.
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    /// Waits until what was appended is on the disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Opens segment `path` to copy it, if its owner is gone: the file, locked (so that no one
/// else copies it meanwhile), or `None` while another process holds it (or it is gone).
pub(super) fn claim(path: &Path) -> io::Result<Option<File>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(e)) => return Err(e),
    }
    // Whoever held it last may have copied and removed it before letting go.
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> UsageRecord {
        UsageRecord {
            ts_ms: 1_700_000_000_000 + i as i64,
            request_id: format!("req-{i}"),
            tenant: "t\"é\n".into(),
            model: "m".into(),
            worker: "p/0".into(),
            input_tokens: i,
            cached_tokens: 1,
            output_tokens: 2 * i,
            weighted_tokens: 7.5 * i as f64,
            status: "200".into(),
            ttft_ms: i.is_multiple_of(2).then_some(1.25),
            duration_ms: 3.5,
            best_effort: i.is_multiple_of(3),
        }
    }

    fn ids(p: &Parsed) -> Vec<String> {
        p.records.iter().map(|r| r.request_id.clone()).collect()
    }

    #[test]
    fn frames_give_back_their_records() {
        let mut buf = Vec::new();
        for i in 0..5 {
            buf.extend(encode(&rec(i)).unwrap());
        }
        let p = parse(&buf, false);
        assert_eq!(p.used, buf.len());
        assert_eq!(p.damaged, 0);
        assert_eq!(ids(&p), ["req-0", "req-1", "req-2", "req-3", "req-4"]);
        let r = &p.records[2];
        let want = rec(2);
        assert_eq!(
            (
                r.ts_ms,
                &r.tenant,
                r.input_tokens,
                r.cached_tokens,
                r.output_tokens
            ),
            (want.ts_ms, &want.tenant, 2, 1, 4)
        );
        assert_eq!(
            (r.weighted_tokens, r.ttft_ms, r.best_effort),
            (15.0, Some(1.25), false)
        );
    }

    #[test]
    fn a_frame_being_written_waits_and_a_cut_one_at_the_end_is_damage() {
        let mut buf = encode(&rec(1)).unwrap();
        let second = encode(&rec(2)).unwrap();
        for cut in [1, 3, 4, 11, 12, 20, second.len() - 1] {
            let mut b = buf.clone();
            b.extend(&second[..cut]);
            let p = parse(&b, false);
            assert_eq!(
                (ids(&p), p.used, p.damaged),
                (vec!["req-1".to_string()], buf.len(), 0)
            );
            let p = parse(&b, true);
            assert_eq!(
                (ids(&p), p.used, p.damaged),
                (vec!["req-1".to_string()], b.len(), 1)
            );
        }
        buf.extend(&second);
        assert_eq!(parse(&buf, false).records.len(), 2);
    }

    #[test]
    fn damage_in_the_middle_is_skipped_to_the_next_good_frame() {
        let (a, b, c) = (
            encode(&rec(1)).unwrap(),
            encode(&rec(2)).unwrap(),
            encode(&rec(3)).unwrap(),
        );
        // A short write (half a frame), then the next writer's frames.
        let mut buf = a.clone();
        buf.extend(&b[..b.len() / 2]);
        buf.extend(&c);
        let p = parse(&buf, false);
        assert_eq!(ids(&p), ["req-1", "req-3"]);
        assert_eq!((p.used, p.damaged), (buf.len(), 1));
        // A flipped byte in a payload: its CRC fails.
        let mut buf = a.clone();
        let mut bad = b.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x20;
        buf.extend(&bad);
        buf.extend(&c);
        let p = parse(&buf, true);
        assert_eq!(ids(&p), ["req-1", "req-3"]);
        assert_eq!(p.damaged, 1);
        // Garbage before any frame, and a length past any record.
        let mut buf = b"garbage".to_vec();
        buf.extend(&MAGIC);
        buf.extend(&u32::MAX.to_le_bytes());
        buf.extend(&[0; 4]);
        buf.extend(&a);
        let p = parse(&buf, false);
        assert_eq!(ids(&p), ["req-1"]);
        assert_eq!(p.used, buf.len());
        // Nothing but garbage: all used (complete) or all but a possible frame start.
        let p = parse(b"xxxxTGU", false);
        assert_eq!((p.records.len(), p.used, p.damaged), (0, 4, 1));
        let p = parse(b"xxxxTGU", true);
        assert_eq!((p.used, p.damaged), (7, 1));
    }

    #[test]
    fn a_held_segment_cannot_be_claimed_and_a_released_one_can() {
        let dir = std::env::temp_dir().join(format!("tollgate-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("u.db");
        let seg = Segment::create(&db, 5, 0).unwrap();
        seg.append(&encode(&rec(1)).unwrap()).unwrap();
        let other = Segment::create(&db, 5, 0).unwrap();
        assert_ne!(seg.name, other.name, "a taken name is skipped");
        let found = segments(&db).unwrap();
        assert_eq!(found.len(), 2);
        assert!(found[0].0.starts_with("0000000000005-"));
        assert!(found[0].1.starts_with(dir.join("u.db.usage-log")));
        assert!(claim(&seg.path).unwrap().is_none(), "its writer holds it");
        let path = seg.path.clone();
        drop(seg);
        let f = claim(&path).unwrap().expect("released");
        assert!(claim(&path).unwrap().is_none(), "claimed once at a time");
        std::fs::remove_file(&path).unwrap();
        drop(f);
        assert!(claim(&path).unwrap().is_none(), "removed");
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
