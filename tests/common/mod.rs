//! Helpers shared by the integration tests: spawn the binary (simulator or gateway) on port 0,
//! learn its address from its `--ready-file`, and talk raw HTTP/1.1 to it with blocking std
//! sockets.
//!
//! Std-only on purpose: the tests must see the bytes exactly as they are on the wire, which an HTTP
//! client library would hide (chunk framing, a missing last chunk).

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

pub mod tls;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long any single read may block before a test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A spawned `llmproxy` process; dropping it kills and reaps it.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    /// The admin API's address, when the config turns it on.
    pub admin: Option<SocketAddr>,
    /// Config file written for a gateway, removed with the process.
    pub config: Option<PathBuf>,
    /// Where the process reported its addresses, removed with the process.
    ready_file: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for path in [&self.config, &self.ready_file].into_iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A path under the temp dir no other test (or earlier run) uses: `<prefix>-<pid>-<n>-<nanos>`.
pub fn unique_path(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(unique_name(prefix))
}

/// A name no other test process or earlier run uses, for files, tables and key prefixes.
pub fn unique_name(prefix: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The addresses an `llmproxy` process wrote to its `--ready-file`.
pub struct Listening {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
}

/// Waits until `child` has written `ready_file` (it does once every worker listens) and returns
/// the addresses in it. Panics when the process exits first or takes more than 10 s.
pub fn wait_ready(child: &mut Child, ready_file: &Path) -> Listening {
    let written = wait_until(Duration::from_secs(10), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("llmproxy exited before it listened: {status}");
        }
        ready_file.exists()
    });
    assert!(written, "llmproxy wrote no {}", ready_file.display());
    let text = std::fs::read_to_string(ready_file).expect("read the ready file");
    let address = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(|a| a.parse().expect("an address in the ready file"))
    };
    Listening {
        listen: address("listen").expect("a listen line in the ready file"),
        admin: address("admin"),
    }
}

/// Runs `llmproxy <args> --ready-file FILE` with `env` added and waits until it listens.
fn spawn(args: &[&str], env: &[(&str, &OsStr)], config: Option<PathBuf>) -> Proc {
    spawn_logging(args, env, config, Stdio::inherit())
}

/// [`spawn`] with the process's log (stderr) sent to `stderr`.
fn spawn_logging(
    args: &[&str],
    env: &[(&str, &OsStr)],
    config: Option<PathBuf>,
    stderr: Stdio,
) -> Proc {
    let ready_file = unique_path("llmproxy-ready");
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(args)
        .arg("--ready-file")
        .arg(&ready_file)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn llmproxy");
    let listening = wait_ready(&mut child, &ready_file);
    Proc {
        child,
        addr: listening.listen,
        admin: listening.admin,
        config,
        ready_file: Some(ready_file),
    }
}

/// Starts `cmd`, a test server that binds port 0 and prints `ready ADDRESS` as its first line
/// on stdout once it listens (the scripts in tests/support do), and returns it with that address.
pub fn spawn_reporting(mut cmd: Command) -> Proc {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read the server's ready line");
    let addr = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("expected `ready ADDRESS`, got {line:?}"));
    Proc {
        child,
        addr,
        admin: None,
        config: None,
        ready_file: None,
    }
}

/// Runs `llmproxy mock-llm --listen 127.0.0.1:0 <args>` and waits until it listens.
pub fn spawn_mock(args: &[&str]) -> Proc {
    spawn_mock_on(([127, 0, 0, 1], 0).into(), args)
}

/// Runs `llmproxy mock-llm --listen <listen> <args>` and waits until it listens; for a test that
/// restarts a backend on the address it had.
pub fn spawn_mock_on(listen: SocketAddr, args: &[&str]) -> Proc {
    let listen = listen.to_string();
    let mut full = vec!["mock-llm", "--listen", &listen];
    full.extend_from_slice(args);
    spawn(&full, &[], None)
}

/// Runs `llmproxy serve --config FILE` with `config_yaml` written to FILE, `{listen}` replaced by
/// `127.0.0.1:0`, and waits until the gateway listens.
pub fn spawn_gateway(config_yaml: &str) -> Proc {
    spawn_gateway_on(([127, 0, 0, 1], 0).into(), config_yaml)
}

/// [`spawn_gateway`] reporting to `notifications` as it would to systemd.
pub fn spawn_gateway_notifying(config_yaml: &str, notifications: &Notifications) -> Proc {
    let env = [("NOTIFY_SOCKET", notifications.path.as_os_str())];
    start_gateway(([127, 0, 0, 1], 0).into(), config_yaml, &env)
}

/// [`spawn_gateway`] with `{listen}` replaced by `listen`: for a second process on the port of a
/// running one (`SO_REUSEPORT`).
pub fn spawn_gateway_on(listen: SocketAddr, config_yaml: &str) -> Proc {
    start_gateway(listen, config_yaml, &[])
}

/// [`spawn_gateway`] writing its log (stderr) to the file `log`, for a test that reads it.
pub fn spawn_gateway_logging(config_yaml: &str, log: &Path) -> Proc {
    let file = std::fs::File::create(log).expect("create the log file");
    let path = gateway_config_file(([127, 0, 0, 1], 0).into(), config_yaml);
    let arg = path.to_str().expect("utf-8 temp path").to_string();
    spawn_logging(&["serve", "--config", &arg], &[], Some(path), file.into())
}

fn gateway_config_file(listen: SocketAddr, config_yaml: &str) -> PathBuf {
    assert!(
        config_yaml.contains("{listen}"),
        "the gateway config needs a {{listen}} placeholder"
    );
    let path = unique_path("llmproxy-test").with_extension("yaml");
    std::fs::write(&path, config_yaml.replace("{listen}", &listen.to_string()))
        .expect("write config");
    path
}

fn start_gateway(listen: SocketAddr, config_yaml: &str, env: &[(&str, &OsStr)]) -> Proc {
    let path = gateway_config_file(listen, config_yaml);
    let file = path.to_str().expect("utf-8 temp path").to_string();
    spawn(&["serve", "--config", &file], env, Some(path))
}

/// systemd's notification socket, played by the test: a process started with `NOTIFY_SOCKET`
/// set to `path` reports its states (`READY=1`, `RELOADING=1`, ...) here.
pub struct Notifications {
    socket: UnixDatagram,
    pub path: PathBuf,
}

impl Notifications {
    pub fn new() -> Notifications {
        let path = unique_path("llmproxy-notify").with_extension("sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notification socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set timeout");
        Notifications { socket, path }
    }

    /// Waits for the next notification containing `state`, passing over others.
    pub fn expect(&self, state: &str) {
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {state} notification: {e}"));
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == state)
            {
                return;
            }
        }
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A gateway started with a notification socket, past its start-up `READY=1`, so [`reload`]
/// can wait for its reloads.
pub fn spawn_gateway_reloadable(config_yaml: &str) -> (Proc, Notifications) {
    let notifications = Notifications::new();
    let gw = spawn_gateway_notifying(config_yaml, &notifications);
    // Start-up's READY=1 comes first, so a reload's cannot be taken for it.
    notifications.expect("READY=1");
    (gw, notifications)
}

/// Rewrites the config file of `gw` (from [`spawn_gateway_reloadable`]), sends SIGHUP and
/// waits until the reload is over (applied or refused): the gateway reports RELOADING=1, then
/// READY=1, as it does to systemd.
pub fn reload(gw: &Proc, notifications: &Notifications, text: &str) {
    std::fs::write(gw.config.as_ref().unwrap(), text).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(gw.child.id() as i32, libc::SIGHUP) }, 0);
    notifications.expect("RELOADING=1");
    notifications.expect("READY=1");
}

/// The config file `gw` runs on, as written (its `{listen}` filled in).
pub fn config_text(gw: &Proc) -> String {
    std::fs::read_to_string(gw.config.as_ref().unwrap()).unwrap()
}

/// A port nothing listens on, held for as long as this lives: a bound socket that never listens,
/// so connecting is refused and no other test's port-0 bind can be given the port. It has
/// `SO_REUSEPORT`, so a server the test starts later may bind the port explicitly and take over.
pub struct ClosedPort {
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

pub fn closed_port() -> ClosedPort {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    socket.bind(&any.into()).expect("bind 127.0.0.1:0");
    let addr = socket
        .local_addr()
        .expect("local address")
        .as_socket()
        .expect("an IP address");
    ClosedPort {
        _socket: socket,
        addr,
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body with chunked framing removed.
    pub body: Vec<u8>,
    /// The bytes after the head exactly as received.
    pub raw_body: Vec<u8>,
}

impl Response {
    /// First header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Chunk payloads in order, from `raw_body`, and whether the terminating chunk arrived.
    pub fn chunks(&self) -> (Vec<Vec<u8>>, bool) {
        let mut out = Vec::new();
        let mut rest = &self.raw_body[..];
        loop {
            let Some(eol) = find(rest, b"\r\n") else {
                return (out, false);
            };
            let size = std::str::from_utf8(&rest[..eol]).ok().and_then(|s| {
                usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
            });
            let Some(size) = size else {
                return (out, false);
            };
            rest = &rest[eol + 2..];
            if size == 0 {
                return (out, true);
            }
            if rest.len() < size + 2 {
                return (out, false);
            }
            out.push(rest[..size].to_vec());
            rest = &rest[size + 2..];
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One connection that can carry several requests (keep-alive): plain TCP, or any other byte
/// stream (a TLS session, [`tls`]).
pub struct Client<S = TcpStream> {
    reader: BufReader<S>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            reader: BufReader::new(stream),
        }
    }

    /// Continues on a connection the test has already written to by hand.
    pub fn from_stream(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }
}

impl<S: Read + Write> Client<S> {
    /// A client over an established stream (e.g. after a TLS handshake).
    pub fn over(stream: S) -> Client<S> {
        Client {
            reader: BufReader::new(stream),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).expect("send request");
    }

    /// Reads one final response (1xx interim responses are skipped). Panics when the connection
    /// ends before a complete head; a body cut short is returned as far as it came.
    pub fn read_response(&mut self) -> Response {
        self.try_read_response()
            .expect("connection closed before a response head")
    }

    fn try_read_response(&mut self) -> Option<Response> {
        loop {
            let mut status_line = String::new();
            if self.reader.read_line(&mut status_line).ok()? == 0 {
                return None;
            }
            let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line).ok()? == 0 {
                    return None;
                }
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    break;
                }
                let (n, v) = line.split_once(':')?;
                headers.push((n.trim().to_string(), v.trim().to_string()));
            }
            if (100..200).contains(&status) {
                continue;
            }
            let mut r = Response {
                status,
                headers,
                body: Vec::new(),
                raw_body: Vec::new(),
            };
            let chunked = r
                .header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
            let length = r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            if chunked {
                self.read_chunked(&mut r);
            } else if let Some(n) = length {
                let mut body = vec![0; n];
                let mut got = 0;
                while got < n {
                    match self.reader.read(&mut body[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got += k,
                    }
                }
                body.truncate(got);
                r.raw_body = body.clone();
                r.body = body;
            } else if status != 204 && status != 304 {
                let _ = self.reader.read_to_end(&mut r.raw_body);
                r.body = r.raw_body.clone();
            }
            return Some(r);
        }
    }

    fn read_chunked(&mut self, r: &mut Response) {
        loop {
            let mut line = Vec::new();
            if self.reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                return;
            }
            r.raw_body.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line);
            let Ok(size) = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
            else {
                return;
            };
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let mut t = Vec::new();
                    if self.reader.read_until(b'\n', &mut t).unwrap_or(0) == 0 {
                        return;
                    }
                    r.raw_body.extend_from_slice(&t);
                    if t == b"\r\n" {
                        return;
                    }
                }
            }
            let mut data = vec![0; size + 2];
            let mut got = 0;
            while got < data.len() {
                match self.reader.read(&mut data[got..]) {
                    Ok(0) | Err(_) => {
                        r.raw_body.extend_from_slice(&data[..got]);
                        r.body.extend_from_slice(&data[..got.min(size)]);
                        return;
                    }
                    Ok(k) => got += k,
                }
            }
            r.raw_body.extend_from_slice(&data);
            r.body.extend_from_slice(&data[..size]);
        }
    }

    pub fn stream(&mut self) -> &mut S {
        self.reader.get_mut()
    }
}

/// New connection, sends `raw`, reads one full response.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut c = Client::connect(addr);
    c.send(raw);
    c.read_response()
}

/// Builds a request with `Host`, `Content-Length` and `extra_headers`.
pub fn raw_request(
    method: &str,
    path: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    for (n, v) in extra_headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut raw = r.into_bytes();
    raw.extend_from_slice(body);
    raw
}

pub fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    extra_headers: &[(&str, &str)],
) -> Response {
    request(
        addr,
        &raw_request("POST", path, body.to_string().as_bytes(), extra_headers),
    )
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, &raw_request("GET", path, b"", &[]))
}

/// Scrapes `/metrics` and sums the samples named exactly `name` (any labels).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "GET /metrics");
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(body: &[u8]) -> Vec<String> {
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in String::from_utf8_lossy(body).split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            events.extend(data.take());
        } else if let Some(d) = line.strip_prefix("data:") {
            let d = d.strip_prefix(' ').unwrap_or(d);
            match &mut data {
                Some(acc) => {
                    acc.push('\n');
                    acc.push_str(d);
                }
                None => data = Some(d.to_string()),
            }
        }
    }
    events.extend(data);
    events
}

/// Polls `f` every 10 ms until it returns true (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `tests/support/fixed_upstream.py` on a port of its choosing.
pub fn spawn_fixed_upstream() -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/fixed_upstream.py"
    ))
    .arg("0");
    spawn_reporting(cmd)
}

/// One counter of a fixed upstream's `/fixed/stats`: `connections`, `requests` or `idle_closed`.
pub fn fixed_stat(upstream: SocketAddr, name: &str) -> u64 {
    get(upstream, "/fixed/stats").json()[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in the fixed upstream's stats"))
}

/// A server some tests need that a fresh clone's machine may not run. The tests build their
/// URLs and DSNs from `host` and `port`, so this is the one place that says where it is.
pub struct Service {
    pub name: &'static str,
    pub host: &'static str,
    pub port: u16,
}

impl Service {
    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// PostgreSQL, user `postgres` trusted, database `test`.
pub const POSTGRES: Service = Service {
    name: "PostgreSQL",
    host: "127.0.0.1",
    port: 5432,
};
/// MariaDB (or MySQL), user `root` with an empty password, database `test`.
pub const MARIADB: Service = Service {
    name: "MariaDB",
    host: "127.0.0.1",
    port: 3306,
};
pub const REDIS: Service = Service {
    name: "Redis",
    host: "127.0.0.1",
    port: 6379,
};

/// Set to 1 (CI does) to make a test whose service is unreachable fail instead of skip.
pub const REQUIRE_SERVICES: &str = "LLMPROXY_REQUIRE_SERVICES";

/// Whether `service` accepts connections, for a test to run: `if !service_up(&REDIS) { return; }`.
/// When it does not, the test is skipped with a SKIPPED line on stderr naming the service and its
/// address, or, with `LLMPROXY_REQUIRE_SERVICES=1`, fails.
pub fn service_up(service: &Service) -> bool {
    let required = std::env::var(REQUIRE_SERVICES).is_ok_and(|v| v == "1");
    check_service(service, required)
}

/// [`service_up`] with the requirement given rather than read from the environment.
pub fn check_service(service: &Service, required: bool) -> bool {
    let addr: SocketAddr = service.addr().parse().expect("a service address");
    let reached = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    let Err(e) = reached else {
        return true;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    assert!(
        !required,
        "{} at {addr} is unreachable ({e}) and {REQUIRE_SERVICES}=1: {test} needs it",
        service.name
    );
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing tests,
    // and a skip must show in every run.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {} at {addr} is unreachable ({e}); start it, or set {REQUIRE_SERVICES}=1 to make this a failure",
        service.name
    );
    false
}

/// Whether `python3` can import `modules` (the SDKs some tests drive). Without them the test
/// skips, loudly, unless [`REQUIRE_SERVICES`] is set, which makes it fail instead.
pub fn python_has(modules: &[&str]) -> bool {
    let imported = Command::new("python3")
        .arg("-c")
        .arg(format!("import {}", modules.join(", ")))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if imported {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    let required = std::env::var(REQUIRE_SERVICES).is_ok_and(|v| v == "1");
    assert!(
        !required,
        "python3 cannot import {modules:?} and {REQUIRE_SERVICES}=1: {test} needs it"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: python3 cannot import {modules:?} (python3 -m pip install {}); set {REQUIRE_SERVICES}=1 to make this a failure",
        modules.join(" ")
    );
    false
}

/// The request ids of a JSON access log, in order, once it holds `n` lines.
pub fn logged_request_ids(log: &Path, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            ids = std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v["fields"]["request_id"].as_str().map(str::to_owned))
                .collect();
            ids.len() >= n
        }),
        "access log has {ids:?}"
    );
    ids
}

/// Sends `raw` (a streamed request) on a new connection and returns it once a 200 head has
/// arrived, the body still to read: the stream holds its slot until the connection is dropped.
pub fn open_stream(addr: SocketAddr, raw: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(raw).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "the stream ended before its head"
        );
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    s
}
