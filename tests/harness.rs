//! Shared helpers of the end-to-end tests: they drive the real `osmvec`
//! binary over real data and compare with osmium-tool, the reference.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The workspace root (this crate lives in `tests/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
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

pub fn osmvec(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("OSMVEC_LOG", "warn")
        .output()
        .expect("osmvec runs")
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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
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
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
