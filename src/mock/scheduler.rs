//! The simulated engine's scheduler, on when `--kv-blocks`, `--max-running`,
//! `--prefill-us-per-token` or a priority flag is given: one per process (one vLLM instance),
//! shared by every worker thread behind a mutex (a test tool: simple and correct beats lock-free).
//!
//! Owns admission, preemption and the time to first token. A generation waits, first come first
//! served or by priority (below), until it is at the head of the queue, fewer than
//! `--max-running` run, and the KV cache ([`KvCache`]) can hold its prompt; it then pins its cached prefix and prefills the rest. The
//! engine prefills one token at a time across all requests (prefill is compute-bound; batching
//! prompts does not make their sum cheaper), so a prefill starts when the previous one ends and
//! lasts `uncached tokens × --prefill-us-per-token`. Its first token is due then. The blocks stay
//! pinned until the response ends or the client leaves.
//!
//! Priority scheduling models two engines. vLLM V1 (`--scheduling-policy priority`) orders the
//! queue by (priority, arrival), lower value first, and does not preempt for an arrival: its
//! waiting loop stops once `max_num_seqs` run. It does preempt on KV pressure while decoding,
//! which this model has none of (a prompt's blocks are all taken at admission). SGLang
//! (`--enable-priority-scheduling`) orders likewise, higher value first by default, and its
//! `preempt_to_schedule` lets a head of the queue held back by the running limit evict the worst
//! running generation (the latest among equals) when it beats it by more than the threshold.
//! Preemption recomputes, as both engines do: the victim's slot and blocks are freed at once
//! (the blocks stay cached), it queues again at its original place, and when readmitted it pays
//! the prefill of its uncached prompt plus the tokens it had generated.
//!
//! Also owns the counters vLLM's `/metrics` reports for this: requests waiting, preemptions,
//! KV-cache usage and the prefix-cache queries and hits in tokens. vLLM's `KVCacheManager.get_computed_blocks` adds
//! the request's prompt tokens to the queries and its cached tokens to the hits at each lookup;
//! here a request is looked up, and counted, when it is admitted (again after a preemption).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::kv_cache::{render_prompt, Held, KvCache, PromptBlocks};
use super::openai::{bad_json, ApiError};
use super::{MockOptions, SchedulingPolicy};

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
    /// Running generations sent back to the queue (`vllm:num_preemptions`).
    pub preemptions: u64,
}

/// How the queue is ordered and whether an arrival preempts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Policy {
    Fcfs,
    /// vLLM V1's `priority`: lower value first, no preemption for an arrival.
    Vllm,
    /// SGLang's priority scheduling, with its preemption threshold.
    Sglang {
        low_first: bool,
        threshold: i64,
    },
}

pub(super) struct Scheduler {
    max_running: usize,
    prefill_ns_per_token: u64,
    block_tokens: usize,
    policy: Policy,
    state: Mutex<State>,
}

/// A queued generation: new, or preempted and waiting to resume.
struct Waiting {
    /// Sort key: lower runs first (the priority, negated where higher values are more urgent).
    rank: i64,
    /// Arrival order, kept across preemptions.
    ticket: u64,
    waker: Option<Waker>,
}

/// A generation holding a running slot.
struct Run {
    rank: i64,
    ticket: u64,
    model: usize,
    held: Option<Held>,
    /// Set when preempted; None where nothing preempts.
    preempted: Option<Arc<AtomicBool>>,
}

struct State {
    cache: Option<KvCache>,
    running: Vec<Run>,
    /// Waiting generations by (rank, ticket), with the waker of each once it has polled.
    queue: VecDeque<Waiting>,
    tickets: u64,
    /// When the prefill admitted last ends.
    prefill_free_at: Instant,
    models: Vec<ModelStats>,
}

impl State {
    /// Lets the head of the queue try again (something it waits for may have changed).
    fn wake_head(&mut self) {
        if let Some(w) = self.queue.front_mut().and_then(|w| w.waker.take()) {
            w.wake();
        }
    }

    /// Queues in (rank, arrival) order; under fcfs every rank is 0, so this appends.
    fn enqueue(&mut self, rank: i64, ticket: u64) {
        let at = self
            .queue
            .partition_point(|w| (w.rank, w.ticket) < (rank, ticket));
        self.queue.insert(
            at,
            Waiting {
                rank,
                ticket,
                waker: None,
            },
        );
    }

    /// Frees the slot and blocks of running generation `i` and queues it again.
    fn preempt(&mut self, i: usize) {
        let run = self.running.swap_remove(i);
        if let (Some(cache), Some(held)) = (&mut self.cache, run.held) {
            cache.release(held);
        }
        if let Some(flag) = &run.preempted {
            flag.store(true, Ordering::Release);
        }
        self.enqueue(run.rank, run.ticket);
        let m = &mut self.models[run.model];
        m.waiting += 1;
        m.preemptions += 1;
    }
}

impl Scheduler {
    /// None when no scheduling flag is given: generations then start at once, as before.
    pub fn new(opts: &MockOptions) -> Option<Scheduler> {
        if opts.kv_blocks.is_none()
            && opts.max_running.is_none()
            && opts.prefill_us_per_token.is_none()
            && !opts.priority_scheduling()
        {
            return None;
        }
        let us = opts
            .prefill_us_per_token
            .unwrap_or(DEFAULT_PREFILL_US_PER_TOKEN);
        let policy = if opts.enable_priority_scheduling {
            Policy::Sglang {
                low_first: opts.schedule_low_priority_values_first,
                threshold: opts.priority_scheduling_preemption_threshold,
            }
        } else if opts.scheduling_policy == SchedulingPolicy::Priority {
            Policy::Vllm
        } else {
            Policy::Fcfs
        };
        Some(Scheduler {
            max_running: opts.max_running.unwrap_or(usize::MAX),
            prefill_ns_per_token: us.saturating_mul(1000),
            block_tokens: opts.block_tokens,
            policy,
            state: Mutex::new(State {
                cache: opts.kv_blocks.map(|n| KvCache::new(n, opts.block_tokens)),
                running: Vec::new(),
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

    /// Whether a priority policy is on (the metrics then report preemptions).
    pub fn prioritizes(&self) -> bool {
        self.policy != Policy::Fcfs
    }

    /// Whether an arrival may preempt a running generation (SGLang's policy).
    pub fn preempts_on_arrival(&self) -> bool {
        matches!(self.policy, Policy::Sglang { .. })
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

    /// Queues a generation with its request's `priority`; [`Slot::start`] waits for its
    /// admission. Dropping the slot leaves the queue, or frees what it holds.
    pub fn admit(&'static self, model: usize, prompt: PromptBlocks, priority: i64) -> Slot {
        let rank = match self.policy {
            Policy::Fcfs => 0,
            Policy::Vllm
            | Policy::Sglang {
                low_first: true, ..
            } => priority,
            Policy::Sglang {
                low_first: false, ..
            } => priority.saturating_neg(),
        };
        let preempted =
            matches!(self.policy, Policy::Sglang { .. }).then(|| Arc::new(AtomicBool::new(false)));
        let mut st = self.lock();
        let ticket = st.tickets;
        st.tickets += 1;
        st.enqueue(rank, ticket);
        st.models[model].waiting += 1;
        Slot {
            sched: self,
            ticket,
            rank,
            model,
            prompt,
            preempted,
        }
    }

    /// KV-cache usage (None without `--kv-blocks`) and per-model counts.
    pub fn stats(&self) -> (Option<f64>, Vec<ModelStats>) {
        let st = self.lock();
        (st.cache.as_ref().map(KvCache::usage), st.models.clone())
    }

    /// SGLang's preemption for a head of rank `rank` held back by the running limit: the worst
    /// running generation (latest among equals) goes back to the queue if the head beats it by
    /// more than the threshold. True when a slot was freed.
    fn make_room(&self, st: &mut State, rank: i64) -> bool {
        let Policy::Sglang { threshold, .. } = self.policy else {
            return false;
        };
        let Some((i, worst)) = st
            .running
            .iter()
            .enumerate()
            .max_by_key(|(_, r)| (r.rank, r.ticket))
        else {
            return false;
        };
        if i128::from(worst.rank) - i128::from(rank) <= i128::from(threshold) {
            return false;
        }
        st.preempt(i);
        true
    }
}

/// A generation from its arrival to its end: queued, running, or preempted and queued again.
pub(super) struct Slot {
    sched: &'static Scheduler,
    ticket: u64,
    rank: i64,
    model: usize,
    prompt: PromptBlocks,
    /// Shared with its running entry; None under policies that never preempt, so the per-token
    /// check costs nothing there.
    preempted: Option<Arc<AtomicBool>>,
}

impl Slot {
    /// Waits until admitted (first, or again after a preemption, having generated `generated`
    /// tokens to recompute); resolves to when its prefill ends and its next token can be sent.
    pub fn start(&mut self, generated: u64) -> Start<'_> {
        Start {
            slot: self,
            generated,
        }
    }

    /// True when preempted since its last admission: stop before the next token and `start`
    /// again.
    pub fn preempted(&self) -> bool {
        self.preempted
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Acquire))
    }
}

/// [`Slot::start`]'s future.
pub(super) struct Start<'a> {
    slot: &'a mut Slot,
    generated: u64,
}

impl Future for Start<'_> {
    type Output = Instant;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Instant> {
        let this = self.get_mut();
        let slot = &*this.slot;
        let sched = slot.sched;
        let mut st = sched.lock();
        let at_head = st.queue.front().map(|w| w.ticket) == Some(slot.ticket);
        // Only the running limit preempts: a prompt the KV cache cannot hold yet simply waits
        // for blocks to be released.
        let mut fits = at_head
            && (st.running.len() < sched.max_running || sched.make_room(&mut st, slot.rank));
        let mut held = None;
        let mut cached_blocks = 0;
        if fits {
            if let Some(cache) = &mut st.cache {
                match cache.allocate(&slot.prompt) {
                    Some((h, n)) => (held, cached_blocks) = (Some(h), n),
                    None => fits = false,
                }
            }
        }
        if !fits {
            let ticket = slot.ticket;
            if let Some(w) = st.queue.iter_mut().find(|w| w.ticket == ticket) {
                w.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        st.queue.pop_front();
        if let Some(flag) = &slot.preempted {
            flag.store(false, Ordering::Release);
        }
        st.running.push(Run {
            rank: slot.rank,
            ticket: slot.ticket,
            model: slot.model,
            held,
            preempted: slot.preempted.clone(),
        });
        let tokens = slot.prompt.tokens;
        let cached = (cached_blocks * sched.block_tokens) as u64;
        let caching = st.cache.is_some();
        let m = &mut st.models[slot.model];
        m.waiting -= 1;
        if caching {
            m.queries += tokens;
            m.hits += cached;
        }
        let start = st.prefill_free_at.max(Instant::now());
        let prefill = sched
            .prefill_ns_per_token
            .saturating_mul(tokens - cached + this.generated);
        let prefilled_at = start + Duration::from_nanos(prefill);
        st.prefill_free_at = prefilled_at;
        // The next in line may fit too.
        st.wake_head();
        Poll::Ready(prefilled_at)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.sched.lock();
        let ticket = self.ticket;
        if let Some(i) = st.running.iter().position(|r| r.ticket == ticket) {
            let run = st.running.swap_remove(i);
            if let (Some(cache), Some(held)) = (&mut st.cache, run.held) {
                cache.release(held);
            }
        } else if let Some(i) = st.queue.iter().position(|w| w.ticket == ticket) {
            st.queue.remove(i);
            st.models[self.model].waiting -= 1;
        }
        st.wake_head();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: MockOptions,
    }

    fn scheduler(args: &[&str]) -> &'static Scheduler {
        let cli = Cli::parse_from(std::iter::once("mock-llm").chain(args.iter().copied()));
        Box::leak(Box::new(Scheduler::new(&cli.opts).expect("scheduler on")))
    }

    fn queue(s: &'static Scheduler, priority: i64) -> Slot {
        s.admit(0, PromptBlocks::new(0, b"prompt!!", 16), priority)
    }

    /// Polls the slot's admission once: when it would start now, when its prefill ends.
    fn start(slot: &mut Slot, generated: u64) -> Option<Instant> {
        let mut cx = Context::from_waker(Waker::noop());
        match std::pin::pin!(slot.start(generated)).poll(&mut cx) {
            Poll::Ready(at) => Some(at),
            Poll::Pending => None,
        }
    }

    fn stats(s: &Scheduler) -> ModelStats {
        s.stats().1[0]
    }

    #[test]
    fn sglang_preempts_only_above_the_threshold_and_requeues_by_priority() {
        let s = scheduler(&["--enable-priority-scheduling", "--max-running", "1"]);
        let mut low = queue(s, 0);
        assert!(start(&mut low, 0).is_some());
        let mut ten = queue(s, 10);
        assert!(start(&mut ten, 0).is_none(), "10 over 0 is not above 10");
        assert!(!low.preempted());
        let mut urgent = queue(s, 11);
        assert!(start(&mut urgent, 0).is_some(), "11 over 0 is");
        assert!(low.preempted());
        assert_eq!((stats(s).waiting, stats(s).preemptions), (2, 1));
        drop(urgent);
        // Back in its place by priority: behind 10.
        assert!(start(&mut low, 3).is_none());
        assert!(start(&mut ten, 0).is_some());
        drop(ten);
        assert!(start(&mut low, 3).is_some());
        assert!(!low.preempted());
        assert_eq!(stats(s).waiting, 0);
    }

    #[test]
    fn sglang_preempts_the_latest_of_the_worst_and_low_values_first_when_asked() {
        let s = scheduler(&[
            "--enable-priority-scheduling",
            "--schedule-low-priority-values-first",
            "--priority-scheduling-preemption-threshold",
            "0",
            "--max-running",
            "2",
        ]);
        let (mut a, mut b) = (queue(s, 5), queue(s, 5));
        assert!(start(&mut a, 0).is_some() && start(&mut b, 0).is_some());
        let mut later = queue(s, 5);
        assert!(start(&mut later, 0).is_none(), "equal is not above 0");
        let mut urgent = queue(s, 4);
        assert!(start(&mut urgent, 0).is_some());
        assert!(b.preempted() && !a.preempted());
    }

    #[test]
    fn vllm_orders_by_lower_value_without_preempting() {
        let s = scheduler(&["--scheduling-policy", "priority", "--max-running", "1"]);
        let mut running = queue(s, 9);
        assert!(start(&mut running, 0).is_some());
        let (mut five, mut one) = (queue(s, 5), queue(s, 1));
        assert!(start(&mut one, 0).is_none() && start(&mut five, 0).is_none());
        assert!(!running.preempted());
        drop(running);
        assert!(start(&mut five, 0).is_none());
        assert!(start(&mut one, 0).is_some());
        assert_eq!(stats(s).preemptions, 0);
    }

    #[test]
    fn a_readmission_recomputes_the_generated_tokens() {
        let s = scheduler(&[
            "--enable-priority-scheduling",
            "--max-running",
            "1",
            "--prefill-us-per-token",
            "1000",
        ]);
        let mut low = queue(s, 0);
        let first = start(&mut low, 0).unwrap();
        let mut urgent = queue(s, 100);
        let second = start(&mut urgent, 0).unwrap();
        // Prefills run one after another: 2 prompt tokens each.
        assert_eq!(second - first, Duration::from_millis(2));
        drop(urgent);
        let third = start(&mut low, 50).unwrap();
        assert!(
            third - second >= Duration::from_millis(52),
            "prompt plus 50 generated"
        );
    }
}
