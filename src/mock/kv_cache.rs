//! One instance's KV cache with automatic prefix caching, block for block as vLLM's v1
//! `KVCacheManager` keeps it: a fixed pool of blocks of `block_tokens` tokens; each full block of
//! a prompt is named by a chain hash (the hash of everything up to and including it), so a block
//! is reused only when the whole prefix before it matches; blocks a running request holds are
//! pinned; a freed block keeps its hash and stays findable until the pool needs it again, least
//! recently freed first (LRU); usage is the share of blocks not free.
//!
//! The simulator has no tokenizer, so tokens are approximated from the rendered prompt
//! ([`render_prompt`]): 4 bytes make one token, the rule of thumb the simulator already uses for
//! `usage.prompt_tokens`; only the bytes' identity matters for prefix reuse.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::Value;

/// Bytes of rendered prompt per approximated token.
pub(super) const BYTES_PER_TOKEN: usize = 4;

/// A prompt as the cache sees it: its approximated length and the chain hashes of its full blocks.
#[derive(Debug, Clone)]
pub(super) struct PromptBlocks {
    pub tokens: u64,
    pub hashes: Vec<u64>,
}

impl PromptBlocks {
    /// Splits `rendered` into blocks of `block_tokens` tokens and hashes the full ones as a
    /// chain rooted at `model`, so two served models never share blocks.
    pub fn new(model: usize, rendered: &[u8], block_tokens: usize) -> PromptBlocks {
        let tokens = (rendered.len().div_ceil(BYTES_PER_TOKEN) as u64).max(1);
        let mut parent = model as u64;
        let hashes = rendered
            .chunks_exact(block_tokens * BYTES_PER_TOKEN)
            .map(|block| {
                let mut h = DefaultHasher::new();
                parent.hash(&mut h);
                block.hash(&mut h);
                parent = h.finish();
                parent
            })
            .collect();
        PromptBlocks { tokens, hashes }
    }
}

/// The prompt text of any inference body, in the order a chat template lays it out: the system
/// text (`system` of Messages, `instructions` of Responses), the tool definitions, then every
/// message (`messages`, `input`) or the `prompt` of a completion. Strings count as their text,
/// anything else as its compact JSON (object keys sorted), so a request that extends a
/// conversation renders to an extension of the earlier request's bytes.
pub(super) fn render_prompt(body: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |v: &Value| match v {
        Value::String(s) => out.extend_from_slice(s.as_bytes()),
        v => out.extend_from_slice(v.to_string().as_bytes()),
    };
    for key in ["system", "instructions", "tools"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            push(v);
        }
    }
    for key in ["messages", "input", "prompt"] {
        match body.get(key) {
            Some(Value::Array(items)) => items.iter().for_each(&mut push),
            Some(v) if !v.is_null() => push(v),
            _ => {}
        }
    }
    out
}

#[derive(Clone, Copy, Default)]
struct Block {
    /// The chain hash it holds, once it holds a full prompt block.
    hash: Option<u64>,
    /// Running requests that use it; 0 means free (and evictable).
    refs: u32,
    /// Its key in `KvCache::free` while free.
    freed_at: u64,
}

/// Blocks one admitted request holds, in prompt order; give them back with [`KvCache::release`].
#[derive(Debug)]
pub(super) struct Held {
    blocks: Vec<usize>,
}

pub(super) struct KvCache {
    block_tokens: usize,
    blocks: Vec<Block>,
    by_hash: HashMap<u64, usize>,
    /// Free blocks by the order they were freed; the first is evicted first.
    free: BTreeMap<u64, usize>,
    frees: u64,
}

impl KvCache {
    pub fn new(blocks: usize, block_tokens: usize) -> KvCache {
        KvCache {
            block_tokens,
            blocks: vec![Block::default(); blocks],
            by_hash: HashMap::new(),
            free: (0..blocks).map(|i| (i as u64, i)).collect(),
            frees: blocks as u64,
        }
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks a prompt of `tokens` tokens occupies while it runs.
    pub fn blocks_for(&self, tokens: u64) -> usize {
        (tokens as usize).div_ceil(self.block_tokens)
    }

    /// Leading blocks of `p` the cache holds. As in vLLM, at least the prompt's last token is
    /// always computed, so a prompt that is all cached still recomputes its last block.
    pub fn cached_blocks(&self, p: &PromptBlocks) -> usize {
        let usable = (p.tokens as usize - 1) / self.block_tokens;
        p.hashes[..usable.min(p.hashes.len())]
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// Pins the cached prefix of `p` and takes fresh blocks for the rest, evicting the least
    /// recently freed; returns them and the count of cached blocks, or None when too few blocks
    /// are free (the request must wait).
    pub fn allocate(&mut self, p: &PromptBlocks) -> Option<(Held, usize)> {
        let hit = self.cached_blocks(p);
        let needed = self.blocks_for(p.tokens);
        let hit_free = p.hashes[..hit]
            .iter()
            .filter(|h| self.blocks[self.by_hash[h]].refs == 0)
            .count();
        if self.free.len() - hit_free < needed - hit {
            return None;
        }
        let mut held = Vec::with_capacity(needed);
        for h in &p.hashes[..hit] {
            let i = self.by_hash[h];
            let b = &mut self.blocks[i];
            if b.refs == 0 {
                self.free.remove(&b.freed_at);
            }
            b.refs += 1;
            held.push(i);
        }
        for n in hit..needed {
            let (_, i) = self.free.pop_first().expect("free blocks counted above");
            let b = &mut self.blocks[i];
            if let Some(old) = b.hash.take() {
                self.by_hash.remove(&old);
            }
            b.refs = 1;
            // A full block whose hash another block already holds (the recomputed last block)
            // stays anonymous, as only one block per hash is findable.
            if let Some(&h) = p.hashes.get(n) {
                if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(h) {
                    e.insert(i);
                    b.hash = Some(h);
                }
            }
            held.push(i);
        }
        Some((Held { blocks: held }, hit))
    }

    /// Unpins a request's blocks, last block first, so a prompt's tail is evicted before its
    /// head (vLLM frees in reverse order for the same reason).
    pub fn release(&mut self, held: Held) {
        for &i in held.blocks.iter().rev() {
            let b = &mut self.blocks[i];
            b.refs -= 1;
            if b.refs == 0 {
                b.freed_at = self.frees;
                self.frees += 1;
                self.free.insert(b.freed_at, i);
            }
        }
    }

    /// `vllm:kv_cache_usage_perc`: the share of blocks running requests hold (0.0-1.0).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.free.len() as f64 / self.blocks.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt of `text` in blocks of 2 tokens (8 bytes).
    fn prompt(text: &str) -> PromptBlocks {
        PromptBlocks::new(0, text.as_bytes(), 2)
    }

    #[test]
    fn a_shared_prefix_hits_and_a_different_one_does_not() {
        let mut c = KvCache::new(16, 2);
        let a = prompt("system-prompt-00user-one");
        let (held, hit) = c.allocate(&a).unwrap();
        assert_eq!(hit, 0, "a cold cache");
        c.release(held);
        // Same first 16 bytes = 2 blocks of 8 bytes, then different.
        let b = prompt("system-prompt-00user-two");
        let (held, hit) = c.allocate(&b).unwrap();
        assert_eq!(hit, 2);
        c.release(held);
        let other = prompt("other-prompt-000user-one");
        assert_eq!(c.cached_blocks(&other), 0);
    }

    #[test]
    fn chain_hashes_match_only_whole_prefixes() {
        let mut c = KvCache::new(16, 2);
        let (held, _) = c.allocate(&prompt("AAAAAAAABBBBBBBBCCCCCCCCx")).unwrap();
        c.release(held);
        // Block 2 and 3 equal the cached ones, but block 1 differs: nothing is reusable.
        assert_eq!(c.cached_blocks(&prompt("ZZZZZZZZBBBBBBBBCCCCCCCCx")), 0);
        assert_eq!(c.cached_blocks(&prompt("AAAAAAAABBBBBBBBZZZZZZZZx")), 2);
        assert_eq!(c.cached_blocks(&prompt("AAAAAAAABBBBBBBBCCCCCCCCy")), 3);
        // Another model's identical prompt shares nothing.
        let other_model = PromptBlocks::new(1, b"AAAAAAAABBBBBBBBCCCCCCCCx", 2);
        assert_eq!(c.cached_blocks(&other_model), 0);
    }

    #[test]
    fn an_all_cached_prompt_recomputes_its_last_block() {
        let mut c = KvCache::new(8, 2);
        let p = prompt("AAAAAAAABBBBBBBB"); // exactly 2 blocks
        let (held, _) = c.allocate(&p).unwrap();
        c.release(held);
        let (held, hit) = c.allocate(&p).unwrap();
        assert_eq!(hit, 1, "the last token is always computed");
        c.release(held);
        assert_eq!(c.cached_blocks(&p), 1);
    }

    #[test]
    fn freed_blocks_are_evicted_least_recently_freed_first() {
        // 3 blocks: each 1-block prompt (+1 token) needs 2; only free blocks are evictable.
        let mut c = KvCache::new(4, 2);
        let a = prompt("AAAAAAAAa");
        let b = prompt("BBBBBBBBb");
        let (ha, _) = c.allocate(&a).unwrap();
        c.release(ha);
        let (hb, _) = c.allocate(&b).unwrap();
        c.release(hb);
        assert_eq!(c.cached_blocks(&a), 1);
        assert_eq!(c.cached_blocks(&b), 1);
        // Touch `a` again: now `b`'s blocks are the least recently freed.
        let (ha, hit) = c.allocate(&a).unwrap();
        assert_eq!(hit, 1);
        c.release(ha);
        let (hc, _) = c.allocate(&prompt("CCCCCCCCc")).unwrap();
        c.release(hc);
        assert_eq!(c.cached_blocks(&a), 1, "recently used prefix survives");
        assert_eq!(c.cached_blocks(&b), 0, "least recently used prefix evicted");
    }

    #[test]
    fn held_blocks_are_pinned_and_count_as_used() {
        let mut c = KvCache::new(4, 2);
        // 17 bytes: 5 tokens, 3 blocks, 2 of them full.
        let (held, _) = c.allocate(&prompt("AAAAAAAAaaaaaaaaa")).unwrap();
        assert_eq!(c.usage(), 0.75);
        assert!(
            c.allocate(&prompt("BBBBBBBBb")).is_none(),
            "one free block is not enough for a 2-block prompt"
        );
        // A second request on the same prefix shares the pinned block and takes the free one.
        let (shared, hit) = c.allocate(&prompt("AAAAAAAAzz")).unwrap();
        assert_eq!(hit, 1);
        assert_eq!(c.usage(), 1.0);
        c.release(shared);
        c.release(held);
        assert_eq!(c.usage(), 0.0);
        assert_eq!(
            c.cached_blocks(&prompt("AAAAAAAAzz")),
            1,
            "freed, still cached"
        );
    }

    #[test]
    fn rendering_extends_a_conversation_as_a_prefix() {
        let turn1 = serde_json::json!({
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        });
        let turn2 = serde_json::json!({
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}],
        });
        let (a, b) = (render_prompt(&turn1), render_prompt(&turn2));
        assert!(b.starts_with(&a));
        let responses =
            serde_json::json!({"instructions": "be brief", "input": "hi", "model": "m"});
        assert_eq!(render_prompt(&responses), b"be briefhi");
        let messages =
            serde_json::json!({"system": [{"type": "text", "text": "s"}], "messages": []});
        assert_eq!(
            render_prompt(&messages),
            br#"[{"text":"s","type":"text"}]"#.to_vec()
        );
    }
}
