//! Quota persistence: per-key token consumption in a small SQLite file, so a restart does not
//! hand every key its quota back. Writes happen on one background thread that coalesces updates
//! (latest total per key wins) and commits them in one transaction; callers never touch SQLite.
//! Keys are stored as a hash, never in clear.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use rusqlite::Connection;

use crate::config::QuotaPeriod;
use crate::time::civil_from_days;

/// How long the writer gathers updates before committing them.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// A saved total: (key id, key name, period, tokens used).
type Save = (String, String, u64, u64);

/// Saved consumption by key id: (period, tokens used).
pub type Saved = HashMap<String, (u64, u64)>;

pub struct QuotaStore {
    tx: Option<Sender<Save>>,
    writer: Option<JoinHandle<()>>,
}

impl QuotaStore {
    /// Opens (creating) the database; returns the saved (period, used) per key id.
    pub fn open(path: &Path) -> io::Result<(QuotaStore, Saved)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let db = Connection::open(path).map_err(sql_err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS key_quota (
                 key_id TEXT PRIMARY KEY,
                 name TEXT NOT NULL,
                 period INTEGER NOT NULL,
                 used INTEGER NOT NULL
             );",
        )
        .map_err(sql_err)?;
        let mut saved = HashMap::new();
        {
            let mut stmt = db
                .prepare("SELECT key_id, period, used FROM key_quota")
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(sql_err)?;
            for row in rows {
                let (id, period, used) = row.map_err(sql_err)?;
                saved.insert(id, (period as u64, used as u64));
            }
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = std::thread::Builder::new()
            .name("llmproxy-quota".into())
            .spawn(move || write_loop(db, rx))?;
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

/// Polls instead of waiting on the channel, so a save never has a sleeping thread to wake: one
/// commit per FLUSH_EVERY at most, with a busy key's totals coalesced meanwhile.
fn write_loop(mut db: Connection, rx: Receiver<Save>) {
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
            if let Err(e) = commit(&mut db, pending.values()) {
                tracing::error!("quota database write failed (will retry): {e}");
            } else {
                pending.clear();
            }
        }
        if closed {
            return;
        }
    }
}

fn commit<'a>(db: &mut Connection, saves: impl Iterator<Item = &'a Save>) -> rusqlite::Result<()> {
    let tx = db.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO key_quota (key_id, name, period, used) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(key_id) DO UPDATE SET name = ?2, period = ?3, used = ?4",
        )?;
        for (id, name, period, used) in saves {
            stmt.execute(rusqlite::params![id, name, *period as i64, *used as i64])?;
        }
    }
    tx.commit()
}

fn sql_err(e: rusqlite::Error) -> io::Error {
    io::Error::other(format!("quota database: {e}"))
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
