//! The prefix index of `cache_aware` routing: which prompt blocks each backend was sent, so that a
//! prompt goes where its prefix is probably still in the KV cache. Owns cutting a prompt into
//! chain-hashed blocks, one backend's table of blocks, and sgl-router's decision rule between
//! the longest match and the least load. It must not read HTTP or JSON (the proxy hands it the
//! prompt's raw byte pieces), judge a backend's availability (the balancer does), or allocate per
//! request.
//!
//! Across cores: all workers read and write the same per-backend tables through relaxed atomics,
//! with no lock. A table is set-associative, like a CPU cache: a block hash selects a bucket of 8
//! slots on one cache line, each slot holding the block's tag (40 bits) and the 64 ms tick it was
//! last sent (24 bits). A lookup is one line's loads; recording a block replaces the bucket's
//! oldest slot (LRU within the bucket); recording a block already stamped in this tick writes
//! nothing, so the shared system prompt every request repeats does not bounce its line between
//! cores. Two cores recording into one bucket at once can lose one entry or keep a block twice: a
//! later miss or a wasted slot, never more than a worse guess. A lock (even sharded, even try_lock)
//! would put a read-modify-write on a shared line into every request and the radix tree
//! sgl-router keeps needs one; per-core indexes would not see where a conversation's previous turn
//! went, since each connection lands on whichever core accepted it.
//!
//! The index is fed only by the gateway's own picks; another source of "which blocks a backend
//! holds" (vLLM's KV-cache events) could call [`BlockIndex::record`] and [`BlockIndex::clear`].

use std::sync::atomic::{AtomicU64, Ordering};

use super::hash;
use crate::config::CacheAware;

/// Slots per bucket: 8 × 8 bytes, one cache line.
const WAYS: usize = 8;
const TICK_BITS: u32 = 24;
const TICK_MASK: u64 = (1 << TICK_BITS) - 1;

/// The tick of the LRU stamps: 64 ms, so 24 bits wrap after 12 days.
pub fn tick(now_ms: u64) -> u64 {
    (now_ms >> 6) & TICK_MASK
}

/// Pushes onto `out` the chain hash of each full block of `block_bytes` in `pieces` (the prompt's
/// raw JSON values in order, read as one stream). A block's hash covers the model and every byte
/// up to the block's end, so two prompts share a block hash only where they share everything
/// before it. A last, partial block is left out: the next turn of the conversation extends it.
/// `block_bytes` is a multiple of 8.
pub fn chain(model: &[u8], pieces: &[&[u8]], block_bytes: usize, out: &mut Vec<u64>) {
    let start = hash::bytes(0, model);
    let mut chain = Chain {
        lanes: [start, hash::finish(start)],
        words: 0,
        words_per_block: block_bytes / 8,
        out,
    };
    // Bytes of a word split across two pieces.
    let mut carry = [0u8; 8];
    let mut carried = 0;
    for &piece in pieces {
        let mut rest = piece;
        if carried > 0 {
            let take = rest.len().min(8 - carried);
            carry[carried..carried + take].copy_from_slice(&rest[..take]);
            carried += take;
            rest = &rest[take..];
            if carried < 8 {
                continue;
            }
            chain.word(u64::from_le_bytes(carry));
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            chain.word(u64::from_le_bytes(w.try_into().unwrap_or_default()));
        }
        let tail = words.remainder();
        carry[..tail.len()].copy_from_slice(tail);
        carried = tail.len();
    }
}

/// Two hash states taking alternate words, so their multiplications overlap in the CPU.
struct Chain<'a> {
    lanes: [u64; 2],
    words: usize,
    words_per_block: usize,
    out: &'a mut Vec<u64>,
}

impl Chain<'_> {
    #[inline]
    fn word(&mut self, w: u64) {
        let lane = &mut self.lanes[self.words & 1];
        *lane = hash::absorb(*lane, w);
        self.words += 1;
        if self.words == self.words_per_block {
            self.words = 0;
            let [a, b] = self.lanes;
            self.out.push(hash::finish(hash::absorb(a, b)));
        }
    }
}

#[repr(align(64))]
struct Bucket([AtomicU64; WAYS]);

/// One backend's blocks: about `capacity` of them, the least recently sent evicted first.
pub struct BlockIndex {
    /// A power of two of buckets; none when the balancer is not `cache_aware`.
    buckets: Box<[Bucket]>,
}

impl std::fmt::Debug for BlockIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockIndex({} blocks)", self.buckets.len() * WAYS)
    }
}

/// A slot's tag for `block`: the hash's high 40 bits (the low bits chose the bucket), never 0,
/// which marks an empty slot.
fn tag(block: u64) -> u64 {
    ((block >> TICK_BITS) | 1) << TICK_BITS
}

impl BlockIndex {
    pub fn new(capacity: usize) -> Self {
        let buckets = if capacity == 0 {
            0
        } else {
            capacity.div_ceil(WAYS).next_power_of_two()
        };
        BlockIndex {
            buckets: (0..buckets)
                .map(|_| Bucket(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }

    fn bucket(&self, block: u64) -> &Bucket {
        &self.buckets[block as usize & (self.buckets.len() - 1)]
    }

    fn holds(&self, block: u64) -> bool {
        let tag = tag(block);
        self.bucket(block)
            .0
            .iter()
            .any(|slot| slot.load(Ordering::Relaxed) & !TICK_MASK == tag)
    }

    /// How many leading `blocks` this backend holds.
    pub fn matched(&self, blocks: &[u64]) -> usize {
        if self.buckets.is_empty() {
            return 0;
        }
        blocks.iter().take_while(|&&b| self.holds(b)).count()
    }

    /// Notes that `blocks` were sent to this backend at `tick`.
    pub fn record(&self, blocks: &[u64], tick: u64) {
        if self.buckets.is_empty() {
            return;
        }
        for &block in blocks {
            let tag = tag(block);
            let entry = tag | tick;
            let slots = &self.bucket(block).0;
            let mut oldest = 0;
            let mut oldest_age = 0;
            let mut found = false;
            for (i, slot) in slots.iter().enumerate() {
                let was = slot.load(Ordering::Relaxed);
                if was & !TICK_MASK == tag {
                    if was != entry {
                        slot.store(entry, Ordering::Relaxed);
                    }
                    found = true;
                    break;
                }
                // Empty slots are the oldest of all.
                let age = if was == 0 {
                    u64::MAX
                } else {
                    tick.wrapping_sub(was) & TICK_MASK
                };
                if age > oldest_age || i == 0 {
                    (oldest, oldest_age) = (i, age);
                }
            }
            if !found {
                slots[oldest].store(entry, Ordering::Relaxed);
            }
        }
    }

    /// Forgets every block: the backend was ejected or failed its health checks, so it may have
    /// restarted with an empty cache.
    pub fn clear(&self) {
        for bucket in self.buckets.iter() {
            for slot in &bucket.0 {
                slot.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Why `cache_aware` chose a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It held the longest prefix, covering at least `threshold` of the prompt.
    PrefixMatch,
    /// Load was imbalanced: the least loaded won, matches aside.
    LoadGuard,
    /// No backend held enough of the prompt: the least loaded won.
    NoMatch,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::PrefixMatch, Reason::LoadGuard, Reason::NoMatch];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PrefixMatch => "prefix_match",
            Reason::LoadGuard => "load_guard",
            Reason::NoMatch => "no_match",
        }
    }
}

/// What `cache_aware` decided for one pick, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixRoute {
    pub reason: Reason,
    /// The prompt's full blocks, and how many leading ones the chosen backend held.
    pub blocks: u32,
    pub matched: u32,
}

/// sgl-router's guard: load is imbalanced when the most loaded candidate exceeds the least loaded
/// both by `balance_abs` and by the factor `balance_rel`.
pub fn imbalanced(min: f64, max: f64, tuning: &CacheAware) -> bool {
    max - min > tuning.balance_abs && max > tuning.balance_rel * min
}

/// Whether a longest match of `matched` of `blocks` is worth more than the load.
pub fn match_wins(matched: usize, blocks: usize, tuning: &CacheAware) -> bool {
    matched > 0 && matched as f64 >= tuning.threshold * blocks as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning() -> CacheAware {
        CacheAware {
            block_bytes: 16,
            index_blocks: 64,
            threshold: 0.5,
            balance_abs: 4.0,
            balance_rel: 1.5,
        }
    }

    fn blocks(model: &str, pieces: &[&[u8]], block_bytes: usize) -> Vec<u64> {
        let mut out = Vec::new();
        chain(model.as_bytes(), pieces, block_bytes, &mut out);
        out
    }

    #[test]
    fn a_block_hash_covers_everything_before_it() {
        let a = blocks("m", &[b"0123456789abcdef", b"ghijklmnopqrstuv"], 16);
        assert_eq!(a.len(), 2);
        // Same second block, different first: the chain differs from the first block on.
        let b = blocks("m", &[b"X123456789abcdef", b"ghijklmnopqrstuv"], 16);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // Same first block, different second: only the second differs.
        let c = blocks("m", &[b"0123456789abcdef", b"ghijklmnopqrstuX"], 16);
        assert_eq!(a[0], c[0]);
        assert_ne!(a[1], c[1]);
    }

    #[test]
    fn pieces_are_one_stream_and_partial_blocks_are_left_out() {
        let whole = blocks("m", &[b"0123456789abcdefghijklmnopqrstuvwxyz"], 16);
        let split = blocks(
            "m",
            &[b"012", b"3456789abcdefghij", b"", b"klmnopqrstuvwxyz"],
            16,
        );
        assert_eq!(whole.len(), 2);
        assert_eq!(whole, split);
        assert!(blocks("m", &[b"short"], 16).is_empty());
        assert!(blocks("m", &[], 16).is_empty());
    }

    #[test]
    fn the_model_scopes_the_blocks() {
        let text: &[u8] = b"the same system prompt, twice...";
        assert_ne!(blocks("a", &[text], 16), blocks("b", &[text], 16));
        let index = BlockIndex::new(64);
        index.record(&blocks("a", &[text], 16), 1);
        assert_eq!(index.matched(&blocks("a", &[text], 16)), 2);
        assert_eq!(index.matched(&blocks("b", &[text], 16)), 0);
    }

    #[test]
    fn a_match_counts_leading_blocks_only() {
        let index = BlockIndex::new(64);
        let turn1 = blocks("m", &[b"system prompt 16user turn one 16"], 16);
        index.record(&turn1, 1);
        let turn2 = blocks(
            "m",
            &[b"system prompt 16user turn one 16assistant said 16user turn two 16"],
            16,
        );
        assert_eq!(index.matched(&turn2), 2);
        // A block the index holds, after one it does not, does not count.
        let mut gap = turn2.clone();
        gap[0] = 12345;
        assert_eq!(index.matched(&gap), 0);
    }

    #[test]
    fn the_least_recently_sent_block_is_evicted_first() {
        // One bucket of 8 slots: every block lands in it.
        let index = BlockIndex::new(8);
        assert_eq!(index.buckets.len(), 1);
        let block = |i: u64| i << 40;
        for i in 0..8 {
            index.record(&[block(i)], 10 + i);
        }
        // Block 0 is sent again, so block 1 is now the oldest.
        index.record(&[block(0)], 20);
        index.record(&[block(8)], 21);
        assert_eq!(index.matched(&[block(0)]), 1);
        assert_eq!(index.matched(&[block(1)]), 0);
        assert!((2..=8).all(|i| index.matched(&[block(i)]) == 1));
        index.clear();
        assert!((0..=8).all(|i| index.matched(&[block(i)]) == 0));
    }

    #[test]
    fn an_index_holds_about_its_capacity() {
        let index = BlockIndex::new(4096);
        let all: Vec<u64> = (0..4096u64).map(|i| hash::bytes(i, b"block")).collect();
        for (t, b) in all.iter().enumerate() {
            index.record(std::slice::from_ref(b), t as u64);
        }
        let held = all
            .iter()
            .filter(|b| index.matched(std::slice::from_ref(b)) == 1)
            .count();
        // Random hashes fill buckets unevenly: most, not all, of a full load stays.
        assert!(held > 4096 * 3 / 4, "{held}");
        // The most recent blocks are all there.
        assert!(all[4096 - 64..].iter().all(|b| index.matched(&[*b]) == 1));
    }

    #[test]
    fn an_unused_index_holds_nothing_and_allocates_nothing() {
        let index = BlockIndex::new(0);
        index.record(&[1, 2, 3], 1);
        assert_eq!(index.matched(&[1, 2, 3]), 0);
    }

    /// Three backends that are never connected to, balanced by `cache_aware` in 16-byte blocks.
    fn upstreams() -> crate::upstream::WorkerUpstreams {
        let yaml = "backends: [{url: 'http://127.0.0.1:1'}, {url: 'http://127.0.0.1:2'}, \
            {url: 'http://127.0.0.1:3'}]\nload_balance: cache_aware\nrouting: {cache_aware: \
            {block_bytes: 16, index_blocks: 64, threshold: 0.4, balance_abs: 2, balance_rel: 1.5}}";
        let config = crate::config::parse(yaml, crate::config::Format::Yaml).unwrap();
        crate::upstream::WorkerUpstreams::new(
            super::super::Backends::new(&config).unwrap(),
            &config,
            0,
        )
    }

    fn pick<'a>(
        up: &crate::upstream::WorkerUpstreams,
        model: &'a str,
        prompt: &'a [&'a [u8]],
        tried: u64,
    ) -> crate::upstream::InFlight {
        let req = crate::upstream::PickRequest {
            model: Some(model),
            prompt,
            tried,
            ..Default::default()
        };
        up.pick(&req).unwrap()
    }

    #[test]
    fn a_conversation_stays_where_its_prefix_is_until_load_is_imbalanced() {
        let up = upstreams();
        let turn1: &[&[u8]] = &[b"[{\"role\":\"user\",\"content\":\"tell me a story\"}"];
        let first = pick(&up, "m", turn1, 0);
        let home = first.index;
        let route = first.route.unwrap();
        assert_eq!(
            (route.reason, route.blocks, route.matched),
            (Reason::NoMatch, 2, 0)
        );
        drop(first);

        let turn2: &[&[u8]] = &[
            b"[{\"role\":\"user\",\"content\":\"tell me a story\"}",
            b",{\"role\":\"assistant\",\"content\":\"once\"}]",
        ];
        let second = pick(&up, "m", turn2, 0);
        let route = second.route.unwrap();
        assert_eq!(second.index, home);
        assert_eq!(
            (route.reason, route.blocks, route.matched),
            (Reason::PrefixMatch, 5, 2)
        );

        // The same text for another model matches nothing.
        let other = pick(&up, "other", turn2, 0);
        assert_eq!(other.route.unwrap().reason, Reason::NoMatch);
        drop(other);

        // Three in flight at home, none elsewhere: past balance_abs and balance_rel.
        let busy: Vec<_> = (0..2).map(|_| pick(&up, "m", turn2, 0)).collect();
        assert!(busy.iter().all(|f| f.index == home));
        let guarded = pick(&up, "m", turn2, 0);
        assert_eq!(guarded.route.unwrap().reason, Reason::LoadGuard);
        assert_ne!(guarded.index, home);
        drop((second, busy, guarded));

        // A retry avoids the backend it tried, match or not.
        let retried = pick(&up, "m", turn2, 1 << home);
        assert_ne!(retried.index, home);
    }

    #[test]
    fn a_prompt_sent_without_a_pick_is_recorded_where_it_went() {
        let up = upstreams();
        let turn1: &[&[u8]] = &[b"[{\"role\":\"user\",\"content\":\"tell me a story\"}"];
        // As after a wait: the slot handed over was on backend 2.
        let req = crate::upstream::PickRequest {
            model: Some("m"),
            prompt: turn1,
            ..Default::default()
        };
        up.record_prompt(&req, 2);
        let next = pick(&up, "m", turn1, 0);
        assert_eq!(next.index, 2);
        assert_eq!(next.route.unwrap().reason, Reason::PrefixMatch);
    }

    #[test]
    fn an_ejected_backend_forgets_its_blocks() {
        let up = upstreams();
        let prompt: &[&[u8]] = &[b"a system prompt long enough for two blocks"];
        let home = pick(&up, "m", prompt, 0).index;
        let blocks = blocks("m", prompt, 16);
        assert_eq!(up.backend(home).blocks.matched(&blocks), 2);
        for _ in 0..up.health.max_failures {
            up.backend(home)
                .record(super::super::Passive::Failed, &up.health);
        }
        assert_eq!(up.backend(home).blocks.matched(&blocks), 0);
        assert_ne!(pick(&up, "m", prompt, 0).index, home);
    }

    #[test]
    fn load_is_imbalanced_only_past_both_thresholds() {
        let t = tuning();
        // Far apart in absolute terms and relative terms.
        assert!(imbalanced(2.0, 10.0, &t));
        // Within balance_abs.
        assert!(!imbalanced(2.0, 6.0, &t));
        // Past balance_abs, but within balance_rel.
        assert!(!imbalanced(20.0, 29.0, &t));
        assert!(imbalanced(0.0, 5.0, &t));
    }

    #[test]
    fn a_match_wins_from_its_share_of_the_prompt() {
        let t = tuning();
        assert!(match_wins(5, 10, &t));
        assert!(!match_wins(4, 10, &t));
        assert!(!match_wins(0, 0, &t));
        let eager = CacheAware {
            threshold: 0.0,
            ..tuning()
        };
        assert!(match_wins(1, 100, &eager));
        assert!(!match_wins(0, 100, &eager));
    }
}
