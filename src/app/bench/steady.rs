//! `lakesink bench --steady-upsert`: what an upsert costs on a table that is already large, at
//! the Delta sink (no Kafka). A local table of `table_rows` rows (keys `0..table_rows`, loaded
//! in key order through the upsert sink, in files of up to 1M rows, at least four) takes
//! `changes` updates of random existing keys in flushes of `flush_rows`, each flush one MERGE
//! commit, as a CDC stream of a large table in steady state. Reported: CPU and wall time per change, bytes written per change and files rewritten
//! per flush, from the Delta log of the upsert commits; the table is then read back (it still
//! holds `table_rows` rows, and the last value of each changed key).
//!
//! Every table size and upsert strategy given runs in turn in the same process, on a table of
//! its own, and a summary gives each run's CPU per change relative to the smallest table's of
//! the same strategy: copy-on-write upserts rewrite every file that holds a changed key, so with
//! random keys their cost grows with the table; deletion vectors mark rows instead, so theirs
//! should follow the change. Write amplification is the bytes written (data files, deletion
//! vectors) over the raw bytes of the changed rows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use sinks::delta::{DeltaSink, DeltaSinkConfig, UpsertStrategy};
use sinks::upsert::UpsertConfig;
use sinks::{Flush, Offset, Sink, TopicPartition};

use super::cpu_seconds;

/// Rows per file of the built table: at most 1M (a compacted table's files), and at least 4
/// files, so that even a small run rewrites several.
fn load_rows(table_rows: u64) -> u64 {
    table_rows.div_ceil(4).clamp(1, 1 << 20)
}

/// How the table is built before the changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Keys in random order (every file spans all of them), not in key order.
    pub random: bool,
    /// Rows per load flush; `None`: [`load_rows`].
    pub flush_rows: Option<u64>,
    /// Compacted (`DeltaSink::maintain`) once loaded.
    pub compact: bool,
}

/// The `i`-th key loaded into a table of `n` rows: `i` in key order; in random order, a
/// permutation of `0..n` (multiplying by a prime that divides no `n` given, modulo `n`).
fn load_key(i: u64, n: u64, random: bool) -> i64 {
    const STEP: u64 = 2_654_435_761;
    match random && !n.is_multiple_of(STEP) {
        true => ((i as u128 * STEP as u128) % n as u128) as i64,
        false => i as i64,
    }
}

fn batch(ids: &[i64], version: i64) -> anyhow::Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("customer", DataType::Utf8, false),
        Field::new("amount", DataType::Int64, false),
        Field::new("version", DataType::Int64, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids.to_vec())),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|i| format!("customer-{:05}", i % 50_000)),
            )),
            Arc::new(Int64Array::from_iter_values(
                ids.iter().map(|i| (i * 7919) % 100_000),
            )),
            Arc::new(Int64Array::from(vec![version; ids.len()])),
        ],
    )?)
}

async fn commit<S: Sink>(
    sink: &S,
    tp: &TopicPartition,
    start: i64,
    b: RecordBatch,
) -> anyhow::Result<()> {
    let next = start + b.num_rows() as i64;
    let staged = sink
        .stage(Flush {
            tp: tp.clone(),
            start: Offset(start),
            next: Offset(next),
            batches: vec![b],
            packed: Vec::new(),
            truncate: false,
            tick: None,
        })
        .await?;
    sink.commit(&staged).await?;
    Ok(())
}

/// Bytes added (data files) and files removed (rewritten, or given a new deletion vector) per
/// commit, for the log versions after `after`.
fn log_figures(table: &std::path::Path, after: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(table.join("_delta_log"))? {
        let path = entry?.path();
        let Some(version) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        if version <= after {
            continue;
        }
        // A file removed and added again in one commit got a deletion vector: not written.
        let actions: Vec<serde_json::Value> = std::fs::read_to_string(&path)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let removed_paths: std::collections::HashSet<&str> = actions
            .iter()
            .filter_map(|a| a.pointer("/remove/path").and_then(|p| p.as_str()))
            .collect();
        let (mut added, removed, mut adds) = (0u64, removed_paths.len() as u64, 0);
        for action in &actions {
            if let Some(size) = action.pointer("/add/size").and_then(|s| s.as_u64()) {
                adds += 1;
                let path = action.pointer("/add/path").and_then(|p| p.as_str());
                if !path.is_some_and(|p| removed_paths.contains(p)) {
                    added += size;
                }
            }
        }
        if adds == 0 && removed == 0 {
            // No data: the commit that added the deletionVectors feature.
            continue;
        }
        out.push((added, removed));
    }
    Ok(out)
}

/// Bytes of the deletion-vector files in `table`.
fn dv_bytes(table: &std::path::Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(table)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("deletion_vector_")
        {
            bytes += entry.metadata()?.len();
        }
    }
    Ok(bytes)
}

/// What one run measured.
struct Figures {
    table_rows: u64,
    strategy: UpsertStrategy,
    cpu_per_change_us: f64,
    amplification: f64,
}

/// Runs the benchmark for every table size and strategy given; prints each report and a
/// summary.
pub async fn steady_upsert(
    table_rows: &[u64],
    changes: u64,
    flush_rows: u64,
    strategies: &[UpsertStrategy],
    load: Load,
) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for strategy in strategies {
        for rows in table_rows {
            all.push(run(*rows, changes, flush_rows, *strategy, load).await?);
        }
    }
    if all.len() > 1 {
        println!("summary: CPU per change relative to the smallest table of the same strategy");
        for f in &all {
            let base = all
                .iter()
                .filter(|b| b.strategy == f.strategy)
                .min_by_key(|b| b.table_rows)
                .expect("f itself");
            println!(
                "  {:>10} rows, {:<16} {:>9.1} µs CPU per change ({:.2}x), write amplification {:.1}",
                f.table_rows,
                format!("{:?}", f.strategy),
                f.cpu_per_change_us,
                f.cpu_per_change_us / base.cpu_per_change_us,
                f.amplification
            );
        }
    }
    Ok(())
}

async fn run(
    table_rows: u64,
    changes: u64,
    flush_rows: u64,
    strategy: UpsertStrategy,
    load: Load,
) -> anyhow::Result<Figures> {
    // Each case's peaks are its own, not the previous case's.
    super::measure::reset_peak_rss();
    anyhow::ensure!(
        table_rows > 0 && changes > 0 && flush_rows > 0,
        "sizes must be positive"
    );
    let dir = tempfile::tempdir()?;
    let table = dir.path().join("orders");
    std::fs::create_dir_all(&table)?;
    let url = url::Url::from_directory_path(&table)
        .map_err(|()| anyhow::anyhow!("{} is not an absolute path", table.display()))?;
    let upsert = UpsertConfig {
        keys: vec!["id".into()],
        keys_from: None,
        delete_column: None,
        unchanged_column: None,
    };
    // Loaded as lakesink loads a table's snapshot in upsert mode (Debezium's `r` records, in
    // key order): through the same upsert sink, so its files are laid out as the upserts'.
    let loader = DeltaSink::new(
        url.as_str(),
        Vec::<(String, String)>::new(),
        DeltaSinkConfig {
            upsert: Some(upsert.clone()),
            upsert_strategy: strategy,
            ..Default::default()
        },
    )?;
    eprintln!("bench: building a Delta table of {table_rows} rows ...");
    let load_tp = TopicPartition::new("load", 0);
    let mut at = 0u64;
    while at < table_rows {
        let end = (at + load.flush_rows.unwrap_or_else(|| load_rows(table_rows))).min(table_rows);
        let ids: Vec<i64> = (at..end)
            .map(|i| load_key(i, table_rows, load.random))
            .collect();
        commit(&loader, &load_tp, at as i64, batch(&ids, 0)?).await?;
        at = end;
    }
    let loaded_files = sinks::delta::live_files(url.as_str()).await?.0;
    if load.compact {
        let started = Instant::now();
        let report = loader
            .maintain(128 << 20, std::time::Duration::from_secs(3600))
            .await?;
        eprintln!(
            "bench: compacted {} files into {} in {:.1} s",
            report.files_compacted,
            report.files_written,
            started.elapsed().as_secs_f64()
        );
    }
    let (files, bytes) = sinks::delta::live_files(url.as_str()).await?;
    let loaded_version = log_figures(&table, 0)?.len() as u64;

    let upserter = DeltaSink::new(
        url.as_str(),
        Vec::<(String, String)>::new(),
        DeltaSinkConfig {
            upsert: Some(upsert),
            group_rows: flush_rows as usize,
            upsert_strategy: strategy,
            ..Default::default()
        },
    )?;
    eprintln!("bench: {changes} changes of random keys in flushes of {flush_rows} ...");
    let tp = TopicPartition::new("changes", 0);
    // xorshift: the same keys every run.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut last: HashMap<i64, i64> = HashMap::new();
    // The upserts' own peak, apart from the load's (whose 1M-row flushes set the process's).
    let load_peak = super::measure::peak_rss().unwrap_or(0);
    super::measure::reset_peak_rss();
    let (cpu0, started) = (cpu_seconds().unwrap_or(0.0), Instant::now());
    let mut done = 0u64;
    let mut change_bytes = 0u64;
    while done < changes {
        let n = flush_rows.min(changes - done);
        let ids: Vec<i64> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % table_rows) as i64
            })
            .collect();
        let version = (done / flush_rows + 1) as i64;
        for id in &ids {
            last.insert(*id, version);
        }
        let b = batch(&ids, version)?;
        // The changed rows' raw bytes: three longs and the customer's name.
        change_bytes += 24 * b.num_rows() as u64
            + b.column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .map_or(0, |c| c.values().len() as u64);
        commit(&upserter, &tp, done as i64, b).await?;
        done += n;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu0;
    let upsert_peak = super::measure::peak_rss().unwrap_or(0);
    let commits = log_figures(&table, loaded_version)?;
    let written: u64 = commits.iter().map(|(a, _)| a).sum::<u64>() + dv_bytes(&table)?;
    let rewritten: Vec<u64> = commits.iter().map(|(_, r)| *r).collect();

    // Read back: every row is still there once, and each changed key holds its last version.
    let location = url.as_str();
    let count = sinks::delta::query(
        location,
        "SELECT count(*) AS n, count(DISTINCT id) AS k FROM t",
    )
    .await
    .context("reading the table back")?;
    let n = count[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .map(|a| a.value(0));
    let k = count[0]
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .map(|a| a.value(0));
    anyhow::ensure!(
        n == Some(table_rows as i64) && k == Some(table_rows as i64),
        "the table holds {n:?} rows of {k:?} keys after the upserts, not {table_rows}"
    );
    let sample: Vec<(i64, i64)> = last.iter().take(50).map(|(k, v)| (*k, *v)).collect();
    let ids: Vec<String> = sample.iter().map(|(k, _)| k.to_string()).collect();
    let got = sinks::delta::query(
        location,
        &format!("SELECT id, version FROM t WHERE id IN ({})", ids.join(",")),
    )
    .await?;
    let mut seen: HashMap<i64, i64> = HashMap::new();
    for b in &got {
        let id = b
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("id")?;
        let v = b
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("version")?;
        for i in 0..b.num_rows() {
            seen.insert(id.value(i), v.value(i));
        }
    }
    for (key, version) in &sample {
        anyhow::ensure!(
            seen.get(key) == Some(version),
            "key {key} holds version {:?}, not its last change {version}",
            seen.get(key)
        );
    }

    let flushes = rewritten.len().max(1) as f64;
    println!(
        "lakesink bench --steady-upsert ({strategy:?}): a local Delta table of {table_rows} rows \
         in {files} files ({:.1} MB; loaded in {} order into {loaded_files} files{}); \
         {changes} changes of random keys in {} flushes of {flush_rows}",
        bytes as f64 / 1e6,
        if load.random { "random" } else { "key" },
        if load.compact { ", then compacted" } else { "" },
        rewritten.len()
    );
    println!(
        "  per change: {:.1} µs CPU, {:.1} µs wall, {:.0} bytes written ({:.1} MB in all)",
        cpu * 1e6 / changes as f64,
        wall * 1e6 / changes as f64,
        written as f64 / changes as f64,
        written as f64 / 1e6
    );
    println!(
        "  per flush:  {:.1} files rewritten or marked on average (at most {}), {:.1} MB \
         written, {:.3} s",
        rewritten.iter().sum::<u64>() as f64 / flushes,
        rewritten.iter().max().copied().unwrap_or(0),
        written as f64 / 1e6 / flushes,
        wall / flushes
    );
    let amplification = written as f64 / change_bytes.max(1) as f64;
    println!(
        "  amplification: {amplification:.1} bytes written per byte changed ({:.1} MB of \
         changed rows)",
        change_bytes as f64 / 1e6
    );
    println!(
        "  peak RSS:   {:.1} MiB while upserting ({:.1} MiB while loading the table)",
        upsert_peak as f64 / (1 << 20) as f64,
        load_peak as f64 / (1 << 20) as f64
    );
    println!("  read back:  {table_rows} rows, one per key; the last change of 50 keys checked");
    Ok(Figures {
        table_rows,
        strategy,
        cpu_per_change_us: cpu * 1e6 / changes as f64,
        amplification,
    })
}
