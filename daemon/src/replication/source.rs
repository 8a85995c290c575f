//! Where state files and diffs come from: a local directory or an HTTP(S)
//! server with the planet's layout.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

use super::{ReplicationError, ReplicationState, parse_state, sequence_path};

/// A replication feed, read one file at a time.
///
/// `Ok(None)` means "not published (yet)": the file does not exist (404).
/// That is the normal state of the sequence after the latest one, so a
/// follower polls on it rather than retrying, and it also covers old
/// sequences a mirror has pruned. Errors are for everything else, and
/// [`ReplicationError::is_retryable`] says whether waiting may help.
///
/// Only `Send`, not `Sync`: a source is owned by the thread that follows the
/// feed.
pub trait Source: Send {
    /// Where the feed is (a URL or a path), for log lines and messages.
    fn describe(&self) -> String;

    /// The top-level `state.txt`: the newest published sequence. Its absence
    /// is an error ([`ReplicationError::NotFound`]), since every feed has one.
    fn latest_state(&self) -> Result<ReplicationState, ReplicationError>;

    /// The state of sequence `seq`, or `None` if it is not published. A file
    /// that names another sequence is a [`ReplicationError::BadState`].
    fn state(&self, seq: u64) -> Result<Option<ReplicationState>, ReplicationError>;

    /// The diff of sequence `seq` (the changes since `seq - 1`), or `None` if
    /// it is not published.
    ///
    /// The bytes are returned as stored: normally a gzip-compressed osmChange
    /// file. A misconfigured web server that labels `.osc.gz` files with
    /// `Content-Encoding: gzip` makes the HTTP client decompress them, so
    /// readers should look for the gzip magic bytes rather than assume them.
    fn diff(&self, seq: u64) -> Result<Option<Vec<u8>>, ReplicationError>;
}

/// Settings shared by the source implementations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// How long to wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// How long a single read or write may stall.
    pub read_timeout: Duration,
    /// The most one request may take in all, from connecting to the last
    /// byte of the body: a server that trickles a byte now and then (never
    /// stalling for `read_timeout`) cannot hold a fetch for longer. Generous
    /// enough for a daily planet diff over a slow link.
    pub fetch_timeout: Duration,
    /// A PEM file of CA certificates to trust instead of the built-in roots
    /// (a mirror behind a private CA).
    pub ca_file: Option<PathBuf>,
    /// The largest diff accepted, so that a broken or hostile server cannot
    /// exhaust memory (diffs are held in memory whole). State files are
    /// capped at 64 KiB regardless.
    pub max_diff_bytes: u64,
}

impl Default for SourceOptions {
    /// 10 s to connect, 60 s per stalled read, 10 min per request, 512 MiB
    /// per diff (planet daily diffs are a few hundred MiB at most).
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            fetch_timeout: Duration::from_secs(600),
            ca_file: None,
            max_diff_bytes: 512 << 20,
        }
    }
}

/// The largest state file accepted; real ones are under 200 bytes, so more
/// than this is an error page or junk.
const MAX_STATE_BYTES: u64 = 64 << 10;

/// Opens the feed at `url_or_dir`: an `http://` or `https://` URL, a
/// `file://` URL, or a local directory path. The root `state.txt` is not
/// read yet, so this does no network I/O; a malformed URL or a missing
/// directory is a fatal [`ReplicationError::Config`].
pub fn open_source(
    url_or_dir: &str,
    options: &SourceOptions,
) -> Result<Box<dyn Source>, ReplicationError> {
    if strip_scheme(url_or_dir, "http://").is_some()
        || strip_scheme(url_or_dir, "https://").is_some()
    {
        Ok(Box::new(HttpSource::new(url_or_dir, options)?))
    } else if let Some(path) = strip_scheme(url_or_dir, "file://") {
        Ok(Box::new(DirSource::new(path, options)?))
    } else if let Some((scheme, _)) = url_or_dir.split_once("://") {
        Err(ReplicationError::Config(format!(
            "unsupported replication URL scheme {scheme:?} in {url_or_dir:?}: \
             use http://, https://, file:// or a directory path"
        )))
    } else {
        Ok(Box::new(DirSource::new(url_or_dir, options)?))
    }
}

/// `text` without `scheme` (matched case-insensitively), if it starts with it.
fn strip_scheme<'a>(text: &'a str, scheme: &str) -> Option<&'a str> {
    let prefix = text.get(..scheme.len())?;
    prefix
        .eq_ignore_ascii_case(scheme)
        .then(|| &text[scheme.len()..])
}

/// Names a state file in messages.
fn state_name(seq: Option<u64>, location: &str) -> String {
    match seq {
        Some(seq) => format!("state of sequence {seq} ({location})"),
        None => format!("latest state ({location})"),
    }
}

/// Parses a fetched state file, checking that a numbered one describes the
/// sequence it was fetched for (a mirror serving the wrong file would
/// otherwise send the follower backwards or make it skip diffs).
fn decode_state(
    what: String,
    bytes: &[u8],
    expected: Option<u64>,
) -> Result<ReplicationState, ReplicationError> {
    let state = parse_state(&what, &String::from_utf8_lossy(bytes))?;
    match expected {
        Some(expected) if state.sequence != expected => Err(ReplicationError::BadState {
            what,
            reason: format!("it says sequenceNumber={}", state.sequence),
        }),
        _ => Ok(state),
    }
}

/// A feed in a local directory (a mirror, or a test replica).
#[derive(Debug, Clone)]
pub struct DirSource {
    root: PathBuf,
    max_diff_bytes: u64,
}

impl DirSource {
    /// A source reading `root`, which must be an existing directory.
    pub fn new(
        root: impl Into<PathBuf>,
        options: &SourceOptions,
    ) -> Result<Self, ReplicationError> {
        let root = root.into();
        match std::fs::metadata(&root) {
            Ok(metadata) if metadata.is_dir() => Ok(Self {
                root,
                max_diff_bytes: options.max_diff_bytes,
            }),
            Ok(_) => Err(ReplicationError::Config(format!(
                "replication source {} is not a directory",
                root.display()
            ))),
            Err(error) => Err(ReplicationError::Config(format!(
                "cannot open replication directory {}: {error}",
                root.display()
            ))),
        }
    }

    /// The bytes of `relative` under the root, `None` if it does not exist.
    fn read(&self, relative: &str, limit: u64) -> Result<Option<Vec<u8>>, ReplicationError> {
        let path = self.root.join(relative);
        let io_error = |error| ReplicationError::Io {
            path: path.clone(),
            error,
        };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error(error)),
        };
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        if bytes.len() as u64 > limit {
            return Err(ReplicationError::TooLarge {
                what: path.display().to_string(),
                limit,
            });
        }
        Ok(Some(bytes))
    }

    fn location(&self, relative: &str) -> String {
        self.root.join(relative).display().to_string()
    }
}

impl Source for DirSource {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn latest_state(&self) -> Result<ReplicationState, ReplicationError> {
        let relative = "state.txt";
        let what = self.location(relative);
        match self.read(relative, MAX_STATE_BYTES)? {
            Some(bytes) => decode_state(state_name(None, &what), &bytes, None),
            None => Err(ReplicationError::NotFound { what }),
        }
    }

    fn state(&self, seq: u64) -> Result<Option<ReplicationState>, ReplicationError> {
        let relative = format!("{}.state.txt", sequence_path(seq));
        self.read(&relative, MAX_STATE_BYTES)?
            .map(|bytes| {
                decode_state(
                    state_name(Some(seq), &self.location(&relative)),
                    &bytes,
                    Some(seq),
                )
            })
            .transpose()
    }

    fn diff(&self, seq: u64) -> Result<Option<Vec<u8>>, ReplicationError> {
        self.read(
            &format!("{}.osc.gz", sequence_path(seq)),
            self.max_diff_bytes,
        )
    }
}

/// A feed on an HTTP(S) server, e.g.
/// `https://planet.openstreetmap.org/replication/minute`.
#[derive(Debug)]
pub struct HttpSource {
    /// The base URL without a trailing slash.
    base: String,
    agent: ureq::Agent,
    max_diff_bytes: u64,
}

/// Sent with every request: the OSMF's tile and planet usage policies ask
/// clients to identify themselves.
const USER_AGENT: &str = concat!(
    "osmvec/",
    env!("CARGO_PKG_VERSION"),
    " (OpenStreetMap replication follower)"
);

impl HttpSource {
    /// A source for the feed at `base_url` (`http://` or `https://`, with or
    /// without a trailing slash). Fails only on a malformed URL; nothing is
    /// fetched yet.
    pub fn new(base_url: &str, options: &SourceOptions) -> Result<Self, ReplicationError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let valid = format!("{base}/state.txt")
            .parse::<ureq::http::Uri>()
            .is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|host| !host.is_empty())
                    && uri.query().is_none()
            });
        if !valid {
            return Err(ReplicationError::Config(format!(
                "invalid replication URL {base_url:?}: expected http(s)://host/path \
                 without a query string"
            )));
        }
        let https = strip_scheme(&base, "https://").is_some();
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = &options.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                ReplicationError::Config(format!("cannot read CA file {}: {e}", path.display()))
            })?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ReplicationError::Config(format!("CA file {}: {e}", path.display()))
                })?;
            if certs.is_empty() {
                return Err(ReplicationError::Config(format!(
                    "CA file {} holds no certificate",
                    path.display()
                )));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)));
        }
        let agent = ureq::Agent::config_builder()
            // 404 is an answer ("not published yet"), not a failure, and other
            // statuses are classified here, with the URL in the error.
            .http_status_as_error(false)
            .timeout_connect(Some(options.connect_timeout))
            .timeout_per_read(Some(options.read_timeout))
            .timeout_per_write(Some(options.read_timeout))
            .timeout_global(Some(options.fetch_timeout))
            // A feed given as https:// stays on https: a redirect to an
            // http:// URL (a downgrade an attacker on the path could then
            // exploit) is an error, not followed.
            .https_only(https)
            .max_redirects(5)
            .tls_config(tls.build())
            .user_agent(USER_AGENT)
            // Diffs are gzip files already; asking for identity keeps servers
            // from wrapping them (or state files) in a second encoding.
            .accept_encoding("identity")
            .build()
            .new_agent();
        Ok(Self {
            base,
            agent,
            max_diff_bytes: options.max_diff_bytes,
        })
    }

    fn url(&self, relative: &str) -> String {
        format!("{}/{relative}", self.base)
    }

    /// GETs `url`: the body on success, `None` on 404, an error otherwise.
    fn fetch(&self, url: &str, limit: u64) -> Result<Option<Vec<u8>>, ReplicationError> {
        let transport = |error| match error {
            ureq::Error::RequireHttpsOnly(to) => ReplicationError::Config(format!(
                "{url} redirected to {to}: refusing to leave https for http"
            )),
            error => ReplicationError::Transport {
                url: url.to_owned(),
                error,
            },
        };
        let response = self.agent.get(url).call().map_err(transport)?;
        let status = response.status().as_u16();
        tracing::debug!(url, status, "replication fetch");
        match status {
            200..=299 => {}
            404 => return Ok(None),
            _ => {
                return Err(ReplicationError::Http {
                    url: url.to_owned(),
                    status,
                });
            }
        }
        match response
            .into_body()
            .into_with_config()
            .limit(limit)
            .read_to_vec()
        {
            Ok(bytes) => Ok(Some(bytes)),
            Err(ureq::Error::BodyExceedsLimit(_)) => Err(ReplicationError::TooLarge {
                what: url.to_owned(),
                limit,
            }),
            Err(error) => Err(transport(error)),
        }
    }
}

impl Source for HttpSource {
    fn describe(&self) -> String {
        self.base.clone()
    }

    fn latest_state(&self) -> Result<ReplicationState, ReplicationError> {
        let url = self.url("state.txt");
        match self.fetch(&url, MAX_STATE_BYTES)? {
            Some(bytes) => decode_state(state_name(None, &url), &bytes, None),
            None => Err(ReplicationError::NotFound { what: url }),
        }
    }

    fn state(&self, seq: u64) -> Result<Option<ReplicationState>, ReplicationError> {
        let url = self.url(&format!("{}.state.txt", sequence_path(seq)));
        self.fetch(&url, MAX_STATE_BYTES)?
            .map(|bytes| decode_state(state_name(Some(seq), &url), &bytes, Some(seq)))
            .transpose()
    }

    fn diff(&self, seq: u64) -> Result<Option<Vec<u8>>, ReplicationError> {
        let url = self.url(&format!("{}.osc.gz", sequence_path(seq)));
        self.fetch(&url, self.max_diff_bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::replication::test_util::{HttpFixture, TempDir, data_path};
    use crate::replication::{Backoff, with_retry};

    const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

    fn maldives_dir() -> PathBuf {
        data_path("replication/maldives/minute")
    }

    fn fast_retry(max_attempts: u32) -> Backoff {
        Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
            max_attempts: Some(max_attempts),
        }
    }

    /// Options with short timeouts, so that a hung test fails quickly.
    fn test_options() -> SourceOptions {
        SourceOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            ..SourceOptions::default()
        }
    }

    /// The checks every source of the Maldives replica must pass.
    fn check_maldives(source: &dyn Source) {
        let latest = source.latest_state().unwrap();
        assert_eq!(latest.sequence, 180);
        assert_eq!(latest.to_string(), "sequence 180 at 2017-03-01T10:49:00Z");
        let state = source.state(90).unwrap().unwrap();
        assert_eq!(state.sequence, 90);
        assert_eq!(state.timestamp, latest.timestamp - 90 * 60);
        assert_eq!(source.state(181).unwrap(), None);

        let diff = source.diff(1).unwrap().unwrap();
        assert_eq!(diff[..2], GZIP_MAGIC);
        let on_disk = std::fs::read(maldives_dir().join("000/000/001.osc.gz")).unwrap();
        assert_eq!(diff, on_disk);
        assert_eq!(source.diff(181).unwrap(), None);
    }

    #[test]
    fn dir_source_reads_the_maldives_replica() {
        let source = DirSource::new(maldives_dir(), &SourceOptions::default()).unwrap();
        check_maldives(&source);
        assert_eq!(source.describe(), maldives_dir().display().to_string());
    }

    #[test]
    fn dir_source_rejects_bad_and_mismatched_states() {
        let dir = TempDir::new();
        dir.write("state.txt", b"<html>oops</html>");
        dir.write(
            "000/000/005.state.txt",
            b"sequenceNumber=6\ntimestamp=2020-01-01T00\\:00\\:00Z\n",
        );
        dir.write("000/000/005.osc.gz", &[0x1f, 0x8b, 0, 0, 0]);
        let options = SourceOptions {
            max_diff_bytes: 4,
            ..SourceOptions::default()
        };
        let source = DirSource::new(dir.path(), &options).unwrap();

        let err = source.latest_state().unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.to_string().starts_with("invalid latest state ("),
            "{err}"
        );
        assert!(err.to_string().contains("no sequenceNumber= line"), "{err}");

        let err = source.state(5).unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.to_string().contains("state of sequence 5 (")
                && err
                    .to_string()
                    .ends_with("005.state.txt): it says sequenceNumber=6"),
            "{err}"
        );

        let err = source.diff(5).unwrap_err();
        assert!(
            matches!(err, ReplicationError::TooLarge { limit: 4, .. }),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn dir_source_without_state_txt_is_not_a_feed() {
        let dir = TempDir::new();
        let source = DirSource::new(dir.path(), &SourceOptions::default()).unwrap();
        let err = source.latest_state().unwrap_err();
        assert!(matches!(err, ReplicationError::NotFound { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(
            err.to_string().contains("state.txt does not exist"),
            "{err}"
        );
        assert_eq!(source.state(0).unwrap(), None);
    }

    #[test]
    fn open_source_chooses_by_scheme() {
        let options = SourceOptions::default();
        let dir = maldives_dir().display().to_string();
        assert_eq!(open_source(&dir, &options).unwrap().describe(), dir);
        let file_url = format!("FILE://{dir}");
        assert_eq!(open_source(&file_url, &options).unwrap().describe(), dir);
        let http = open_source(
            "https://planet.openstreetmap.org/replication/minute/",
            &options,
        );
        assert_eq!(
            http.unwrap().describe(),
            "https://planet.openstreetmap.org/replication/minute"
        );
        assert_eq!(
            open_source("HTTP://localhost:8080/feed", &options)
                .unwrap()
                .describe(),
            "HTTP://localhost:8080/feed"
        );

        for (input, expected) in [
            (
                "ftp://example.org/feed",
                "unsupported replication URL scheme \"ftp\"",
            ),
            ("http://", "invalid replication URL"),
            ("http://exa mple.org/", "invalid replication URL"),
            ("https://example.org/feed?x=1", "invalid replication URL"),
            (
                "/nonexistent/osmvec/feed",
                "cannot open replication directory",
            ),
            (
                concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
                "is not a directory",
            ),
        ] {
            let err = open_source(input, &options).err().unwrap();
            assert!(matches!(err, ReplicationError::Config(_)), "{err:?}");
            assert!(!err.is_retryable());
            assert!(err.to_string().contains(expected), "{input}: {err}");
        }
    }

    #[test]
    fn http_source_reads_the_maldives_replica() {
        let server = HttpFixture::start(&maldives_dir(), &[]);
        let source = HttpSource::new(&server.url("/"), &test_options()).unwrap();
        check_maldives(&source);
    }

    #[test]
    fn http_source_serves_feeds_below_the_root() {
        let server = HttpFixture::start(&data_path("replication"), &[]);
        let source = open_source(&server.url("/andorra/day"), &test_options()).unwrap();
        assert_eq!(source.latest_state().unwrap().sequence, 35);
        assert_eq!(source.diff(35).unwrap().unwrap()[..2], GZIP_MAGIC);
        // A wrong base URL: the root state.txt is missing, which is fatal.
        let wrong = open_source(&server.url("/andorra"), &test_options()).unwrap();
        let err = wrong.latest_state().unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            format!(
                "{} does not exist; is this the root of a replication feed?",
                server.url("/andorra/state.txt")
            )
        );
    }

    #[test]
    fn http_retry_succeeds_on_the_third_attempt() {
        let server = HttpFixture::start(&maldives_dir(), &["--fail-first", "2"]);
        let source = HttpSource::new(&server.url(""), &test_options()).unwrap();
        let mut attempts = 0;
        let diff = with_retry(&fast_retry(5), "fetching diff 1", || {
            attempts += 1;
            source.diff(1)
        })
        .unwrap()
        .unwrap();
        assert_eq!(attempts, 3);
        assert_eq!(diff[..2], GZIP_MAGIC);

        // The failures are counted per path: state.txt fails twice too.
        let err = source.latest_state().unwrap_err();
        assert!(err.is_retryable());
        assert!(
            matches!(err, ReplicationError::Http { status: 500, .. }),
            "{err:?}"
        );
        let mut attempts = 0;
        let latest = with_retry(&fast_retry(5), "fetching state.txt", || {
            attempts += 1;
            source.latest_state()
        })
        .unwrap();
        assert_eq!((latest.sequence, attempts), (180, 2));
    }

    #[test]
    fn http_errors_forever_exhaust_the_retries_and_name_the_url() {
        let server = HttpFixture::start(&maldives_dir(), &["--fail-first", "1000000"]);
        let source = HttpSource::new(&server.url("/"), &test_options()).unwrap();
        let mut attempts = 0;
        let err = with_retry(&fast_retry(4), "fetching diff 7", || {
            attempts += 1;
            source.diff(7)
        })
        .unwrap_err();
        assert_eq!(attempts, 4);
        assert!(
            matches!(err, ReplicationError::RetriesExhausted { attempts: 4, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "fetching diff 7: gave up after 4 attempts: HTTP status 500 from {}",
                server.url("/000/000/007.osc.gz")
            )
        );
    }

    #[test]
    fn http_client_errors_are_fatal_and_not_retried() {
        let server = HttpFixture::start(
            &maldives_dir(),
            &["--fail-first", "1000000", "--fail-status", "403"],
        );
        let source = HttpSource::new(&server.url("/"), &test_options()).unwrap();
        let mut attempts = 0;
        let err = with_retry(&fast_retry(4), "fetching state 3", || {
            attempts += 1;
            source.state(3)
        })
        .unwrap_err();
        assert_eq!(attempts, 1);
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            format!(
                "HTTP status 403 from {}",
                server.url("/000/000/003.state.txt")
            )
        );
    }

    #[test]
    fn http_rate_limiting_is_retryable() {
        let server = HttpFixture::start(
            &maldives_dir(),
            &["--fail-first", "1", "--fail-status", "429"],
        );
        let source = HttpSource::new(&server.url("/"), &test_options()).unwrap();
        let err = source.state(3).unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(source.state(3).unwrap().unwrap().sequence, 3);
    }

    #[test]
    fn connection_refused_is_retryable() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/feed");
        let source = HttpSource::new(&url, &test_options()).unwrap();
        let err = source.latest_state().unwrap_err();
        assert!(matches!(err, ReplicationError::Transport { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert!(
            err.to_string()
                .starts_with(&format!("cannot fetch {url}/state.txt: ")),
            "{err}"
        );
    }

    #[test]
    fn a_stalled_server_times_out_and_is_retryable() {
        let server = HttpFixture::start(&maldives_dir(), &["--delay-ms", "2000"]);
        let options = SourceOptions {
            read_timeout: Duration::from_millis(200),
            ..test_options()
        };
        let source = HttpSource::new(&server.url("/"), &options).unwrap();
        let err = source.state(1).unwrap_err();
        assert!(
            matches!(
                err,
                ReplicationError::Transport {
                    error: ureq::Error::Timeout(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_retryable());
    }

    #[test]
    fn http_garbled_state_is_fatal_and_named() {
        let dir = TempDir::new();
        dir.write(
            "state.txt",
            b"---\nlast_run: 2020-10-08 22:30:01.737719000 +00:00\nsequence: 4139992\n",
        );
        dir.write("000/000/001.osc.gz", &[0x1f, 0x8b, 1, 2, 3, 4, 5, 6]);
        let server = HttpFixture::start(dir.path(), &[]);
        let options = SourceOptions {
            max_diff_bytes: 7,
            ..test_options()
        };
        let source = HttpSource::new(&server.url("/"), &options).unwrap();
        let err = source.latest_state().unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.to_string().starts_with(&format!(
                "invalid latest state ({}): this is the YAML state of the changeset",
                server.url("/state.txt")
            )),
            "{err}"
        );
        let err = source.diff(1).unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            format!(
                "{} is larger than the limit of 7 bytes",
                server.url("/000/000/001.osc.gz")
            )
        );
    }

    #[test]
    fn sequences_appear_as_they_are_published() {
        let server = HttpFixture::start(&maldives_dir(), &["--hide-after", "10"]);
        let source = HttpSource::new(&server.url("/"), &test_options()).unwrap();
        assert_eq!(source.latest_state().unwrap().sequence, 10);
        assert_eq!(source.state(11).unwrap(), None);
        assert_eq!(source.diff(11).unwrap(), None);
        assert!(source.diff(10).unwrap().is_some());

        server.publish(12);
        assert_eq!(source.latest_state().unwrap().sequence, 12);
        assert_eq!(source.state(11).unwrap().unwrap().sequence, 11);
        assert!(source.diff(12).unwrap().is_some());
        assert_eq!(source.diff(13).unwrap(), None);
    }

    #[test]
    fn a_trickling_server_cannot_hold_a_fetch_past_its_deadline() {
        // About 100 bytes of state.txt, one byte every 100 ms: no read ever
        // stalls for the 5 s read timeout, and the whole answer would take
        // ten seconds.
        let server = HttpFixture::start(&maldives_dir(), &["--trickle-ms", "100"]);
        let options = SourceOptions {
            read_timeout: Duration::from_secs(5),
            fetch_timeout: Duration::from_secs(1),
            ..test_options()
        };
        let source = HttpSource::new(&server.url("/"), &options).unwrap();
        let err = source.latest_state().unwrap_err();
        assert!(
            matches!(
                err,
                ReplicationError::Transport {
                    error: ureq::Error::Timeout(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_retryable());
    }

    #[test]
    fn redirects_are_followed_within_http() {
        let target = HttpFixture::start(&maldives_dir(), &[]);
        let server = HttpFixture::start(&maldives_dir(), &["--redirect-to", &target.url("")]);
        let source = HttpSource::new(&server.url("/"), &test_options()).unwrap();
        assert_eq!(source.latest_state().unwrap().sequence, 180);
    }

    /// A test CA and a certificate for 127.0.0.1 signed by it (openssl), in
    /// `dir`: (CA file, certificate, key).
    fn test_certificates(dir: &TempDir) -> (PathBuf, PathBuf, PathBuf) {
        let p = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            let status = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl runs");
            assert!(status.success(), "openssl {args:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=osmvec test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ]);
        std::fs::write(
            p("leaf.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ]);
        (p("ca.pem"), p("cert.pem"), p("key.pem"))
    }

    #[test]
    fn an_https_feed_never_follows_a_redirect_to_http() {
        let dir = TempDir::new();
        let (ca, cert, key) = test_certificates(&dir);
        let tls = ["--tls", cert.to_str().unwrap(), key.to_str().unwrap()];
        let options = SourceOptions {
            ca_file: Some(ca),
            ..test_options()
        };
        // The HTTPS feed itself works (the CA file is trusted)...
        let https = HttpFixture::start(&maldives_dir(), &tls);
        let url = https.url("/").replacen("http://", "https://", 1);
        check_maldives(&HttpSource::new(&url, &options).unwrap());
        // ...but when it redirects to plain http, nothing is fetched there.
        let plain = HttpFixture::start(&maldives_dir(), &[]);
        let mut flags = tls.to_vec();
        let to = plain.url("");
        flags.extend(["--redirect-to", &to]);
        let downgrading = HttpFixture::start(&maldives_dir(), &flags);
        let url = downgrading.url("/").replacen("http://", "https://", 1);
        let source = HttpSource::new(&url, &options).unwrap();
        let err = source.latest_state().unwrap_err();
        assert!(!err.is_retryable(), "{err:?}");
        assert!(
            err.to_string().contains("refusing to leave https for http"),
            "{err}"
        );
        let err = source.diff(1).unwrap_err();
        assert!(matches!(err, ReplicationError::Config(_)), "{err:?}");
    }

    #[test]
    fn sends_an_osmvec_user_agent() {
        assert!(USER_AGENT.starts_with(&format!("osmvec/{} ", env!("CARGO_PKG_VERSION"))));
    }
}
