//! A tenant's files: stored, read, listed a page at a time and deleted (never while a
//! batch that may still run reads it).

use super::{
    file_row, held, listed, now_s, put_file, BatchStore, FileRow, Listing, Result, FILE_COLUMNS,
    RUNNING,
};
use rusqlite::{params, OptionalExtension, TransactionBehavior};

impl BatchStore {
    /// What `tenant`'s unexpired files take, in bytes.
    pub fn stored_bytes(&self, tenant: &str) -> Result<u64> {
        let conn = self.conn()?;
        held(&conn, tenant)
    }

    /// Stores a file of `tenant`'s.
    pub fn put_file(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        content: &[u8],
    ) -> Result<FileRow> {
        let conn = self.conn()?;
        let until = self.kept_until(now_s());
        put_file(&conn, tenant, filename, purpose, content, until)
    }

    /// Stores a file of `tenant`'s, kept `keep_s` seconds (else `retention_hours`), unless
    /// `tenant`'s files would then take more than `quota` bytes: then the bytes they take
    /// now (checked and written in one transaction, so that uploads side by side cannot
    /// pass the quota together).
    pub fn put_file_within(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        content: &[u8],
        keep_s: Option<i64>,
        quota: u64,
    ) -> Result<std::result::Result<FileRow, u64>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored = held(&tx, tenant)?;
        if stored.saturating_add(content.len() as u64) > quota {
            return Ok(Err(stored));
        }
        let now = now_s();
        let until = keep_s.map_or_else(|| self.kept_until(now), |k| now.saturating_add(k));
        let row = put_file(&tx, tenant, filename, purpose, content, until)?;
        tx.commit()?;
        Ok(Ok(row))
    }

    /// One of `tenant`'s files (unexpired).
    pub fn file(&self, tenant: &str, id: &str) -> Result<Option<FileRow>> {
        Ok(self
            .conn()?
            .query_row(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM files WHERE id = ?1 AND tenant = ?2 AND expires_at > ?3"
                ),
                params![id, tenant, now_s()],
                file_row,
            )
            .optional()?)
    }

    /// The bytes of one of `tenant`'s files.
    pub fn content(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT content FROM files WHERE id = ?1 AND tenant = ?2 AND expires_at > ?3",
                params![id, tenant, now_s()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// A page of `tenant`'s files, and whether more follow.
    pub fn files(&self, tenant: &str, page: &Listing<'_>) -> Result<(Vec<FileRow>, bool)> {
        let conn = self.conn()?;
        let purpose = page.purpose.unwrap_or("");
        listed(
            &conn,
            &format!(
                "SELECT {FILE_COLUMNS} FROM files WHERE tenant = ?1 AND expires_at > ?2
                 AND (?3 = '' OR purpose = ?3)"
            ),
            "files",
            tenant,
            page,
            purpose,
            file_row,
        )
    }

    /// Deletes one of `tenant`'s files: whether it had it, or the batch that has not
    /// ended and reads it (then it stays).
    pub fn delete_file(&self, tenant: &str, id: &str) -> Result<std::result::Result<bool, String>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let reader: Option<String> = tx
            .query_row(
                &format!(
                    "SELECT id FROM batches WHERE input_file_id = ?1 AND tenant = ?2
                     AND status IN {RUNNING}"
                ),
                params![id, tenant],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(batch) = reader {
            return Ok(Err(batch));
        }
        let n = tx.execute(
            "DELETE FROM files WHERE id = ?1 AND tenant = ?2 AND expires_at > ?3",
            params![id, tenant, now_s()],
        )?;
        tx.commit()?;
        Ok(Ok(n > 0))
    }
}
