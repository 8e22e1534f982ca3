//! Spooled records on their way to the sinks: a [`Batch`] is what one spool transaction wrote
//! (handed from the ingest thread to every delivery thread in memory, with the records
//! themselves) or what a delivery thread read back from the spool to catch up (JSON only). A
//! delivery is a list of [`Span`]s, runs of rows of such batches in id order. It owns no I/O.

use std::sync::Arc;

use super::record::Accounted;
use super::spool::Rows;
use super::Record;

pub struct Batch {
    pub rows: Rows,
    /// The records of `rows`, in order, when the batch comes from the ingest thread; empty for
    /// a batch read back from the spool (sinks then parse the JSON).
    accounted: Vec<Accounted>,
    include_raw_key: bool,
}

impl Batch {
    pub fn spooled(rows: Rows, accounted: Vec<Accounted>, include_raw_key: bool) -> Batch {
        debug_assert_eq!(rows.len(), accounted.len());
        Batch {
            rows,
            accounted,
            include_raw_key,
        }
    }

    pub fn read_back(rows: Rows) -> Batch {
        Batch {
            rows,
            accounted: Vec::new(),
            include_raw_key: false,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn last_id(&self) -> i64 {
        self.rows.id(self.rows.len() - 1)
    }
}

/// Rows `start..end` of a batch.
#[derive(Clone)]
pub struct Span {
    pub batch: Arc<Batch>,
    pub start: usize,
    pub end: usize,
}

/// One row as a sink reads it.
pub struct Row<'a> {
    pub id: i64,
    /// Exactly the spooled JSON (what a webhook sends).
    pub json: &'a str,
    /// The record itself when it is still in memory: no JSON parse.
    pub record: Option<Record<&'a str>>,
}

/// Every row of `spans`, in order.
pub fn rows(spans: &[Span]) -> impl Iterator<Item = Row<'_>> {
    spans.iter().flat_map(|span| {
        let b = &*span.batch;
        (span.start..span.end).map(move |i| Row {
            id: b.rows.id(i),
            json: b.rows.json(i),
            record: b.accounted.get(i).map(|a| a.record(b.include_raw_key)),
        })
    })
}

/// Rows in `spans`.
pub fn count(spans: &[Span]) -> usize {
    spans.iter().map(|s| s.end - s.start).sum()
}
