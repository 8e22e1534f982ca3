//! Request rates shared by several gateway instances through Redis (`rate_limit.storage: redis`).
//!
//! The same GCRA as [`super::Rate`], run as one Lua script in Redis so that every instance takes
//! from one allowance atomically (all scopes of a request or none), timed by Redis's own clock.
//! Redis calls block, so they run on a few std threads; the worker awaits the answer as a future.
//! While Redis is unreachable, each instance falls back to its local rates (logged).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::RateState;

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = 60000000
local news = {}
for i, key in ipairs(KEYS) do
  local interval = period / tonumber(ARGV[i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new = tat + interval
  if new - now > period then
    return {0, math.ceil(new - now - period), 0}
  end
  news[i] = new
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.0f', news[i]), 'PX', math.ceil((news[i] - now) / 1000) + 1000)
end
local interval = period / tonumber(ARGV[1])
return {1, math.floor((now + period - news[1]) / interval), math.ceil(news[1] - now)}
"#;

/// What Redis said about one request.
pub enum Remote {
    Taken(RateState),
    Refused(Duration),
    /// Redis could not answer: use the local rates.
    Unavailable,
}

struct Job {
    /// (Redis key, limit per minute), most specific scope first.
    scopes: Vec<(String, u64)>,
    reply: Arc<Reply>,
}

#[derive(Default)]
struct Reply {
    state: Mutex<(Option<Remote>, Option<Waker>)>,
}

pub struct RedisRates {
    tx: Sender<Job>,
    prefix: String,
}

impl RedisRates {
    pub fn start(url: &str, prefix: &str, threads: usize) -> std::io::Result<RedisRates> {
        let client = redis::Client::open(url).map_err(std::io::Error::other)?;
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..threads.max(1) {
            let (client, rx) = (client.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("llmproxy-rl{i}"))
                .spawn(move || serve(&client, &rx))?;
        }
        Ok(RedisRates {
            tx,
            prefix: prefix.to_string(),
        })
    }

    /// Takes one request from every scope (id, limit) or from none.
    pub fn take(&self, scopes: &[(&str, u64)]) -> TakeFuture {
        let reply = Arc::new(Reply::default());
        let job = Job {
            scopes: scopes
                .iter()
                .map(|(id, limit)| (format!("{}{id}", self.prefix), *limit))
                .collect(),
            reply: reply.clone(),
        };
        if self.tx.send(job).is_err() {
            reply.state.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(Remote::Unavailable);
        }
        TakeFuture { reply }
    }
}

pub struct TakeFuture {
    reply: Arc<Reply>,
}

impl Future for TakeFuture {
    type Output = Remote;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Remote> {
        let mut state = self.reply.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                state.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn serve(client: &redis::Client, jobs: &Receiver<Job>) {
    let script = redis::Script::new(SCRIPT);
    let mut conn: Option<redis::Connection> = None;
    // Logged once per outage per thread, not once per request.
    let mut down = false;
    for job in jobs {
        let answer = match run(client, &mut conn, &script, &job.scopes) {
            Ok(a) => {
                if down {
                    tracing::info!("redis rate limit available again");
                }
                down = false;
                a
            }
            Err(e) => {
                conn = None;
                if !down {
                    tracing::warn!("redis rate limit unavailable, using local limits: {e}");
                }
                down = true;
                Remote::Unavailable
            }
        };
        let waker = {
            let mut state = job.reply.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0 = Some(answer);
            state.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

fn run(
    client: &redis::Client,
    conn: &mut Option<redis::Connection>,
    script: &redis::Script,
    scopes: &[(String, u64)],
) -> redis::RedisResult<Remote> {
    if conn.is_none() {
        let c = client.get_connection_with_timeout(Duration::from_secs(1))?;
        c.set_read_timeout(Some(Duration::from_secs(1)))?;
        *conn = Some(c);
    }
    let c = conn.as_mut().expect("connected above");
    let mut inv = script.prepare_invoke();
    for (key, limit) in scopes {
        inv.key(key).arg(*limit);
    }
    let (ok, a, b): (i64, i64, i64) = inv.invoke(c)?;
    Ok(if ok == 1 {
        Remote::Taken(RateState {
            limit: scopes[0].1,
            remaining: a.max(0) as u64,
            reset: Duration::from_micros(b.max(0) as u64),
        })
    } else {
        Remote::Refused(Duration::from_micros(a.max(0) as u64))
    })
}
