//! `osmvec`: the command-line edge. Parses arguments, sets up logging and
//! turns library errors into messages and exit codes.

use std::io::{BufWriter, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use osmvec::cli;
use osmvec_model::Device;

#[derive(Parser)]
#[command(
    name = "osmvec",
    version,
    about = "Keeps learned location embeddings of OpenStreetMap fresh while the map changes"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OSMVEC_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Import extracts (.osm.pbf, .osm, .osm.gz, .osm.bz2) into a store; several
    /// files merge, the highest version of an object wins.
    Import(ImportCmd),
    /// Print store statistics.
    Stats(StatsCmd),
    /// Write every stored object (as osmium's `cat -f opl,add_metadata=version`).
    Export(ExportCmd),
    /// Write tile embeddings to a file where data people work: GeoParquet
    /// (GeoPandas, DuckDB, QGIS), plain Parquet, or a NumPy matrix with a
    /// CSV of its tiles. Streams in bounded memory; the file appears only
    /// when complete (docs/export.md).
    ExportEmbeddings(ExportEmbeddingsCmd),
    /// The location encoder of a checkpoint on many points at once: from a
    /// CSV or Parquet file of lon/lat (an `id` column is carried over) or a
    /// grid over a bbox; writes Parquet with an `embedding` column.
    EmbedPoints(EmbedPointsCmd),
    /// Apply osmChange files (.osc, .osc.gz) in the given order, each in one
    /// atomic write. Does not move the replication sequence (see `replicate`).
    Apply(ApplyCmd),
    /// Follow a replication feed (URL or directory) and apply every diff in order.
    Replicate(ReplicateCmd),
    /// Train the graph and location encoders contrastively on a store's
    /// training blocks; resumes when OUT already holds a checkpoint.
    Train(TrainCmd),
    /// Embed tiles with a checkpoint into the store: the dirty ones (default)
    /// or all; clears the dirty marks handled.
    Embed(EmbedCmd),
    /// Benchmark: one daemon embedding cycle with a backlog of FILLER more
    /// dirty marks (run on a copy of a store: it writes marks and
    /// embeddings). Prints JSON.
    BenchCycle(BenchCycleCmd),
    /// Benchmark helper: how the tile embeddings of two stores differ
    /// (same tiles, largest component difference). Prints JSON.
    CompareEmbeddings(CompareEmbeddingsCmd),
    /// The daemon: follow the replication source, embed dirty tiles, publish
    /// changes and embeddings to Kafka through the store's outbox.
    Run(RunCmd),
    /// An embedding worker: embeds jobs from the ingest daemon
    /// (`run --mode ingest`) in a consumer group (docs/scaling.md).
    Worker(WorkerCmd),
    /// Print `lat,lon` of the centre of every fine tile of the store's
    /// coarse tiles (land and sea alike): the points for
    /// `ops/external-labels.sh`, whose output `eval --external-labels` reads.
    LabelPoints(LabelPointsCmd),
    /// Evaluate a checkpoint on test blocks (retrieval, land-use probe,
    /// optionally labels from outside OSM) against an untrained model, k-NN
    /// on coordinates, raw spherical harmonics (L = 10, 40) and the majority
    /// class, with block-bootstrap 95 % intervals.
    Eval(EvalCmd),
}

/// Where the model runs and where the text model lives.
#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", env = "OSMVEC_DEVICE")]
    device: String,
    /// Directory of all-MiniLM-L6-v2 (default: $OSMVEC_MODEL_DIR, else ~/.cache/osmvec/all-MiniLM-L6-v2).
    #[arg(long)]
    text_model_dir: Option<PathBuf>,
}

impl ModelArgs {
    fn resolve(&self) -> anyhow::Result<(osmvec_model::Device, PathBuf)> {
        Ok((
            osmvec_pipeline::device(&self.device)?,
            self.text_model_dir
                .clone()
                .unwrap_or_else(osmvec_pipeline::train::default_model_dir),
        ))
    }
}

/// A flag that SIGTERM and SIGINT set: long commands finish the step in
/// progress, save or flush, and exit 0.
fn stop_on_signals() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    Ok(stop)
}

fn print_report<T: serde::Serialize>(report: &T, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    Opl,
}

#[derive(Clone, Copy, ValueEnum)]
enum EmbeddingFormat {
    Geoparquet,
    Parquet,
    Npy,
}

fn parse_bbox_arg(s: &str) -> Result<[f64; 4], String> {
    osmvec::export::parse_bbox(s)
}

fn parse_step_m(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 1.0 => Ok(v),
        _ => Err(format!(
            "step must be a number of metres, at least 1, got {s:?}"
        )),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OSMVEC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => b.json().init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Import(c) => c.run(),
        Command::Stats(c) => c.run(),
        Command::Export(c) => c.run(),
        Command::Apply(c) => c.run(),
        Command::ExportEmbeddings(c) => c.run(),
        Command::EmbedPoints(c) => c.run(),
        Command::Replicate(c) => c.run(),
        Command::Train(c) => c.run(),
        Command::Embed(c) => c.run(),
        Command::BenchCycle(c) => c.run(),
        Command::CompareEmbeddings(c) => c.run(),
        Command::Run(c) => c.run(),
        Command::Worker(c) => c.run(),
        Command::LabelPoints(c) => c.run(),
        Command::Eval(c) => c.run(),
    }
}

#[derive(clap::Args)]
struct ImportCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    /// Fine (embedding) zoom; only used when the store is created.
    #[arg(long, default_value_t = 15)]
    fine_zoom: u8,
    /// Coarse (context) zoom; only used when the store is created.
    #[arg(long, default_value_t = 12)]
    coarse_zoom: u8,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

impl ImportCmd {
    fn run(self) -> anyhow::Result<()> {
        let ImportCmd {
            store,
            fine_zoom,
            coarse_zoom,
            json,
            files,
        } = self;
        cli::import(&store, &files, fine_zoom, coarse_zoom, json)
    }
}

#[derive(clap::Args)]
struct StatsCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

impl StatsCmd {
    fn run(self) -> anyhow::Result<()> {
        let StatsCmd { store, json } = self;
        cli::stats(&store, json)
    }
}

#[derive(clap::Args)]
struct ExportCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Opl)]
    format: ExportFormat,
    /// Output file (default: stdout).
    #[arg(long, short)]
    output: Option<PathBuf>,
}

impl ExportCmd {
    fn run(self) -> anyhow::Result<()> {
        let ExportCmd {
            store,
            format: ExportFormat::Opl,
            output,
        } = self;
        let st = osmvec_graphstore::Store::open_read_only(&store)?;
        st.ensure_consistent()?;
        match output {
            Some(p) => {
                let f = std::fs::File::create(&p)
                    .with_context(|| format!("cannot create {}", p.display()))?;
                st.export_opl(&mut BufWriter::new(f))?;
            }
            None => {
                st.export_opl(&mut BufWriter::new(std::io::stdout().lock()))?;
            }
        }
        Ok(())
    }
}

#[derive(clap::Args)]
struct ExportEmbeddingsCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    /// The fine tiles intersecting W,S,E,N (degrees, edges included).
    #[arg(long, value_parser = parse_bbox_arg, allow_hyphen_values = true, required_unless_present = "all", conflicts_with = "all")]
    bbox: Option<[f64; 4]>,
    /// Every stored tile embedding.
    #[arg(long)]
    all: bool,
    #[arg(long, value_enum, default_value_t = EmbeddingFormat::Geoparquet)]
    format: EmbeddingFormat,
    /// Output file (`.npy` also writes FILE.tiles.csv).
    #[arg(long, short)]
    output: PathBuf,
    /// Print the summary as one JSON line.
    #[arg(long)]
    json: bool,
}

impl ExportEmbeddingsCmd {
    fn run(self) -> anyhow::Result<()> {
        let ExportEmbeddingsCmd {
            store,
            bbox,
            all: _,
            format,
            output,
            json,
        } = self;
        // Read-only: an export runs beside the daemon that owns the
        // store, on the state as of its start.
        let st = osmvec_graphstore::Store::open_read_only(&store)?;
        st.ensure_consistent()?;
        let format = match format {
            EmbeddingFormat::Geoparquet => osmvec::export::Format::GeoParquet,
            EmbeddingFormat::Parquet => osmvec::export::Format::Parquet,
            EmbeddingFormat::Npy => osmvec::export::Format::Npy,
        };
        let report = osmvec::export::export_embeddings(&st, bbox, format, &output)?;
        print_report(&report, json)
    }
}

#[derive(clap::Args)]
struct EmbedPointsCmd {
    #[arg(long, env = "OSMVEC_CHECKPOINT")]
    checkpoint: PathBuf,
    /// CSV (header row with lon/lat or longitude/latitude) or .parquet.
    #[arg(long, required_unless_present = "bbox", conflicts_with = "bbox")]
    input: Option<PathBuf>,
    /// A grid over W,S,E,N (degrees) instead of an input file.
    #[arg(long, value_parser = parse_bbox_arg, allow_hyphen_values = true, requires = "step_m")]
    bbox: Option<[f64; 4]>,
    /// Grid spacing in metres (with --bbox).
    #[arg(long, value_parser = parse_step_m)]
    step_m: Option<f64>,
    /// Refuse inputs or grids of more points than this.
    #[arg(long, default_value_t = 50_000_000)]
    max_points: u64,
    #[arg(long, short)]
    output: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", env = "OSMVEC_DEVICE")]
    device: String,
    /// Print the summary as one JSON line.
    #[arg(long)]
    json: bool,
}

impl EmbedPointsCmd {
    fn run(self) -> anyhow::Result<()> {
        let EmbedPointsCmd {
            checkpoint,
            input,
            bbox,
            step_m,
            max_points,
            output,
            device,
            json,
        } = self;
        let device = osmvec_pipeline::device(&device)?;
        let model = osmvec_pipeline::checkpoint::Model::load(&checkpoint, &device)?;
        let points = match (input, bbox, step_m) {
            (Some(p), _, _) => osmvec::export::points::Points::File(p),
            (None, Some(bbox), Some(step_m)) => {
                osmvec::export::points::Points::Grid { bbox, step_m }
            }
            _ => anyhow::bail!("give --input FILE, or --bbox W,S,E,N with --step-m M"),
        };
        let report = osmvec::export::points::embed_points(
            &model,
            &checkpoint,
            &points,
            &output,
            max_points,
        )?;
        print_report(&report, json)
    }
}

#[derive(clap::Args)]
struct ApplyCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    /// Print one JSON report per file.
    #[arg(long)]
    json: bool,
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

impl ApplyCmd {
    fn run(self) -> anyhow::Result<()> {
        let ApplyCmd { store, json, files } = self;
        cli::apply(&store, &files, json)
    }
}

#[derive(clap::Args)]
struct ReplicateCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    /// Base URL (https://…/replication/minute) or local directory.
    #[arg(long, env = "OSMVEC_SOURCE")]
    source: String,
    /// Exit 0 once no newer sequence is published.
    #[arg(long)]
    until_caught_up: bool,
    /// Seconds between polls once caught up.
    #[arg(long, alias = "poll-interval-seconds", default_value = "30", value_parser = cli::parse_seconds)]
    poll_interval: std::time::Duration,
    /// Stop after this many diffs (for tests and benchmarks).
    #[arg(long)]
    max_diffs: Option<u64>,
    /// Give up on a failing request after this many attempts (default: retry forever).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// First retry delay in seconds (doubles per attempt, with jitter).
    #[arg(long, default_value = "1", value_parser = cli::parse_seconds)]
    retry_initial: std::time::Duration,
    /// Longest retry delay in seconds.
    #[arg(long, default_value = "300", value_parser = cli::parse_seconds)]
    retry_max: std::time::Duration,
    /// Longest time one HTTP request may take in all, seconds.
    #[arg(long, alias = "fetch-timeout-seconds", default_value = "600", value_parser = cli::parse_seconds)]
    fetch_timeout: std::time::Duration,
    /// Largest diff accepted, bytes, downloaded and decompressed (guards
    /// against gzip bombs).
    #[arg(long, default_value_t = 1 << 30)]
    max_diff_bytes: u64,
    /// Print one JSON line per applied diff on stdout.
    #[arg(long)]
    json: bool,
}

impl ReplicateCmd {
    fn run(self) -> anyhow::Result<()> {
        let ReplicateCmd {
            store,
            source,
            until_caught_up,
            poll_interval,
            max_diffs,
            max_attempts,
            retry_initial,
            retry_max,
            fetch_timeout,
            max_diff_bytes,
            json,
        } = self;
        cli::replicate(cli::ReplicateArgs {
            retry_initial,
            retry_max,
            fetch_timeout,
            store,
            source,
            until_caught_up,
            poll_interval,
            max_diffs,
            max_attempts,
            max_diff_bytes,
            json,
        })
    }
}

#[derive(clap::Args)]
struct TrainCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    /// Checkpoint directory (created; resumed if it holds one).
    #[arg(long)]
    out: PathBuf,
    /// Total optimiser steps (a resumed run continues up to this count).
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Tiles per step.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 3e-4)]
    learning_rate: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 10)]
    warmup_steps: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Spherical-harmonics degree L of the location encoder (OSMGraphCLIP uses 10 or 40).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=40))]
    degree: u16,
    /// Major model version of a new checkpoint (`N.0`).
    #[arg(long, default_value_t = 1)]
    major_version: u32,
    /// How tags become texts in a new checkpoint: one per tag (osmvec)
    /// or one label per feature (OSMGraphCLIP).
    #[arg(long, value_enum, default_value_t = TagTextsArg::PerTag)]
    tag_texts: TagTextsArg,
    /// SIREN dropout rate during training of a new checkpoint (SatCLIP
    /// uses 0.5; inference never drops).
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    save_every: u64,
    /// Train through the reference forward pass instead of engine v2
    /// (same steps up to float rounding, slower; for benchmarks).
    #[arg(long)]
    reference: bool,
    #[command(flatten)]
    model: ModelArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

impl TrainCmd {
    fn run(self) -> anyhow::Result<()> {
        let TrainCmd {
            store,
            out,
            steps,
            batch_size,
            learning_rate,
            warmup_steps,
            seed,
            degree,
            major_version,
            save_every,
            reference,
            tag_texts,
            dropout,
            model,
            json,
        } = self;
        let (device, model_dir) = model.resolve()?;
        let stop = stop_on_signals()?;
        let store = osmvec_graphstore::Store::open(&store)?;
        let bar = osmvec::cli::progress_bar(
            steps,
            "training {bar:30} {pos}/{len} steps {per_sec} eta {eta} {msg}",
        );
        let report = osmvec_pipeline::train::train(
            &store,
            &osmvec_pipeline::train::TrainConfig {
                out,
                steps,
                batch_size,
                learning_rate,
                warmup_steps,
                seed,
                degree: degree as usize,
                major_version,
                save_every,
                model_dir,
                device,
                reference,
                tag_texts: tag_texts.into(),
                dropout,
            },
            &mut |p| {
                bar.set_position(p.step);
                bar.set_message(format!("loss {:.4}", p.loss));
            },
            &stop,
        )?;
        bar.finish_and_clear();
        print_report(&report, json)
    }
}

#[derive(clap::Args)]
struct EmbedCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    #[arg(long, env = "OSMVEC_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Every tile with features (and drop embeddings of empty tiles).
    #[arg(long, conflicts_with = "dirty")]
    all: bool,
    /// Only dirty tiles (the default).
    #[arg(long)]
    dirty: bool,
    /// Tiles per encoder batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Use the reference forward pass (the op-by-op encoder engine v2 is
    /// checked against) instead of engine v2: same vectors, slower.
    #[arg(long)]
    reference: bool,
    #[command(flatten)]
    model: ModelArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

impl EmbedCmd {
    fn run(self) -> anyhow::Result<()> {
        let EmbedCmd {
            store,
            checkpoint,
            all,
            dirty: _,
            batch_size,
            reference,
            model,
            json,
        } = self;
        let (device, model_dir) = model.resolve()?;
        let store = osmvec_graphstore::Store::open(&store)?;
        // Made at the first report, when the number of tiles is known.
        let mut bar: Option<indicatif::ProgressBar> = None;
        let report = osmvec_pipeline::embed::embed(
            &store,
            &osmvec_pipeline::embed::EmbedConfig {
                checkpoint,
                all,
                batch_size,
                model_dir,
                device,
                reference,
            },
            &mut |p| {
                bar.get_or_insert_with(|| {
                    osmvec::cli::progress_bar(
                        p.total,
                        "embedding {bar:30} {pos}/{len} tiles {per_sec} eta {eta}",
                    )
                })
                .set_position(p.done);
            },
        )?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        print_report(&report, json)
    }
}

#[derive(clap::Args)]
struct BenchCycleCmd {
    #[arg(long)]
    store: PathBuf,
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value_t = 0)]
    filler: u64,
    /// Mark every tile with features dirty first, as an import does.
    #[arg(long)]
    mark_all: bool,
    #[arg(long, default_value_t = 3)]
    cycles: usize,
    #[arg(long, default_value_t = 512)]
    per_cycle: usize,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[command(flatten)]
    model: ModelArgs,
}

impl BenchCycleCmd {
    fn run(self) -> anyhow::Result<()> {
        let BenchCycleCmd {
            store,
            checkpoint,
            filler,
            mark_all,
            cycles,
            per_cycle,
            batch_size,
            model,
        } = self;
        let (device, model_dir) = model.resolve()?;
        let report = osmvec::bench::bench_cycle(&osmvec::bench::CycleBenchArgs {
            store,
            checkpoint,
            filler,
            mark_all,
            cycles,
            per_cycle,
            batch_size,
            model_dir,
            device,
        })?;
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    }
}

#[derive(clap::Args)]
struct CompareEmbeddingsCmd {
    a: PathBuf,
    b: PathBuf,
}

impl CompareEmbeddingsCmd {
    fn run(self) -> anyhow::Result<()> {
        let CompareEmbeddingsCmd { a, b } = self;
        let report = osmvec::bench::compare_embeddings(&a, &b)?;
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    }
}

#[derive(clap::Args)]
struct RunCmd {
    /// TOML configuration (ops/osmvec.toml documents every key); flags
    /// and OSMVEC_* variables override it.
    #[arg(long, env = "OSMVEC_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Box<osmvec::config::RunFlags>,
    /// Exit 0 once everything published is applied, embedded and delivered.
    #[arg(long)]
    until_caught_up: bool,
    /// One JSON line per cycle on stdout.
    #[arg(long)]
    json: bool,
}

impl RunCmd {
    fn run(self) -> anyhow::Result<()> {
        let RunCmd {
            config,
            flags,
            until_caught_up,
            json,
        } = self;
        let c = osmvec::config::load(config.as_deref(), &*flags)?;
        // Settings first (a missing store is named before the model).
        let mut o = osmvec::run::RunOptions::new(&c, Device::Cpu, PathBuf::new())?;
        (o.device, o.model_dir) = ModelArgs {
            device: c.device.clone(),
            text_model_dir: c.text_model_dir.clone(),
        }
        .resolve()?;
        let stop = stop_on_signals()?;
        o.until_caught_up = until_caught_up;
        o.json = json;
        osmvec::run::run(&o, stop)
    }
}

#[derive(clap::Args)]
struct WorkerCmd {
    /// The same TOML file as `osmvec run` ([kafka], checkpoint, device,
    /// [worker]); flags and OSMVEC_* variables override it.
    #[arg(long, env = "OSMVEC_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Box<osmvec::config::WorkerFlags>,
    /// One JSON line per batch on stdout.
    #[arg(long)]
    json: bool,
}

impl WorkerCmd {
    fn run(self) -> anyhow::Result<()> {
        let WorkerCmd {
            config,
            flags,
            json,
        } = self;
        let c = osmvec::config::load(config.as_deref(), &*flags)?;
        let mut o = osmvec::worker::WorkerOptions::new(&c, Device::Cpu, PathBuf::new())?;
        (o.device, o.model_dir) = ModelArgs {
            device: c.device.clone(),
            text_model_dir: c.text_model_dir.clone(),
        }
        .resolve()?;
        o.json = json;
        osmvec::worker::worker(&o, stop_on_signals()?)
    }
}

#[derive(clap::Args)]
struct LabelPointsCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
}

impl LabelPointsCmd {
    fn run(self) -> anyhow::Result<()> {
        let LabelPointsCmd { store } = self;
        let store = osmvec_graphstore::Store::open_read_only(&store)?;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        use std::io::Write as _;
        writeln!(out, "lat,lon")?;
        for (lat, lon) in osmvec_pipeline::eval::label_points(&store)? {
            writeln!(out, "{lat:.7},{lon:.7}")?;
        }
        out.flush()?;
        Ok(())
    }
}

#[derive(clap::Args)]
struct EvalCmd {
    #[arg(long, env = "OSMVEC_STORE")]
    store: PathBuf,
    #[arg(long, env = "OSMVEC_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Test tiles in the retrieval task (and validation tiles that the
    /// baselines choose k and λ on).
    #[arg(long, default_value_t = 1000)]
    retrieval_tiles: usize,
    /// Training tiles whose graph vectors the retrieval baselines map
    /// coordinates onto (a seeded sample beyond).
    #[arg(long, default_value_t = 4000)]
    reference_tiles: usize,
    /// Bootstrap resamples of the test blocks.
    #[arg(long, default_value_t = 1000)]
    resamples: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// A CSV of `lat,lon,label` from a source other than OSM (e.g.
    /// `ops/external-labels.py`): probed like the land use.
    #[arg(long)]
    external_labels: Option<PathBuf>,
    /// Store the report in the checkpoint's metadata.
    #[arg(long)]
    save: bool,
    #[command(flatten)]
    model: ModelArgs,
    /// Print the report as one JSON object (the default prints it pretty).
    #[arg(long)]
    json: bool,
}

impl EvalCmd {
    fn run(self) -> anyhow::Result<()> {
        let EvalCmd {
            store,
            checkpoint,
            retrieval_tiles,
            reference_tiles,
            resamples,
            seed,
            external_labels,
            save,
            model,
            json,
        } = self;
        let (device, model_dir) = model.resolve()?;
        let store = osmvec_graphstore::Store::open(&store)?;
        let report = osmvec_pipeline::eval::eval(
            &store,
            &osmvec_pipeline::eval::EvalConfig {
                checkpoint,
                retrieval_tiles,
                reference_tiles,
                resamples,
                seed,
                external_labels,
                save,
                model_dir,
                device,
            },
        )?;
        print_report(&report, json)
    }
}

/// Keeps freed memory in the process instead of handing it back to the
/// kernel. The encoders allocate and free many tensors of several megabytes
/// per batch; with glibc's defaults each one is a fresh `mmap` whose pages the
/// kernel must zero on first touch, which took a quarter of `osmvec embed`'s
/// time (perf: `clear_page_erms`). Memory use is bounded by the largest batch.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread exists.
    unsafe {
        // glibc refuses thresholds above 32 MiB (HEAP_MAX_SIZE / 2) and
        // any M_TRIM_THRESHOLD turns the dynamic mmap threshold off, so
        // the earlier 1 GiB here left every block over 128 KiB mmapped
        // afresh (a tensor's pages zeroed by the kernel on every batch).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // Thread arenas give whole heaps back when they empty, whatever the
        // trim threshold: one arena halves the page faults of `embed --all`
        // (six-extract store: ~480k -> 270k, system time 2-4.6 s -> 1.2 s;
        // docs/benchmarks.md). Every thread then shares that arena's lock.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// `train --tag-texts`: the CLI's names for the pipeline's
/// [`TagTexts`](osmvec_pipeline::tags::TagTexts), which says what each does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TagTextsArg {
    /// One text per kept tag, averaged by key weight (osmvec's policy).
    PerTag,
    /// One label per feature, as OSMGraphCLIP builds it.
    FeatureLabel,
}

impl From<TagTextsArg> for osmvec_pipeline::tags::TagTexts {
    fn from(a: TagTextsArg) -> Self {
        match a {
            TagTextsArg::PerTag => Self::PerTag,
            TagTextsArg::FeatureLabel => Self::FeatureLabel,
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // Crash points from FAILPOINTS, in a build with `--features failpoints`
    // (the test suite's); nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
