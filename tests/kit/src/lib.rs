//! Test support of the end-to-end tests in `tests/`: they drive the real
//! `osmvec` binary over real data and compare with osmium-tool, the
//! reference. Processes ([`Proc`], [`sigterm`], [`terminate`], one way to
//! stop a child; a [`Watchdog`] on each, so a hung one fails its test
//! rather than the suite's time limit), ports ([`free_port`]), the tansu broker ([`Broker`]), the
//! loopback replication source ([`HttpSource`]), Kafka records
//! ([`consume`], [`decode`]) and the dashboards' PromQL ([`metric_names`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};

/// The workspace root (this crate lives in `tests/kit/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/kit/ has a grandparent")
        .to_path_buf()
}

/// A file under `tests/data`.
pub fn data(rel: &str) -> PathBuf {
    let p = root().join("tests/data").join(rel);
    assert!(p.exists(), "test data {} is missing", p.display());
    p
}

/// The `osmvec` binary under test: `OSMVEC_BIN`, or the release build that
/// `cargo test --release` sits next to.
pub fn bin() -> PathBuf {
    if let Ok(p) = std::env::var("OSMVEC_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"));
    let p = target.join("release/osmvec");
    assert!(
        p.exists(),
        "{} not found: run the tests with `cargo test --release --workspace` (ops/test.sh), which builds it, or `cargo build --release -p osmvec`",
        p.display()
    );
    p
}

/// Runs osmvec to the end (under a [`Watchdog`]: a run that hangs is
/// killed and fails its test instead of the whole suite's time limit).
pub fn osmvec(args: &[&str]) -> Output {
    let child = Command::new(bin())
        .args(args)
        .env("OSMVEC_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("osmvec runs");
    let _dog = Watchdog::arm(&child, &format!("osmvec {args:?}"));
    child.wait_with_output().expect("osmvec runs")
}

/// Runs osmvec and insists on success, showing stderr otherwise.
pub fn osmvec_ok(args: &[&str]) -> String {
    let out = osmvec(args);
    assert!(
        out.status.success(),
        "osmvec {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

pub fn stats(store: &Path) -> serde_json::Value {
    let s = osmvec_ok(&["stats", "--store", path_str(store), "--json"]);
    serde_json::from_str(&s).expect("stats prints JSON")
}

pub fn export(store: &Path) -> String {
    osmvec_ok(&["export", "--store", path_str(store), "--format", "opl"])
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs osmium (osmium-tool, the reference implementation) and returns stdout.
/// Installed by ops/install.sh; a missing osmium fails the test loudly.
pub fn osmium(args: &[&str]) -> String {
    let out = Command::new("osmium")
        .args(args)
        .output()
        .expect("osmium-tool is not installed: run ops/install.sh");
    assert!(
        out.status.success(),
        "osmium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `osmium cat -f opl,add_metadata=version FILE`, tags sorted.
pub fn osmium_opl(file: &Path) -> String {
    sort_tags(&osmium(&[
        "cat",
        "-f",
        "opl,add_metadata=version",
        path_str(file),
    ]))
}

/// Sorts the tags within each OPL line: tag order is not part of OSM's data
/// model and differs between tools.
pub fn sort_tags(opl: &str) -> String {
    let mut out = String::with_capacity(opl.len());
    for line in opl.lines() {
        let mut fields: Vec<String> = line.split(' ').map(str::to_string).collect();
        for f in fields.iter_mut() {
            if let Some(tags) = f.strip_prefix('T').filter(|t| !t.is_empty()) {
                let mut t: Vec<&str> = tags.split(',').collect();
                t.sort_unstable();
                *f = format!("T{}", t.join(","));
            }
        }
        out.push_str(&fields.join(" "));
        out.push('\n');
    }
    out
}

/// Compares two OPL dumps and, on a difference, shows the first few
/// differing lines instead of two megabytes of text.
pub fn assert_same_opl(ours: &str, reference: &str, what: &str) {
    if ours == reference {
        return;
    }
    let a: Vec<&str> = ours.lines().collect();
    let b: Vec<&str> = reference.lines().collect();
    let sa: std::collections::BTreeSet<&str> = a.iter().copied().collect();
    let sb: std::collections::BTreeSet<&str> = b.iter().copied().collect();
    let only_ours: Vec<&&str> = sa.difference(&sb).take(8).collect();
    let only_ref: Vec<&&str> = sb.difference(&sa).take(8).collect();
    panic!(
        "{what}: export differs from the reference ({} vs {} lines)\nonly in ours: {only_ours:#?}\nonly in reference: {only_ref:#?}",
        a.len(),
        b.len()
    );
}

/// A fresh temporary directory, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("osmvec-test-")
        .tempdir()
        .expect("temporary directory")
}

/// A recursive copy of a directory tree (to give a test a private,
/// writable replication directory).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("dir entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// The stdlib HTTP server of tests/fixtures serving a replication directory.
pub struct HttpSource {
    child: Child,
    pub url: String,
}

impl HttpSource {
    pub fn start(dir: &Path, extra: &[&str]) -> HttpSource {
        let script = root().join("tests/fixtures/http_source.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--dir")
            .arg(dir)
            .arg("--port")
            .arg("0")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("server prints its port");
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the server: {line:?}"));
        HttpSource {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for HttpSource {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tansu Kafka-protocol broker on a free loopback port, stopped (SIGTERM)
/// on drop. `tansu` comes from PATH or ~/.cargo/bin (`ops/broker.sh
/// install`, run by ops/test.sh).
pub struct Broker {
    child: Option<Child>,
    tansu: PathBuf,
    storage: String,
    /// Working directory (tansu resolves sqlite paths against it).
    cwd: PathBuf,
    port: u16,
    pub addr: String,
}

impl Broker {
    /// Memory storage: fast, but topics do not survive a restart.
    pub fn start() -> Broker {
        Broker::start_with("memory://tansu/".into(), std::env::temp_dir())
    }

    /// SQLite storage in `dir`/broker.db: survives [`Broker::stop`] +
    /// [`Broker::restart`].
    pub fn start_sqlite(dir: &Path) -> Broker {
        Broker::start_with("sqlite://broker.db".into(), dir.to_path_buf())
    }

    fn start_with(storage: String, cwd: PathBuf) -> Broker {
        let tansu = std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("tansu"))
                    .find(|f| f.is_file())
            })
            .or_else(|| {
                let f = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/tansu");
                f.is_file().then_some(f)
            })
            .expect("tansu not found: run `bash ops/broker.sh install` (ops/test.sh does)");
        let port = free_port();
        let mut broker = Broker {
            child: None,
            tansu,
            storage,
            cwd,
            port,
            addr: format!("127.0.0.1:{port}"),
        };
        broker.restart();
        broker
    }

    /// Starts the broker again on the same port and storage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.tansu)
            .current_dir(&self.cwd)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args([
                "--storage-engine",
                &self.storage,
                "--cluster-id",
                "osmvec-test",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        // From here on, Drop stops the broker whatever happens.
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("tansu did not listen on {} within 10 s", self.addr);
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

// Running the daemon in the background and talking to its HTTP side.

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Sends SIGTERM to `child` (what a service manager sends); panics if
/// the signal cannot be sent.
pub fn sigterm(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
    // SAFETY: kill(2) with a pid this process spawned; no memory involved.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    // A child not reaped yet has its pid even after it exited, so this
    // fails only on a real error.
    assert_eq!(
        r,
        0,
        "kill -TERM {pid} failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Stops `child` whatever it is doing: SIGTERM, then SIGKILL if it has not
/// exited within 5 s; reaps it.
pub fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    sigterm(child);
    for _ in 0..50 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How long one process of a test may run before its [`Watchdog`] kills
/// it: `OSMVEC_TEST_PROCESS_TIMEOUT_S` seconds, 1,200 unless set (the
/// longest run of the suite takes about 100 s here, 3× that on a slow CI
/// machine).
pub fn process_limit() -> Duration {
    let s = std::env::var("OSMVEC_TEST_PROCESS_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1200);
    Duration::from_secs(s)
}

/// SIGKILLs a child that is still running after [`process_limit`], with a
/// line on stderr naming it, so that a test waiting on it (its output, its
/// exit) fails with what it read rather than hanging; disarmed on drop.
pub struct Watchdog {
    cancel: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn arm(child: &Child, what: &str) -> Watchdog {
        Watchdog::arm_for(child, what, process_limit())
    }

    pub fn arm_for(child: &Child, what: &str, limit: Duration) -> Watchdog {
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        let what = what.to_string();
        let (cancel, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                // Still our child? (A pid reaped meanwhile could be reused.)
                let ours = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        let after_name = &s[s.rfind(')')? + 1..];
                        after_name.split_whitespace().nth(1)?.parse::<u32>().ok()
                    })
                    == Some(std::process::id());
                if ours {
                    eprintln!("watchdog: {what} still running after {limit:?}; killed");
                    // SAFETY: kill(2) on a pid this process spawned; no
                    // memory involved.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        });
        Watchdog {
            cancel: Some(cancel),
            thread: Some(thread),
        }
    }
}

impl Watchdog {
    /// Stops watching (the process has exited or is about to be reaped).
    pub fn disarm(&mut self) {
        drop(self.cancel.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// A process stopped by [`terminate`] on drop, under a [`Watchdog`].
pub struct Proc(pub Child, Watchdog);

impl Proc {
    pub fn new(child: Child, what: &str) -> Proc {
        let dog = Watchdog::arm(&child, what);
        Proc(child, dog)
    }

    /// SIGTERM and wait (the watchdog still on guard); panics unless it
    /// exits 0.
    pub fn stop(&mut self) {
        sigterm(&self.0);
        let status = self.0.wait().expect("wait");
        self.1.disarm();
        assert!(status.success(), "exit status {status}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        terminate(&mut self.0);
        self.1.disarm();
    }
}

/// GET or POST; (status, body) whatever the status.
pub fn http(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let resp = if method == "POST" {
        let mut r = agent.post(url);
        if let Some(t) = token {
            r = r.header("Authorization", &format!("Bearer {t}"));
        }
        r.send_empty()
    } else {
        agent.get(url).call()
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.into_body().read_to_string().unwrap_or_default();
    (status, body)
}

pub fn get_json(url: &str) -> serde_json::Value {
    let (status, body) = http("GET", url, None);
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of an unlabelled sample in Prometheus text.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A store with a 1-step model: (dir, store, checkpoint).
pub fn store_and_model(base: &Path) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempdir();
    let store = dir.path().join("store");
    let ckpt = dir.path().join("ckpt");
    osmvec_ok(&["import", "--store", path_str(&store), path_str(base)]);
    osmvec_ok(&[
        "train",
        "--store",
        path_str(&store),
        "--out",
        path_str(&ckpt),
        "--steps",
        "1",
        "--batch-size",
        "16",
    ]);
    (dir, store, ckpt)
}

/// Cycle lines of a background daemon, as they arrive.
pub type Cycles = std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

/// `osmvec run` in the background, serving HTTP on a free port; its cycle
/// lines are collected.
pub fn start_daemon(
    store: &Path,
    ckpt: &Path,
    source: &str,
    broker: &str,
    extra: &[&str],
) -> (Proc, String, Cycles) {
    start_daemon_env(store, ckpt, source, broker, extra, &[])
}

/// [`start_daemon`] with extra environment variables.
pub fn start_daemon_env(
    store: &Path,
    ckpt: &Path,
    source: &str,
    broker: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, String, Cycles) {
    let port = free_port();
    let mut child = Command::new(bin())
        .args([
            "run",
            "--store",
            path_str(store),
            "--checkpoint",
            path_str(ckpt),
        ])
        .args(["--source", source, "--brokers", broker, "--json"])
        .args(["--http-listen", &format!("127.0.0.1:{port}")])
        .args(["--poll-interval", "0.2"])
        .args(extra)
        .envs(env.iter().copied())
        .env("OSMVEC_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("osmvec run starts");
    let lines = Cycles::default();
    {
        let lines = lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                lines
                    .lock()
                    .unwrap()
                    .push(serde_json::from_str(&l).unwrap());
            }
        });
    }
    let url = format!("http://127.0.0.1:{port}");
    let proc = Proc::new(child, "osmvec run");
    wait_for("the daemon's /healthz", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (proc, url, lines)
}

// Reading what the daemon published.

/// One record: key, value decoded to JSON (the vector as an array, whatever
/// the encoding), or None for a tombstone.
pub type Record = (String, Option<serde_json::Value>);

/// Every record of `topic` from the beginning. Stops once every partition
/// was read up to the high watermark it had when the call began *and* then
/// `idle` passed without a new record: on memory storage tansu 0.6.0 reports a
/// watermark short of the last batch, so quiet finds the true end; the
/// watermark keeps a broker that stalls for longer than `idle` (seen on a
/// loaded CI machine: requests timing out on SQLite storage) from ending the
/// read early. Gives up waiting for the watermarks after [`CONSUME_DEADLINE`]
/// and returns what it read (the caller's assertions then say what is
/// missing). Values are decoded by their content-type header.
pub fn consume(brokers: &str, topic: &str, idle: Duration) -> Vec<Record> {
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("osmvec-test-{topic}"))
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = rdkafka::TopicPartitionList::new();
    // Offset each partition must be read to (its high watermark now).
    let mut behind = std::collections::HashMap::new();
    for t in meta.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
                .unwrap();
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(30))
                .expect("watermarks");
            if high > 0 {
                behind.insert(p.id(), high);
            }
        }
    }
    assert!(tpl.count() > 0, "topic {topic} has no partitions");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let start = Instant::now();
    let mut quiet = Instant::now();
    loop {
        if quiet.elapsed() >= idle {
            if behind.is_empty() {
                break;
            }
            if start.elapsed() > CONSUME_DEADLINE {
                eprintln!(
                    "consume({topic}): gave up after {CONSUME_DEADLINE:?} short of the high \
                     watermarks {behind:?} (partition → offset)"
                );
                break;
            }
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("message");
            if behind
                .get(&m.partition())
                .is_some_and(|&h| m.offset() + 1 >= h)
            {
                behind.remove(&m.partition());
            }
            let content_type = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "content-type"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).to_string());
            let value = m.payload().map(|p| decode(p, content_type.as_deref()));
            out.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                value,
            ));
            quiet = Instant::now();
        }
    }
    out
}

/// How long [`consume`] waits for a stalled broker to deliver up to the
/// watermarks it reported.
pub const CONSUME_DEADLINE: Duration = Duration::from_secs(180);

/// JSON as is; CBOR into the same JSON shape (a byte-string vector is
/// unpacked from little-endian f32).
pub fn decode(payload: &[u8], content_type: Option<&str>) -> serde_json::Value {
    match content_type {
        Some("application/cbor") => {
            let v: ciborium::Value = ciborium::from_reader(payload).expect("valid CBOR");
            cbor_to_json(v)
        }
        Some("application/json") => serde_json::from_slice(payload).expect("valid JSON"),
        other => panic!("record without a known content-type header: {other:?}"),
    }
}

pub fn cbor_to_json(v: ciborium::Value) -> serde_json::Value {
    use ciborium::Value as C;
    use serde_json::Value as J;
    match v {
        C::Null => J::Null,
        C::Bool(b) => J::Bool(b),
        C::Integer(i) => J::from(i128::from(i) as i64),
        C::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        C::Text(t) => J::String(t),
        C::Bytes(b) => J::Array(
            b.chunks_exact(4)
                .map(|c| J::from(f32::from_le_bytes(c.try_into().unwrap()) as f64))
                .collect(),
        ),
        C::Array(a) => J::Array(a.into_iter().map(cbor_to_json).collect()),
        C::Map(m) => J::Object(
            m.into_iter()
                .map(|(k, v)| (k.into_text().expect("text keys"), cbor_to_json(v)))
                .collect(),
        ),
        other => panic!("unexpected CBOR value {other:?}"),
    }
}

/// Appends one record without value (key `osmvec-test-sentinel`) to every
/// partition of `topic`. tansu 0.6.0 can report a partition's high
/// watermark short of its last producer batch, which then stays invisible to
/// consumers until more data arrives; the sentinel is that "more data".
/// Consumers skip it (no payload; tests drop the key).
pub fn push_past_tail(brokers: &str, topic: &str) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    let meta = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    for t in meta.topics() {
        for p in t.partitions() {
            producer
                .send(
                    BaseRecord::<str, [u8]>::to(topic)
                        .key(SENTINEL)
                        .partition(p.id()),
                )
                .map_err(|(e, _)| e)
                .expect("sentinel queued");
        }
    }
    producer
        .flush(Duration::from_secs(10))
        .expect("sentinels delivered");
}

/// The key of [`push_past_tail`]'s records.
pub const SENTINEL: &str = "osmvec-test-sentinel";

/// The `vector` of a decoded tile-embedding record.
pub fn vector_of(v: &serde_json::Value) -> Vec<f32> {
    v["vector"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

// The Grafana dashboard's queries against a live /metrics.

/// Every `expr` string anywhere in `v`.
pub fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// `osmvec_*` identifiers in a PromQL expression.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(off) = expr[i..].find("osmvec_") {
        let start = i + off;
        let preceded = start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if !preceded {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Every query of ops/grafana/osmvec-dashboard.json.
pub fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("ops/grafana/osmvec-dashboard.json")).unwrap(),
    )
    .expect("the dashboard parses");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    exprs
}

/// The series names a /metrics text exposes (with a histogram's `_bucket`,
/// `_sum` and `_count`).
pub fn exported_series(metrics: &str) -> std::collections::BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut p = l.split_whitespace();
            let (name, kind) = (p.next().unwrap().to_string(), p.next().unwrap());
            let mut names = vec![name.clone()];
            if kind == "histogram" {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
            names
        })
        .collect()
}

// Readers no one here wrote: pyarrow, geopandas, kafka-python, cbor2.

/// The Python of `ops/py-readers.sh`'s virtualenv (installed once, then
/// reused); the scripts under `tests/readers/` run on it.
pub fn py_readers() -> PathBuf {
    static PY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("ops/py-readers.sh"))
            .output()
            .expect("bash runs ops/py-readers.sh");
        assert!(
            out.status.success(),
            "ops/py-readers.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let py = PathBuf::from(stdout.lines().last().expect("the venv's python").trim());
        assert!(py.exists(), "ops/py-readers.sh printed {}", py.display());
        py
    })
    .clone()
}

/// Runs `tests/readers/SCRIPT ARGS` on [`py_readers`]; panics with its
/// output unless it exits 0; returns its last stdout line as JSON.
pub fn py_reader(script: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(py_readers())
        .arg(root().join("tests/readers").join(script))
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{script}: {e}: {last:?}"))
}

/// Runs the binary with `args` and returns (exit status, stdout, stderr,
/// the child's peak resident set in kB). The peak comes from the rusage of
/// exactly this child, via wait4 (the peak over its whole life, `VmHWM`);
/// that wait4 reaps the child, which std's `Child` does not know about.
#[allow(clippy::zombie_processes)]
pub fn osmvec_peak_rss(args: &[&str]) -> (std::process::ExitStatus, String, String, i64) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(bin())
        .args(args)
        .env("OSMVEC_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("osmvec starts");
    let mut dog = Watchdog::arm(&child, &format!("osmvec {args:?}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let mut status = 0i32;
    // SAFETY: a plain wait4 on our own child, into locals.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    dog.disarm();
    (
        std::process::ExitStatus::from_raw(status),
        out.join().unwrap(),
        err.join().unwrap(),
        usage.ru_maxrss,
    )
}
