//! Helpers shared by the replication tests: the real data in
//! `/work/shared/data`, a source wrapper that counts and hides state files,
//! the HTTP fixture server, and scratch directories.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::{ReplicationError, ReplicationState, Source};

/// A path under the shared test data directory (beside the workspace).
pub fn data_path(relative: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data")).join(relative)
}

/// Wraps a source, counting state fetches and hiding chosen state files.
pub struct CountingSource {
    inner: Box<dyn Source>,
    hidden: Box<dyn Fn(u64) -> bool + Send>,
    fetches: Cell<usize>,
    fail: Cell<bool>,
}

impl CountingSource {
    pub fn new(inner: Box<dyn Source>, hidden: impl Fn(u64) -> bool + Send + 'static) -> Self {
        Self {
            inner,
            hidden: Box::new(hidden),
            fetches: Cell::new(0),
            fail: Cell::new(false),
        }
    }

    /// State files fetched (the latest one included) since the last reset.
    pub fn fetches(&self) -> usize {
        self.fetches.get()
    }

    pub fn reset(&self) {
        self.fetches.set(0);
    }

    /// Makes numbered state fetches fail with a (retryable) I/O error.
    pub fn fail_states(&self) {
        self.fail.set(true);
    }
}

impl Source for CountingSource {
    fn describe(&self) -> String {
        format!("counting {}", self.inner.describe())
    }

    fn latest_state(&self) -> Result<ReplicationState, ReplicationError> {
        self.fetches.set(self.fetches.get() + 1);
        self.inner.latest_state()
    }

    fn state(&self, seq: u64) -> Result<Option<ReplicationState>, ReplicationError> {
        self.fetches.set(self.fetches.get() + 1);
        if self.fail.get() {
            return Err(ReplicationError::Io {
                path: PathBuf::from("test"),
                error: io::Error::other("injected failure"),
            });
        }
        if (self.hidden)(seq) {
            return Ok(None);
        }
        self.inner.state(seq)
    }

    fn diff(&self, seq: u64) -> Result<Option<Vec<u8>>, ReplicationError> {
        self.inner.diff(seq)
    }
}

/// `tests/fixtures/http_source.py`, serving a directory on 127.0.0.1 until
/// dropped (also when a test panics).
pub struct HttpFixture {
    child: Child,
    port: u16,
}

impl HttpFixture {
    /// Starts the server on `dir` with extra command-line `flags`.
    pub fn start(dir: &Path, flags: &[&str]) -> Self {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/http_source.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .args(flags)
            .arg(dir)
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start python3 tests/fixtures/http_source.py");
        let stdout = child.stdout.take().expect("piped stdout");
        // From here on, a panic drops the guard, which kills the server.
        let mut fixture = Self { child, port: 0 };
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = sender.send(line);
            // Keep the pipe open (and drained) for as long as the server runs.
            let _ = io::copy(&mut reader, &mut io::sink());
        });
        let line = receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("http_source.py printed no PORT line within 30 s");
        fixture.port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from http_source.py: {line:?}"));
        fixture
    }

    /// The URL of `path` (which starts with a slash) on the server.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Makes sequences up to `seq` visible (`POST /_control/publish`).
    pub fn publish(&self, seq: u64) {
        let response = ureq::post(self.url(&format!("/_control/publish?seq={seq}")))
            .send_empty()
            .expect("publish request failed");
        assert!(response.status().is_success());
    }
}

impl Drop for HttpFixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "osmvec-replication-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `relative`, creating parent directories.
    pub fn write(&self, relative: &str, contents: &[u8]) {
        let path = self.0.join(relative);
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create dirs");
        std::fs::write(path, contents).expect("write file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
