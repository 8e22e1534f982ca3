//! `probe conversations`: a multi-tenant, multi-turn chat workload for prefix-cache routing
//! (loadtest/routing.sh), shaped like llm-d's prefix-cache benchmark (many tenants, each with a
//! long system prompt shared by its users, conversations whose history grows every turn).
//!
//! Conversation `i` belongs to a tenant: with `--hot-share P` the first `P × N` conversations are
//! tenant 0's and the rest go round the other tenants; otherwise conversation `i` is tenant
//! `i % tenants`'s. Turn `k` of a conversation sends the tenant's system prompt, the `k` earlier
//! questions and answers, and a new question, as one streaming chat request. Texts are made of
//! lowercase words drawn from a seeded generator, 4 bytes per token as the simulator counts them;
//! system prompts differ between tenants from their first bytes.
//!
//! Conversations wait in one first-in first-out queue; each of `--concurrency` threads takes the
//! next, sends its next turn, and puts it back at the end once answered (or drops it after its
//! last turn). So between two turns of a conversation the other waiting conversations' requests
//! pass (a user reading and typing), and a conversation's turns go out on whichever thread is free:
//! a thread's own connection or rhythm says nothing about which conversation it carries. (With
//! each thread owning fixed conversations, a closed loop makes least-loaded routing sticky for
//! free: the backend a thread's request just left is the least loaded one when its next request
//! comes.) `--header NAME` sends the conversation's id in that header.
//!
//! Prints one JSON line: requests, errors, TTFT p50/p90/p99/mean (µs), wall time and requests/s.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::{connect, die, pct, usage, Conn};

struct Opts {
    addr: String,
    tenants: usize,
    users: usize,
    turns: usize,
    system_tokens: usize,
    question_tokens: usize,
    answer_tokens: usize,
    max_tokens: usize,
    concurrency: usize,
    hot_share: f64,
    header: String,
    label: String,
}

fn parse(args: &[String]) -> Opts {
    let mut o = Opts {
        addr: String::new(),
        tenants: 16,
        users: 4,
        turns: 5,
        system_tokens: 2000,
        question_tokens: 64,
        answer_tokens: 64,
        max_tokens: 16,
        concurrency: 16,
        hot_share: 0.0,
        header: String::new(),
        label: String::new(),
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        let num = || {
            v.parse::<usize>()
                .unwrap_or_else(|_| die(&format!("bad number for {k}: {v}")))
        };
        match k.as_str() {
            "--addr" => o.addr = v.clone(),
            "--tenants" => o.tenants = num().max(1),
            "--users" => o.users = num().max(1),
            "--turns" => o.turns = num().max(1),
            "--system-tokens" => o.system_tokens = num(),
            "--question-tokens" => o.question_tokens = num().max(1),
            "--answer-tokens" => o.answer_tokens = num(),
            "--max-tokens" => o.max_tokens = num().max(1),
            "--concurrency" => o.concurrency = num().max(1),
            "--hot-share" => {
                o.hot_share = v
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .unwrap_or_else(|| die(&format!("--hot-share wants 0.0-1.0, got {v}")))
            }
            "--header" => o.header = v.clone(),
            "--label" => o.label = v.clone(),
            _ => usage(),
        }
    }
    if o.addr.is_empty() {
        usage()
    }
    o
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// About `tokens × 4` bytes of lowercase words drawn from `seed`.
fn text(seed: u64, tokens: usize) -> String {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "va", "ze", "bri", "clo", "dra", "fen",
        "gru", "hol",
    ];
    let mut s = String::with_capacity(tokens * 4 + 8);
    let mut state = seed;
    while s.len() < tokens * 4 {
        state = splitmix64(state);
        let mut r = state;
        for _ in 0..1 + (r & 3) {
            r >>= 4;
            s.push_str(SYLLABLES[(r & 15) as usize]);
        }
        s.push(' ');
    }
    s.truncate(tokens * 4);
    s
}

struct Conversation {
    id: String,
    system: String,
    /// Earlier turns, rendered as `,{"role":"user",...},{"role":"assistant",...}` messages.
    history: String,
    turn: u64,
    seed: u64,
}

impl Conversation {
    fn request(&self, o: &Opts) -> Vec<u8> {
        let question = text(self.seed ^ (self.turn << 32) ^ 0x51, o.question_tokens);
        let body = format!(
            "{{\"model\":\"mock-model\",\"stream\":true,\"max_tokens\":{},\"messages\":[\
             {{\"role\":\"system\",\"content\":\"{}\"}}{},{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
            o.max_tokens, self.system, self.history, question
        );
        let header = if o.header.is_empty() {
            String::new()
        } else {
            format!("{}: {}\r\n", o.header, self.id)
        };
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             {header}Accept: text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
            o.addr,
            body.len()
        )
        .into_bytes()
    }

    /// Appends this turn's question and an answer to the history.
    fn advance(&mut self, o: &Opts) {
        let question = text(self.seed ^ (self.turn << 32) ^ 0x51, o.question_tokens);
        let answer = text(self.seed ^ (self.turn << 32) ^ 0xa7, o.answer_tokens);
        self.history.push_str(&format!(
            ",{{\"role\":\"user\",\"content\":\"{question}\"}},{{\"role\":\"assistant\",\"content\":\"{answer}\"}}"
        ));
        self.turn += 1;
    }
}

#[derive(Default)]
struct Outcome {
    ttft_us: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

pub fn conversations(args: &[String]) {
    let o = parse(args);
    let n = o.tenants * o.users;
    let hot = (o.hot_share * n as f64).round() as usize;
    let tenant_of = |i: usize| {
        if o.hot_share > 0.0 {
            if i < hot || o.tenants == 1 {
                0
            } else {
                1 + (i - hot) % (o.tenants - 1)
            }
        } else {
            i % o.tenants
        }
    };
    let systems: Vec<String> = (0..o.tenants)
        .map(|t| text(splitmix64(t as u64 + 1), o.system_tokens))
        .collect();
    let queue = Queue {
        state: Mutex::new(QueueState {
            ready: (0..n)
                .map(|i| {
                    let seed = splitmix64(0x1000 + i as u64);
                    Conversation {
                        id: format!("{seed:016x}"),
                        system: systems[tenant_of(i)].clone(),
                        history: String::new(),
                        turn: 0,
                        seed,
                    }
                })
                .collect(),
            in_flight: 0,
        }),
        changed: Condvar::new(),
    };
    let wall = Instant::now();
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let (o, queue) = (&o, &queue);
        let handles: Vec<_> = (0..o.concurrency.min(n))
            .map(|_| s.spawn(move || run(o, queue)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread panicked"))
            .collect()
    });
    let wall_s = wall.elapsed().as_secs_f64();
    let mut ttft: Vec<f64> = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for r in outcomes {
        ttft.extend(r.ttft_us);
        errors += r.errors;
        first_error = first_error.or(r.first_error);
    }
    ttft.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let done = ttft.len();
    let mean = if done > 0 {
        ttft.iter().sum::<f64>() / done as f64
    } else {
        0.0
    };
    println!(
        "{{\"label\":\"{}\",\"conversations\":{n},\"hot_conversations\":{},\"turns\":{},\"requests\":{done},\
         \"errors\":{errors},\"ttft_us\":{{\"p50\":{:.1},\"p90\":{:.1},\"p99\":{:.1},\"mean\":{mean:.1}}},\
         \"wall_s\":{wall_s:.3},\"rps\":{:.2},\"first_error\":{}}}",
        o.label,
        if o.hot_share > 0.0 { hot } else { 0 },
        o.turns,
        pct(&ttft, 50.0),
        pct(&ttft, 90.0),
        pct(&ttft, 99.0),
        done as f64 / wall_s,
        match first_error {
            Some(e) => format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "'")),
            None => "null".into(),
        }
    );
    if done == 0 {
        std::process::exit(1);
    }
}

/// Conversations waiting for their next turn, and how many are being answered.
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

struct QueueState {
    ready: VecDeque<Conversation>,
    in_flight: usize,
}

impl Queue {
    /// The next conversation to send a turn of; None once every conversation has had its turns.
    fn take(&self) -> Option<Conversation> {
        let mut st = self.state.lock().expect("queue lock");
        loop {
            if let Some(conv) = st.ready.pop_front() {
                st.in_flight += 1;
                return Some(conv);
            }
            if st.in_flight == 0 {
                return None;
            }
            st = self.changed.wait(st).expect("queue lock");
        }
    }

    /// A turn was answered: the conversation queues for its next one, or leaves after its last.
    fn done(&self, conv: Conversation, turns: usize) {
        let mut st = self.state.lock().expect("queue lock");
        st.in_flight -= 1;
        if (conv.turn as usize) < turns {
            st.ready.push_back(conv);
        }
        self.changed.notify_all();
    }
}

/// One client thread: turns of whichever conversation is next, one request at a time on one
/// keep-alive connection (reopened after an error).
fn run(o: &Opts, queue: &Queue) -> Outcome {
    let mut out = Outcome::default();
    let mut conn: Option<Conn> = None;
    while let Some(mut conv) = queue.take() {
        let req = conv.request(o);
        conv.advance(o);
        if conn.is_none() {
            match connect(&o.addr) {
                Ok(s) => conn = Some(Conn::new(s)),
                Err(e) => {
                    out.errors += 1;
                    out.first_error.get_or_insert(format!("connect: {e}"));
                    queue.done(conv, o.turns);
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        match c.one(&req) {
            Ok((sample, keep)) => {
                out.ttft_us.push(sample.ttft_us);
                if !keep {
                    conn = None;
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(e);
                conn = None;
            }
        }
        queue.done(conv, o.turns);
    }
    out
}
