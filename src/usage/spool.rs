//! The spool: a local SQLite outbox (WAL) that every record is written to before any delivery,
//! plus one cursor per reporter (the last row it delivered). Owns the file's schema, batch
//! inserts, reading a reporter's backlog, pruning and the totals for `llmproxy usage`.
//!
//! Each thread opens its own [`Spool`] on the same file: WAL lets readers run beside the one
//! writer, and `busy_timeout` serialises the short write transactions. It must not deliver
//! anything itself.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::{Record, UsageRecord};

/// A spooled record as stored: its row id (the cursor position) and its JSON, which is what a
/// webhook sends; only sinks that need the fields parse it.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub id: i64,
    pub json: String,
}

impl Spooled {
    pub fn record(&self) -> serde_json::Result<UsageRecord> {
        serde_json::from_str(&self.json)
    }
}

pub struct Spool {
    conn: Connection,
}

/// Spooled rows as the sinks take them: each row's id and JSON, the JSONs in one buffer.
/// Filled by [`Spool::insert_rows`] (rows just written) or [`Spool::read_after`] (read back).
#[derive(Debug, Default)]
pub struct Rows {
    ids: Vec<i64>,
    json: String,
    /// Where each row's JSON ends in `json`.
    ends: Vec<usize>,
}

impl Rows {
    fn clear(&mut self) {
        self.ids.clear();
        self.json.clear();
        self.ends.clear();
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn id(&self, i: usize) -> i64 {
        self.ids[i]
    }

    pub fn json(&self, i: usize) -> &str {
        &self.json[self.start(i)..self.ends[i]]
    }

    /// Bytes of JSON of rows `range` together.
    pub fn json_len(&self, range: std::ops::Range<usize>) -> usize {
        if range.is_empty() {
            return 0;
        }
        self.ends[range.end - 1] - self.start(range.start)
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1]
        }
    }
}

/// Grouping for [`Spool::totals`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Model,
}

/// Token totals of one group (or of everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    /// Key name or model; "-" where unknown; "" for the grand total.
    pub group: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub estimated: u64,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Spool {
    /// Opens (creating the file, its directory and the schema if needed).
    pub fn open(path: &Path) -> rusqlite::Result<Spool> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing directory then surfaces as SQLite's "unable to open" with the path.
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // NORMAL in WAL mode: a committed batch survives a process crash (kill -9); only an OS
        // crash or power loss can lose the last transactions, and it costs no fsync per batch.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints (WAL pages copied into the file, then fsync) dominate the cost of a
        // record at SQLite's default of every 1000 pages; every 10000 (~40 MiB of WAL) costs half
        // as much. The WAL file is cut back to 64 MiB after each.
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
        // No AUTOINCREMENT and no index but the row id: each costs insert time. Ids still never
        // go back, because pruning always keeps the newest row (a
        // plain row id is the largest one + 1), and time ranges are found by bisecting ids
        // ([`Spool::first_id_at`]). A file that has the time index `records_spooled` loses it,
        // as nothing reads it; one whose table has AUTOINCREMENT keeps it, and ids behave alike.
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS records (
                 id INTEGER PRIMARY KEY,
                 spooled_ms INTEGER NOT NULL,
                 key_name TEXT,
                 model TEXT,
                 prompt_tokens INTEGER NOT NULL,
                 completion_tokens INTEGER NOT NULL,
                 total_tokens INTEGER NOT NULL,
                 usage_estimated INTEGER NOT NULL,
                 record TEXT NOT NULL
             );
             DROP INDEX IF EXISTS records_spooled;
             CREATE TABLE IF NOT EXISTS cursors (
                 reporter TEXT PRIMARY KEY,
                 last_id INTEGER NOT NULL
             );",
        )?;
        Ok(Spool { conn })
    }

    /// Writes a batch in one transaction (one commit for the whole batch is what makes
    /// tens of thousands of records per second cheap).
    pub fn insert<S>(&mut self, records: &[Record<S>]) -> rusqlite::Result<()>
    where
        S: AsRef<str> + Serialize,
    {
        let mut rows = Rows::default();
        self.insert_rows(records, &mut rows)
    }

    /// [`Spool::insert`], keeping what was written in `rows` (cleared first): each record's row
    /// id and JSON, for the sinks to take from memory instead of reading the spool back.
    pub fn insert_rows<S>(&mut self, records: &[Record<S>], rows: &mut Rows) -> rusqlite::Result<()>
    where
        S: AsRef<str> + Serialize,
    {
        rows.clear();
        let now = now_ms();
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO records (spooled_ms, key_name, model, prompt_tokens,
                     completion_tokens, total_tokens, usage_estimated, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for r in records {
                let start = rows.json.len();
                // SAFETY: serde_json writes UTF-8 only (strings it escapes are UTF-8 already).
                let bytes = unsafe { rows.json.as_mut_vec() };
                serde_json::to_writer(&mut *bytes, r).expect("a record always serialises");
                stmt.execute(params![
                    now,
                    r.key_name.as_ref().map(AsRef::as_ref),
                    r.model.as_ref().map(AsRef::as_ref),
                    r.prompt_tokens as i64,
                    r.completion_tokens as i64,
                    r.total_tokens as i64,
                    r.usage_estimated,
                    // serde_json writes UTF-8: bound as text without a check.
                    ToSqlOutput::Borrowed(ValueRef::Text(&rows.json.as_bytes()[start..])),
                ])?;
                rows.ids.push(tx.last_insert_rowid());
                rows.ends.push(rows.json.len());
            }
        }
        tx.commit()
    }

    /// The reporter's position: the last row id it delivered (0 for a new reporter).
    pub fn cursor(&self, reporter: &str) -> rusqlite::Result<i64> {
        Ok(self
            .conn
            .prepare_cached("SELECT last_id FROM cursors WHERE reporter = ?1")?
            .query_row([reporter], |row| row.get(0))
            .optional()?
            .unwrap_or(0))
    }

    /// Up to `limit` rows after the reporter's cursor, oldest first.
    pub fn pending(&self, reporter: &str, limit: usize) -> rusqlite::Result<Vec<Spooled>> {
        let after = self.cursor(reporter)?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, record FROM records WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let rows = stmt.query_map(params![after, limit as i64], |row| {
            Ok(Spooled {
                id: row.get(0)?,
                json: row.get(1)?,
            })
        })?;
        rows.collect()
    }

    /// Up to `limit` rows after row `after`, oldest first, into `rows` (cleared first).
    pub fn read_after(&self, after: i64, limit: usize, rows: &mut Rows) -> rusqlite::Result<()> {
        rows.clear();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, record FROM records WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let mut found = stmt.query(params![after, limit as i64])?;
        while let Some(row) = found.next()? {
            rows.ids.push(row.get(0)?);
            rows.json.push_str(row.get_ref(1)?.as_str()?);
            rows.ends.push(rows.json.len());
        }
        Ok(())
    }

    /// The newest row's id (0 when the spool is empty).
    pub fn last_id(&self) -> rusqlite::Result<i64> {
        self.conn
            .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM records")?
            .query_row([], |row| row.get(0))
    }

    /// For the connections that write (the ingest thread's, the cursors'): their commits never
    /// run a checkpoint, which the reporter's checkpoint thread runs instead
    /// ([`Spool::checkpoint`]), so a commit stays one WAL append.
    pub fn without_checkpoints(self) -> rusqlite::Result<Spool> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(self)
    }

    /// Copies what it can of the WAL into the database file without waiting for (or stopping)
    /// the writer: the ingest thread's commits go on meanwhile.
    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
    }

    /// Marks every row up to `last_id` delivered for `reporter`.
    pub fn ack(&self, reporter: &str, last_id: i64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO cursors (reporter, last_id) VALUES (?1, ?2)
                 ON CONFLICT(reporter) DO UPDATE SET last_id = MAX(last_id, excluded.last_id)",
            )?
            .execute(params![reporter, last_id])?;
        Ok(())
    }

    /// Rows spooled but not yet delivered by `reporter`. Ids are contiguous and rows after any
    /// cursor are never pruned, so this is a subtraction, not a scan of the backlog.
    pub fn backlog(&self, reporter: &str) -> rusqlite::Result<u64> {
        let after = self.cursor(reporter)?;
        Ok(self.last_id()?.saturating_sub(after).max(0) as u64)
    }

    /// Deletes rows older than `retention` that every one of `reporters` has delivered. The
    /// newest row always stays: it is what keeps the next id above every cursor.
    pub fn prune(&self, reporters: &[&str], retention: Duration) -> rusqlite::Result<usize> {
        let mut delivered = i64::MAX;
        for name in reporters {
            delivered = delivered.min(self.cursor(name)?);
        }
        let old = self.first_id_at(now_ms() - retention.as_millis() as i64)? - 1;
        self.conn.execute(
            "DELETE FROM records WHERE id <= ?1 AND id < (SELECT MAX(id) FROM records)",
            [delivered.min(old)],
        )
    }

    /// The first row id spooled at or after `ms` (one past the last row if none was). Rows are
    /// spooled in id order with the time of their batch, so the times grow with the ids and a
    /// bisection over ids finds the boundary in a few dozen row look-ups. A wall clock set back
    /// only blurs the boundary by the rows written meanwhile.
    fn first_id_at(&self, ms: i64) -> rusqlite::Result<i64> {
        let (first, last): (Option<i64>, Option<i64>) = self
            .conn
            .prepare_cached("SELECT MIN(id), MAX(id) FROM records")?
            .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        let (Some(mut lo), Some(last)) = (first, last) else {
            return Ok(1);
        };
        let mut at = self.conn.prepare_cached(
            "SELECT id, spooled_ms FROM records WHERE id >= ?1 ORDER BY id LIMIT 1",
        )?;
        // Invariant: every row below `lo` was spooled before `ms`; `hi` is at or after it.
        let mut hi = last + 1;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            // The first row at or above `mid`: nothing here relies on ids being contiguous.
            let (id, spooled): (i64, i64) =
                at.query_row([mid], |row| Ok((row.get(0)?, row.get(1)?)))?;
            if spooled < ms {
                lo = id + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Totals of the records spooled in `[since_ms, until_ms)`, biggest first.
    pub fn totals(
        &self,
        since_ms: i64,
        until_ms: i64,
        by: Option<GroupBy>,
    ) -> rusqlite::Result<Vec<Totals>> {
        let group = match by {
            Some(GroupBy::Key) => "COALESCE(key_name, '-')",
            Some(GroupBy::Model) => "COALESCE(model, '-')",
            None => "''",
        };
        let sql = format!(
            "SELECT {group}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),
                    SUM(total_tokens), SUM(usage_estimated)
             FROM records WHERE id >= ?1 AND id < ?2 GROUP BY 1 ORDER BY 5 DESC, 1"
        );
        let ids = [self.first_id_at(since_ms)?, self.first_id_at(until_ms)?];
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(ids, |row| {
            Ok(Totals {
                group: row.get(0)?,
                requests: row.get::<_, i64>(1)? as u64,
                prompt_tokens: row.get::<_, i64>(2)? as u64,
                completion_tokens: row.get::<_, i64>(3)? as u64,
                total_tokens: row.get::<_, i64>(4)? as u64,
                estimated: row.get::<_, i64>(5)? as u64,
            })
        })?;
        rows.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(id: &str, key: &str, prompt: u64) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            client_request_id: None,
            timestamp: "2026-01-14T10:30:00.000Z".into(),
            key_name: Some(key.into()),
            user_id: None,
            api_key: None,
            model: Some("m".into()),
            endpoint: "/v1/chat/completions".into(),
            api: "chat_completions".into(),
            is_stream: true,
            backend_url: "http://b".into(),
            tier: 0,
            status_code: 200,
            latency_ms: 1,
            ttft_ms: Some(1),
            prompt_tokens: prompt,
            completion_tokens: 1,
            total_tokens: prompt + 1,
            cached_tokens: 0,
            reasoning_tokens: 0,
            usage_estimated: false,
            status: "ok".into(),
        }
    }

    #[test]
    fn cursors_backlog_prune_and_totals() {
        let dir = std::env::temp_dir().join(format!("llmproxy-spool-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("nested/usage.db");
        let mut spool = Spool::open(&path).unwrap();
        spool
            .insert(&[
                record("a", "k1", 10),
                record("b", "k2", 20),
                record("c", "k1", 30),
            ])
            .unwrap();
        assert_eq!(spool.backlog("hook").unwrap(), 3);
        let rows = spool.pending("hook", 2).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].record().unwrap().request_id, "b");
        spool.ack("hook", rows[1].id).unwrap();
        // Another connection sees the same state: this is how the delivery threads work.
        let other = Spool::open(&path).unwrap();
        assert_eq!(other.backlog("hook").unwrap(), 1);
        assert_eq!(other.backlog("db").unwrap(), 3);
        // Retention 0: rows delivered by every reporter go, the rest stays.
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(other.prune(&["hook", "db"], Duration::ZERO).unwrap(), 0);
        assert_eq!(other.prune(&["hook"], Duration::ZERO).unwrap(), 2);
        assert_eq!(other.pending("db", 10).unwrap().len(), 1);

        spool
            .insert(&[record("d", "k2", 5), record("e", "k1", 1)])
            .unwrap();
        let by_key = spool.totals(0, i64::MAX, Some(GroupBy::Key)).unwrap();
        assert_eq!(by_key[0].group, "k1");
        assert_eq!((by_key[0].requests, by_key[0].prompt_tokens), (2, 31));
        assert_eq!(by_key[1].group, "k2");
        assert_eq!(by_key[1].total_tokens, 6);
        let all = spool.totals(0, i64::MAX, None).unwrap();
        assert_eq!((all[0].requests, all[0].prompt_tokens), (3, 36));

        // A time range is a range of ids: only the rows spooled from `split` on count.
        std::thread::sleep(Duration::from_millis(2));
        let split = now_ms();
        std::thread::sleep(Duration::from_millis(2));
        spool.insert(&[record("e2", "k1", 7)]).unwrap();
        let since = spool.totals(split, i64::MAX, None).unwrap();
        assert_eq!((since[0].requests, since[0].prompt_tokens), (1, 7));
        let before = spool.totals(0, split, None).unwrap();
        assert_eq!((before[0].requests, before[0].prompt_tokens), (3, 36));
        assert!(spool
            .totals(split + 3_600_000, i64::MAX, None)
            .unwrap()
            .is_empty());

        // Everything delivered and pruned, but the newest row (id 6) stays, so that new rows
        // still come after every cursor.
        for name in ["hook", "db"] {
            other.ack(name, 6).unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(other.prune(&["hook", "db"], Duration::ZERO).unwrap(), 3);
        assert_eq!(other.backlog("db").unwrap(), 0);
        spool.insert(&[record("f", "k2", 5)]).unwrap();
        assert_eq!(spool.backlog("db").unwrap(), 1);
        let pending = spool.pending("db", 10).unwrap();
        assert_eq!(pending[0].record().unwrap(), record("f", "k2", 5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
