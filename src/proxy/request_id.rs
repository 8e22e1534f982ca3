//! Request ids: the client's own `X-Request-Id` when it is sane (echoed and forwarded unchanged),
//! otherwise a new UUIDv7 (RFC 9562). UUIDs because inference servers validate the header:
//! servers built on starlette-context's defaults refuse any other form with a 400. Version 7 keeps
//! ids in time order, which billing tables index well. Owns only the id; no I/O.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest client id kept; a longer one is replaced by the gateway's own.
const MAX_CLIENT_ID: usize = 128;
/// `xxxxxxxx-xxxx-7xxx-yxxx-xxxxxxxxxxxx`.
const UUID_LEN: usize = 36;

/// A worker's id generator: a random part fixed per process and worker, and a counter.
pub struct RequestIds {
    /// 34 random bits (per process) above the worker's number in its low 8 bits.
    node: u64,
    next: Cell<u32>,
}

impl RequestIds {
    pub fn new(worker: usize) -> Self {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        RequestIds {
            node: ((random & ((1 << 34) - 1)) << 8) | (worker as u64 & 0xff),
            next: Cell::new(0),
        }
    }
}

pub struct RequestId {
    bytes: [u8; MAX_CLIENT_ID],
    len: usize,
    /// The client's `X-Request-Id`, not one the gateway made.
    pub from_client: bool,
}

impl RequestId {
    /// The client's id when it is 1 to 128 printable ASCII characters, else a new one.
    pub fn for_request(client: Option<&[u8]>, ids: &RequestIds) -> Self {
        match client {
            Some(v)
                if !v.is_empty()
                    && v.len() <= MAX_CLIENT_ID
                    && v.iter().all(|b| (0x21..0x7f).contains(b)) =>
            {
                let mut id = RequestId {
                    bytes: [0; MAX_CLIENT_ID],
                    len: v.len(),
                    from_client: true,
                };
                id.bytes[..v.len()].copy_from_slice(v);
                id
            }
            _ => RequestId::generate(ids),
        }
    }

    /// A new UUIDv7: 48 bits of Unix milliseconds, then the process's random bits, the worker
    /// and a per-worker counter where RFC 9562 puts random bits. Unique within a process by the
    /// counter (2^32 ids per worker per millisecond), across processes and instances by the
    /// 34 random bits.
    pub fn generate(ids: &RequestIds) -> Self {
        let n = ids.next.get();
        ids.next.set(n.wrapping_add(1));
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // rand_a (12 bits): the top of the node; rand_b (62 bits): the rest of it and the counter.
        let rand_a = (ids.node >> 30) & 0xfff;
        let rand_b = ((ids.node & ((1 << 30) - 1)) << 32) | u64::from(n);
        let high = (ms << 16) | (0x7 << 12) | rand_a;
        let low = (0b10 << 62) | rand_b;
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&high.to_be_bytes());
        raw[8..].copy_from_slice(&low.to_be_bytes());
        let mut id = RequestId {
            bytes: [0; MAX_CLIENT_ID],
            len: UUID_LEN,
            from_client: false,
        };
        let mut at = 0;
        for (i, group) in [&raw[..4], &raw[4..6], &raw[6..8], &raw[8..10], &raw[10..]]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                id.bytes[at] = b'-';
                at += 1;
            }
            let end = at + 2 * group.len();
            // Cannot fail: the slice is exactly twice the group's length.
            let _ = hex::encode_to_slice(group, &mut id.bytes[at..end]);
            at = end;
        }
        id
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Ids are printable ASCII by construction, so this never falls back.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("-")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_uuid_v7(s: &str) -> bool {
        let groups: Vec<&str> = s.split('-').collect();
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && s.bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && groups[2].starts_with('7')
            && matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b')
    }

    #[test]
    fn generated_ids_are_distinct_time_ordered_uuid_v7() {
        let ids = RequestIds::new(3);
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let a = RequestId::generate(&ids);
        let b = RequestId::generate(&ids);
        assert!(is_uuid_v7(a.as_str()), "{}", a.as_str());
        assert!(!a.from_client);
        assert_ne!(a.as_str(), b.as_str());
        let ms = u64::from_str_radix(&a.as_str()[..13].replace('-', ""), 16).unwrap();
        assert!(ms >= before && ms < before + 60_000, "{ms} vs {before}");
        // Later milliseconds sort later; within one, the counter orders them.
        assert!(a.as_str() < b.as_str(), "{} {}", a.as_str(), b.as_str());
    }

    #[test]
    fn workers_and_processes_do_not_collide() {
        let w0 = RequestIds::new(0);
        let w1 = RequestIds::new(1);
        let a = RequestId::generate(&w0);
        let b = RequestId::generate(&w1);
        assert_ne!(a.as_str()[14..], b.as_str()[14..]);
    }

    #[test]
    fn a_sane_client_id_is_kept_and_others_replaced() {
        let ids = RequestIds::new(0);
        let kept = RequestId::for_request(Some(b"trace-42"), &ids);
        assert_eq!(kept.as_str(), "trace-42");
        assert!(kept.from_client);
        for bad in [&b""[..], b"has space", b"tab\there", &[b'x'; 129]] {
            let id = RequestId::for_request(Some(bad), &ids);
            assert!(!id.from_client && is_uuid_v7(id.as_str()), "{bad:?}");
        }
        let long = [b'y'; 128];
        assert_eq!(RequestId::for_request(Some(&long), &ids).as_bytes(), long);
    }
}
