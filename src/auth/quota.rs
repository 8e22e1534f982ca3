//! Quota persistence: per-key token consumption in a small SQLite file, or in PostgreSQL or
//! MySQL/MariaDB when `auth.quota_path` is a `postgres://` or `mysql://` URL, so a restart does not
//! hand every key its quota back. Writes happen on one background thread that coalesces updates
//! (latest total per key wins) and commits them; callers never touch the database. A write never
//! lowers a stored total of the same period, so instances sharing one table (each holding the
//! shared total as it last saw it) keep the highest. Keys are stored as a hash, never in clear.
//! Connections come from [`crate::db`].

use std::collections::HashMap;
use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::config::QuotaPeriod;
use crate::db::{self, Conn, DbDriver};
use crate::time::civil_from_days;

/// How long the writer gathers updates before committing them.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How long a read or write of a networked store may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A saved total: (key id, key name, period, tokens used).
type Save = (String, String, u64, u64);

/// Saved consumption by key id: (period, tokens used).
pub type Saved = HashMap<String, (u64, u64)>;

const SCHEMA_SQL: &str = "CREATE TABLE IF NOT EXISTS key_quota (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    period BIGINT NOT NULL,
    used BIGINT NOT NULL
)";
const SCHEMA_MYSQL: &str = "CREATE TABLE IF NOT EXISTS key_quota (
    key_id VARCHAR(32) PRIMARY KEY,
    name TEXT NOT NULL,
    period BIGINT NOT NULL,
    used BIGINT NOT NULL
)";

/// A later period replaces the total, the same period keeps the larger, an earlier one is
/// ignored (the assignments read the row as it was).
const UPSERT_SQLITE: &str =
    "INSERT INTO key_quota (key_id, name, period, used) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT(key_id) DO UPDATE SET name = ?2,
        used = CASE WHEN ?3 > period THEN ?4 WHEN ?3 = period THEN MAX(used, ?4) ELSE used END,
        period = MAX(period, ?3)";
const UPSERT_POSTGRES: &str =
    "INSERT INTO key_quota (key_id, name, period, used) VALUES ($1, $2, $3, $4)
    ON CONFLICT (key_id) DO UPDATE SET name = $2,
        used = CASE WHEN $3 > key_quota.period THEN $4
                    WHEN $3 = key_quota.period THEN GREATEST(key_quota.used, $4)
                    ELSE key_quota.used END,
        period = GREATEST(key_quota.period, $3)";
/// MySQL assigns left to right, each seeing the ones before: `used` goes before `period`.
const UPSERT_MYSQL: &str = "INSERT INTO key_quota (key_id, name, period, used) VALUES (?, ?, ?, ?)
    ON DUPLICATE KEY UPDATE name = VALUES(name),
        used = CASE WHEN VALUES(period) > period THEN VALUES(used)
                    WHEN VALUES(period) = period THEN GREATEST(used, VALUES(used))
                    ELSE used END,
        period = GREATEST(period, VALUES(period))";

pub struct QuotaStore {
    tx: Option<Sender<Save>>,
    writer: Option<JoinHandle<()>>,
}

impl QuotaStore {
    /// Opens (creating) the store at `location`; returns the saved (period, used) per key id.
    pub fn open(location: &str) -> io::Result<(QuotaStore, Saved)> {
        let mut conn = connect(location)?;
        let saved = load(&mut conn).map_err(|e| io::Error::other(format!("quota store: {e}")))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let location = location.to_string();
        let writer = std::thread::Builder::new()
            .name("llmproxy-quota".into())
            .spawn(move || write_loop(Some(conn), &location, rx))?;
        Ok((
            QuotaStore {
                tx: Some(tx),
                writer: Some(writer),
            },
            saved,
        ))
    }

    pub fn save(&self, key_id: String, name: String, period: u64, used: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((key_id, name, period, used));
        }
    }
}

impl Drop for QuotaStore {
    /// Flushes what is pending: closing the channel ends the writer after its last commit.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Opens the store and makes its table if missing. Errors never carry the location (it may
/// hold a password).
fn connect(location: &str) -> io::Result<Conn> {
    let err = |e: &dyn std::fmt::Display| io::Error::other(format!("quota store: {e}"));
    let driver = DbDriver::of(location);
    if driver == DbDriver::Sqlite {
        if let Some(dir) = std::path::Path::new(location)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir)?;
        }
    }
    let mut conn = db::connect(driver, location, Some(IO_TIMEOUT)).map_err(|e| err(&e))?;
    match &mut conn {
        Conn::Sqlite(c) => c
            .execute_batch(&format!("PRAGMA journal_mode=WAL; {SCHEMA_SQL};"))
            .map_err(|e| err(&e))?,
        Conn::Postgres(c) => c
            .batch_execute(&format!("SET client_min_messages TO WARNING; {SCHEMA_SQL}"))
            .map_err(|e| err(&e))?,
        Conn::Mysql(c) => {
            use mysql::prelude::Queryable;
            c.query_drop(SCHEMA_MYSQL).map_err(|e| err(&e))?
        }
    }
    Ok(conn)
}

fn load(conn: &mut Conn) -> Result<Saved, String> {
    const SELECT: &str = "SELECT key_id, period, used FROM key_quota";
    let rows: Vec<(String, i64, i64)> = match conn {
        Conn::Sqlite(c) => {
            let mut stmt = c.prepare(SELECT).map_err(|e| e.to_string())?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| e.to_string())?;
            rows.collect::<Result<_, _>>().map_err(|e| e.to_string())?
        }
        Conn::Postgres(c) => c
            .query(SELECT, &[])
            .map_err(|e| e.to_string())?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
        Conn::Mysql(c) => {
            use mysql::prelude::Queryable;
            c.query(SELECT).map_err(|e| e.to_string())?
        }
    };
    Ok(rows
        .into_iter()
        .map(|(id, period, used)| (id, (period as u64, used as u64)))
        .collect())
}

/// Polls instead of waiting on the channel, so a save never has a sleeping thread to wake: one
/// commit per FLUSH_EVERY at most, with a busy key's totals coalesced meanwhile. A networked
/// store that fails is reconnected on the next round; its totals wait meanwhile.
fn write_loop(mut conn: Option<Conn>, location: &str, rx: Receiver<Save>) {
    let mut pending: HashMap<String, Save> = HashMap::new();
    loop {
        std::thread::sleep(FLUSH_EVERY);
        let closed = loop {
            match rx.try_recv() {
                Ok(save) => {
                    pending.insert(save.0.clone(), save);
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if !pending.is_empty() {
            let written = match conn.take() {
                Some(c) => Ok(c),
                None => connect(location).map_err(|e| e.to_string()),
            }
            .and_then(|mut c| commit(&mut c, pending.values()).map(|()| c));
            match written {
                Ok(c) => {
                    conn = Some(c);
                    pending.clear();
                }
                Err(e) => tracing::error!("quota store write failed (will retry): {e}"),
            }
        }
        if closed {
            return;
        }
    }
}

fn commit<'a>(conn: &mut Conn, saves: impl Iterator<Item = &'a Save>) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match conn {
        Conn::Sqlite(db) => {
            let tx = db.transaction().map_err(|x| e(&x))?;
            {
                let mut stmt = tx.prepare_cached(UPSERT_SQLITE).map_err(|x| e(&x))?;
                for (id, name, period, used) in saves {
                    stmt.execute(rusqlite::params![id, name, *period as i64, *used as i64])
                        .map_err(|x| e(&x))?;
                }
            }
            tx.commit().map_err(|x| e(&x))
        }
        // Each row on its own: a retry after a failure half-way rewrites rows the upsert keeps.
        Conn::Postgres(c) => {
            let stmt = c.prepare(UPSERT_POSTGRES).map_err(|x| e(&x))?;
            for (id, name, period, used) in saves {
                c.execute(&stmt, &[id, name, &(*period as i64), &(*used as i64)])
                    .map_err(|x| e(&x))?;
            }
            Ok(())
        }
        Conn::Mysql(c) => {
            use mysql::prelude::Queryable;
            for (id, name, period, used) in saves {
                c.exec_drop(UPSERT_MYSQL, (id, name, *period as i64, *used as i64))
                    .map_err(|x| e(&x))?;
            }
            Ok(())
        }
    }
}

/// A stable, non-reversible id for a key (FNV-1a 64, hex): the database never holds raw keys.
pub fn key_id(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The quota period containing `unix_secs`: a day number, a month number, or 0 for "forever".
pub fn period_of(period: Option<QuotaPeriod>, unix_secs: u64) -> u64 {
    let days = (unix_secs / 86_400) as i64;
    match period {
        None => 0,
        Some(QuotaPeriod::Daily) => days as u64,
        Some(QuotaPeriod::Monthly) => {
            let (y, m, _) = civil_from_days(days);
            (y * 12 + i64::from(m)) as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::days_from_civil;

    #[test]
    fn periods() {
        let jan31 = days_from_civil(2026, 1, 31) as u64 * 86_400 + 3600;
        let feb1 = days_from_civil(2026, 2, 1) as u64 * 86_400;
        assert_eq!(period_of(None, jan31), period_of(None, feb1));
        assert_ne!(
            period_of(Some(QuotaPeriod::Monthly), jan31),
            period_of(Some(QuotaPeriod::Monthly), feb1)
        );
        assert_eq!(
            period_of(Some(QuotaPeriod::Monthly), feb1),
            period_of(Some(QuotaPeriod::Monthly), feb1 + 20 * 86_400)
        );
        assert_ne!(
            period_of(Some(QuotaPeriod::Daily), feb1 - 1),
            period_of(Some(QuotaPeriod::Daily), feb1)
        );
    }
}
