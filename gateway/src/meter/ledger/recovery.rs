//! Recovery: the journal segments a gone process left (their lock free) copied into the
//! database and removed, at start and by `gateway usage`; and the removal of a segment
//! copied whole, shared with the ledger thread.

use super::copier::commit;
use super::*;

/// Copies into `db` the journal segments whose writers are gone (for `gateway usage`):
/// the records copied.
pub fn recover(db: &Path) -> Result<u64, LedgerError> {
    let mut conn = open(db, Synchronous::Normal)?;
    Ok(recover_with(&mut conn, db)?.0)
}

/// Copies and removes every segment of `db` that no live process holds: (records copied,
/// damaged frames skipped).
pub(super) fn recover_with(conn: &mut Connection, db: &Path) -> Result<(u64, u64), LedgerError> {
    let (mut written, mut damaged) = (0, 0);
    for (name, path) in journal::segments(db)? {
        // Held while it is copied and removed, so that no one else copies it too.
        let Some(mut file) = journal::claim(&path)? else {
            continue;
        };
        let copied: u64 = conn
            .query_row(
                "SELECT copied FROM usage_log WHERE segment = ?1",
                [&name],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(copied))?;
        file.read_to_end(&mut buf)?;
        let p = journal::parse(&buf, true);
        commit(
            conn,
            &p.records,
            &[],
            &[(name.clone(), copied + p.used as u64)],
        )?;
        written += p.records.len() as u64;
        damaged += p.damaged;
        remove_copied(conn, &name, &path)?;
    }
    // Rows left by a process that removed its segment but ended before its row.
    let names: Vec<String> = conn
        .prepare("SELECT segment FROM usage_log")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let dir = journal::folder(db);
    for name in names {
        if !dir.join(&name).exists() {
            conn.execute("DELETE FROM usage_log WHERE segment = ?1", [&name])?;
        }
    }
    Ok((written, damaged))
}

/// Removes a segment copied whole, then its position's row: in this order, since a row
/// without its file is only cleaned up later, while a file without its row would be copied
/// again from its start. The caller holds the segment's lock until this returns.
pub(super) fn remove_copied(conn: &Connection, name: &str, path: &Path) -> Result<(), LedgerError> {
    match std::fs::remove_file(path) {
        // Gone already (an operator cleaned up): what it held is copied either way.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    conn.execute("DELETE FROM usage_log WHERE segment = ?1", [name])?;
    Ok(())
}
