//! The simulated engine's scheduler, on when `--kv-blocks`, `--max-running` or
//! `--prefill-us-per-token` is given: one per process (one vLLM instance), shared by every worker
//! thread behind a mutex (a test tool: simple and correct beats lock-free).
//!
//! Owns admission and the time to first token. A generation waits, first come first served,
//! until it is at the head of the queue, fewer than `--max-running` run, and the KV cache
//! ([`KvCache`]) can hold its prompt; it then pins its cached prefix and prefills the rest. The
//! engine prefills one token at a time across all requests (prefill is compute-bound; batching
//! prompts does not make their sum cheaper), so a prefill starts when the previous one ends and
//! lasts `uncached tokens × --prefill-us-per-token`. Its first token is due then. The blocks stay
//! pinned until the response ends or the client leaves.
//!
//! Also owns the counters vLLM's `/metrics` reports for this: requests waiting, KV-cache usage and
//! the prefix-cache queries and hits in tokens. vLLM's `KVCacheManager.get_computed_blocks` adds
//! the request's prompt tokens to the queries and its cached tokens to the hits at each lookup;
//! here a request is looked up, and counted, once: when it is admitted.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::kv_cache::{render_prompt, Held, KvCache, PromptBlocks};
use super::openai::{bad_json, ApiError};
use super::MockOptions;

/// `--prefill-us-per-token` when not given: an 8B model on one datacenter GPU. The llm-d talk
/// at Red Hat Summit 2026 measured 4.3 s cold TTFT for a 10k-token prompt on Qwen3-32B
/// (430 µs/token); an 8B model does about a quarter of that work per token.
pub(super) const DEFAULT_PREFILL_US_PER_TOKEN: u64 = 100;

/// Per served model, what `/metrics` reports.
#[derive(Clone, Copy, Default)]
pub(super) struct ModelStats {
    pub waiting: u64,
    /// Prompt tokens looked up in the prefix cache (`vllm:prefix_cache_queries`).
    pub queries: u64,
    /// Prompt tokens found there (`vllm:prefix_cache_hits`).
    pub hits: u64,
}

pub(super) struct Scheduler {
    max_running: usize,
    prefill_ns_per_token: u64,
    block_tokens: usize,
    state: Mutex<State>,
}

struct State {
    cache: Option<KvCache>,
    running: usize,
    /// Waiting requests by ticket, oldest first, with the waker of each once it has polled.
    queue: VecDeque<(u64, Option<Waker>)>,
    tickets: u64,
    /// When the prefill admitted last ends.
    prefill_free_at: Instant,
    models: Vec<ModelStats>,
}

impl State {
    /// Lets the head of the queue try again (something it waits for may have changed).
    fn wake_head(&mut self) {
        if let Some(w) = self.queue.front_mut().and_then(|(_, w)| w.take()) {
            w.wake();
        }
    }
}

impl Scheduler {
    /// None when no scheduling flag is given: generations then start at once, as before.
    pub fn new(opts: &MockOptions) -> Option<Scheduler> {
        if opts.kv_blocks.is_none()
            && opts.max_running.is_none()
            && opts.prefill_us_per_token.is_none()
        {
            return None;
        }
        let us = opts
            .prefill_us_per_token
            .unwrap_or(DEFAULT_PREFILL_US_PER_TOKEN);
        Some(Scheduler {
            max_running: opts.max_running.unwrap_or(usize::MAX),
            prefill_ns_per_token: us.saturating_mul(1000),
            block_tokens: opts.block_tokens,
            state: Mutex::new(State {
                cache: opts.kv_blocks.map(|n| KvCache::new(n, opts.block_tokens)),
                running: 0,
                queue: VecDeque::new(),
                tickets: 0,
                prefill_free_at: Instant::now(),
                models: vec![ModelStats::default(); opts.models.len()],
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still consistent enough for a
        // simulator; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The prompt of an inference body for `model`, in blocks; vLLM's 400 when it could never
    /// fit in the KV cache.
    pub fn prompt(&self, model: usize, body: &[u8]) -> Result<PromptBlocks, ApiError> {
        let json: serde_json::Value = serde_json::from_slice(body).map_err(bad_json)?;
        let p = PromptBlocks::new(model, &render_prompt(&json), self.block_tokens);
        if let Some(cache) = &self.lock().cache {
            if cache.blocks_for(p.tokens) > cache.total_blocks() {
                return Err(ApiError::new(
                    400,
                    format!(
                        "This model's maximum context length is {} tokens. However, your request has {} input tokens. Please reduce the length of the input messages.",
                        cache.total_blocks() * self.block_tokens,
                        p.tokens
                    ),
                ));
            }
        }
        Ok(p)
    }

    /// Queues a generation; the future resolves once it is admitted. Dropping it first leaves
    /// the queue.
    pub fn admit(&'static self, model: usize, prompt: PromptBlocks) -> Admission {
        let mut st = self.lock();
        let ticket = st.tickets;
        st.tickets += 1;
        st.queue.push_back((ticket, None));
        st.models[model].waiting += 1;
        Admission {
            sched: self,
            ticket,
            model,
            prompt,
            admitted: false,
        }
    }

    /// KV-cache usage (None without `--kv-blocks`) and per-model counts.
    pub fn stats(&self) -> (Option<f64>, Vec<ModelStats>) {
        let st = self.lock();
        (st.cache.as_ref().map(KvCache::usage), st.models.clone())
    }
}

/// A generation waiting for admission.
pub(super) struct Admission {
    sched: &'static Scheduler,
    ticket: u64,
    model: usize,
    prompt: PromptBlocks,
    admitted: bool,
}

impl Future for Admission {
    type Output = Admitted;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Admitted> {
        let sched = self.sched;
        let mut st = sched.lock();
        let at_head = st.queue.front().map(|(t, _)| *t) == Some(self.ticket);
        let mut fits = at_head && st.running < sched.max_running;
        let mut held = None;
        let mut cached_blocks = 0;
        if fits {
            if let Some(cache) = &mut st.cache {
                match cache.allocate(&self.prompt) {
                    Some((h, n)) => (held, cached_blocks) = (Some(h), n),
                    None => fits = false,
                }
            }
        }
        if !fits {
            let ticket = self.ticket;
            if let Some((_, w)) = st.queue.iter_mut().find(|(t, _)| *t == ticket) {
                *w = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        st.queue.pop_front();
        st.running += 1;
        let tokens = self.prompt.tokens;
        let cached = (cached_blocks * sched.block_tokens) as u64;
        let caching = st.cache.is_some();
        let m = &mut st.models[self.model];
        m.waiting -= 1;
        if caching {
            m.queries += tokens;
            m.hits += cached;
        }
        let start = st.prefill_free_at.max(Instant::now());
        let prefill = sched.prefill_ns_per_token.saturating_mul(tokens - cached);
        let prefilled_at = start + Duration::from_nanos(prefill);
        st.prefill_free_at = prefilled_at;
        // The next in line may fit too.
        st.wake_head();
        drop(st);
        self.admitted = true;
        Poll::Ready(Admitted {
            sched,
            held,
            prefilled_at,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        let mut st = self.sched.lock();
        let ticket = self.ticket;
        st.queue.retain(|(t, _)| *t != ticket);
        st.models[self.model].waiting -= 1;
        st.wake_head();
    }
}

/// A running generation: holds its KV blocks and its running slot until dropped.
pub(super) struct Admitted {
    sched: &'static Scheduler,
    held: Option<Held>,
    /// When its prompt is prefilled and its first token can be sent.
    pub prefilled_at: Instant,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut st = self.sched.lock();
        st.running -= 1;
        if let (Some(cache), Some(held)) = (&mut st.cache, self.held.take()) {
            cache.release(held);
        }
        st.wake_head();
    }
}
