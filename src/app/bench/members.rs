//! `lakesink bench --members 1,2,4`: scale-out measured. The workload is produced once to a real
//! broker; then, for each member count in turn, that many `lakesink run --until-caught-up`
//! processes join one fresh consumer group and sink the whole topic into a fresh table, each
//! process held to a fixed CPU share (`--member-cpus`, a cgroup CPU quota) so that the members'
//! total stays within one core and the broker keeps the other.
//!
//! Reported per member count, side by side from one run: wall time from the first member's start
//! to the last one's exit, records/s in all and per member, the members' CPU seconds, commits
//! (Delta log entries, or Parquet commit markers), commit conflicts retried, and fenced writers,
//! read from the members' logs.
//!
//! Invariant: every run reads the same records and must commit every one of them exactly once
//! (appends: as many rows as records, read from the Delta log or the published Parquet files'
//! footers; upserts: one row per order, each its last change), or the bench fails.

use std::path::{Path, PathBuf};

use super::*;

/// A cgroup that holds a member to `cpus` cores (cgroup v2 `cpu.max`, or v1's CFS quota).
struct CpuLimit {
    dir: PathBuf,
}

impl CpuLimit {
    fn new(name: &str, cpus: f64) -> anyhow::Result<CpuLimit> {
        let period = 100_000u64;
        let quota = ((cpus * period as f64) as u64).max(1000);
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir = match v2 {
            true => PathBuf::from("/sys/fs/cgroup").join(name),
            false => PathBuf::from("/sys/fs/cgroup/cpu").join(name),
        };
        let setup = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            match v2 {
                true => std::fs::write(dir.join("cpu.max"), format!("{quota} {period}")),
                false => {
                    std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
                    std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())
                }
            }
        };
        setup().with_context(|| {
            format!(
                "--member-cpus needs a writable cgroup CPU controller (cannot set up {}); run as \
                 root, or leave --member-cpus out to run the members unlimited",
                dir.display()
            )
        })?;
        Ok(CpuLimit { dir })
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// What one member count measured.
struct Scaled {
    members: u32,
    wall: f64,
    cpu: f64,
    log_entries: usize,
    conflicts: usize,
    fenced: usize,
}

/// Runs the member counts of `opts.members` in turn over the produced topic(s); `text` is the
/// pipeline config of one run (its table and group are renamed per run).
pub(super) async fn scale_out(
    opts: &Options,
    text: &str,
    records: u64,
    dir: &Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        opts.broker.is_some(),
        "--members needs --broker: the members are separate processes and cannot reach the \
         bench's in-process cluster"
    );
    anyhow::ensure!(
        opts.rate.is_none(),
        "--members measures catching up on a backlog; leave --rate out"
    );
    anyhow::ensure!(
        opts.kind == "delta" || opts.kind == "parquet",
        "--members measures --kind delta or parquet (their rows are read back from the tables)"
    );
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for (run, &members) in opts.members.iter().enumerate() {
        let root = dir.join(format!("run{run}"));
        std::fs::create_dir_all(&root)?;
        let tables_dir = root.join("tables");
        let config = text
            .replace(
                &format!("file://{}/", dir.display()),
                &format!("file://{}/", tables_dir.display()),
            )
            .replace(
                "group_id = \"lakesink-bench-",
                &format!("group_id = \"lakesink-bench-members-{run}-"),
            );
        let config_path = root.join("lakesink.toml");
        std::fs::write(&config_path, &config)?;
        eprintln!("bench: {members} member(s) ...");
        let stamp = std::process::id();
        let limits: Vec<Option<CpuLimit>> = (0..members)
            .map(|i| {
                opts.member_cpus
                    .map(|c| CpuLimit::new(&format!("lakesink-bench-{stamp}-{run}-{i}"), c))
                    .transpose()
            })
            .collect::<anyhow::Result<_>>()?;
        let started = Instant::now();
        let mut children = Vec::new();
        for (i, limit) in limits.iter().enumerate() {
            let log = std::fs::File::create(root.join(format!("member{i}.log")))?;
            // The shell joins the cgroup, then becomes the member (no unsafe pre_exec).
            let procs = limit
                .as_ref()
                .map_or("/dev/null".into(), |l| l.procs().display().to_string());
            let child = Command::new("sh")
                .arg("-c")
                .arg(format!("echo $$ > '{procs}' && exec \"$0\" \"$@\""))
                .arg(&exe)
                .args(["run", "--until-caught-up", "--config"])
                .arg(&config_path)
                .env("LAKESINK_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("cannot start a member")?;
            children.push(child);
        }
        // CPU per member, sampled while it lives (a process's counters vanish with it).
        let mut cpu = vec![0.0f64; children.len()];
        let mut running = children.len();
        while running > 0 {
            running = 0;
            for (i, c) in children.iter_mut().enumerate() {
                match c.try_wait()? {
                    Some(status) => anyhow::ensure!(
                        status.success(),
                        "member {i} of {members} failed ({status}); its log: {}",
                        root.join(format!("member{i}.log")).display()
                    ),
                    None => {
                        running += 1;
                        if let Some(s) = process_cpu_seconds(c.id()) {
                            cpu[i] = s;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wall = started.elapsed().as_secs_f64();
        drop(limits);
        let logs: String = (0..members)
            .map(|i| {
                std::fs::read_to_string(root.join(format!("member{i}.log"))).unwrap_or_default()
            })
            .collect();
        let tables: Vec<PathBuf> = std::fs::read_dir(&tables_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        match opts.mode.as_str() {
            "upsert" => check_upserted(&tables, records).await?,
            _ => {
                let mut rows = 0;
                for t in &tables {
                    rows += match opts.kind.as_str() {
                        "parquet" => parquet_rows(t)?,
                        _ => count_rows(t).await?,
                    };
                }
                anyhow::ensure!(
                    rows == records as i64,
                    "{members} member(s) committed {rows} rows, expected {records}"
                );
            }
        }
        results.push(Scaled {
            members,
            wall,
            cpu: cpu.iter().sum(),
            log_entries: tables
                .iter()
                .map(|t| match opts.kind.as_str() {
                    "parquet" => files_under(&t.join("_lakesink").join("commits")),
                    _ => delta_log_entries(t),
                })
                .sum(),
            conflicts: logs.matches("commit conflict").count()
                + logs.matches("merge conflict").count(),
            fenced: logs.matches("fenced").count(),
        });
    }
    let cpus = opts
        .member_cpus
        .map_or("unlimited CPU".to_string(), |c| format!("{c} core(s) each"));
    println!(
        "lakesink bench --members: {records} {} order lines, {} topic(s) x {} partitions, broker \
         {} -> local {} table(s), {}, members held to {cpus}",
        opts.format,
        opts.tables.max(1),
        opts.partitions,
        opts.broker.as_deref().unwrap_or_default(),
        opts.kind,
        opts.mode,
    );
    let one = results.first().map(|r| records as f64 / r.wall);
    for r in &results {
        let rate = records as f64 / r.wall;
        println!(
            "  {} member(s): {:.1} s, {:.0} records/s ({:.0} per member{}), {:.1} CPU s, {} {}, \
             {} commit conflicts retried, {} fenced",
            r.members,
            r.wall,
            rate,
            rate / f64::from(r.members),
            one.map_or(String::new(), |o| format!(", {:.2}x the first", rate / o)),
            r.cpu,
            r.log_entries,
            match opts.kind.as_str() {
                "parquet" => "commit markers",
                _ => "log entries",
            },
            r.conflicts,
            r.fenced,
        );
    }
    Ok(())
}

/// Rows of the Parquet table at `table`: its published files (what a directory lister reads;
/// nothing uncommitted is outside `_lakesink/`), counted from their footers.
fn parquet_rows(table: &Path) -> anyhow::Result<i64> {
    let mut rows = 0;
    for e in std::fs::read_dir(table)? {
        let e = e?;
        let path = e.path();
        if path.is_dir() {
            if e.file_name() != "_lakesink" {
                rows += parquet_rows(&path)?;
            }
        } else if e.file_name().to_string_lossy().ends_with(".parquet") {
            let reader =
                parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&path)?)
                    .with_context(|| format!("reading {}", path.display()))?;
            use parquet::file::reader::FileReader as _;
            rows += reader.metadata().file_metadata().num_rows();
        }
    }
    Ok(rows)
}

/// Files in `dir` and below.
fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.path().is_dir() {
                true => files_under(&e.path()),
                false => 1,
            })
            .sum()
    })
}

/// Rows of the Delta table at `table`.
async fn count_rows(table: &Path) -> anyhow::Result<i64> {
    let url = url::Url::from_directory_path(table)
        .map_err(|()| anyhow::anyhow!("{} is not an absolute path", table.display()))?;
    let out = sinks::delta::query(url.as_str(), "SELECT count(*) FROM t").await?;
    let v = arrow::compute::cast(out[0].column(0), &arrow::datatypes::DataType::Int64)?;
    Ok(v.as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .context("an Int64 column")?
        .value(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Parquet table's rows are its published files' (hive directories included); what lies
    /// under `_lakesink/` (staged files, markers) is not published and is not counted.
    #[test]
    fn parquet_rows_are_the_published_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &Path, rows: i64| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new("id", arrow::datatypes::DataType::Int64, false),
            ]));
            let batch = arrow::array::RecordBatch::try_new(
                schema.clone(),
                vec![std::sync::Arc::new(
                    arrow::array::Int64Array::from_iter_values(0..rows),
                )],
            )
            .unwrap();
            let file = std::fs::File::create(path).unwrap();
            let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        };
        let t = dir.path();
        write(&t.join("day=2026-12-07/orders+0+0.parquet"), 7);
        write(&t.join("day=2026-12-08/orders+1+0.parquet"), 5);
        write(&t.join("_lakesink/staging/orders/0/9-12-x-0.parquet"), 100);
        std::fs::create_dir_all(t.join("_lakesink/commits/orders/0")).unwrap();
        std::fs::write(t.join("_lakesink/commits/orders/0/0.json"), "{}").unwrap();
        assert_eq!(parquet_rows(t).unwrap(), 12);
        assert_eq!(files_under(&t.join("_lakesink").join("commits")), 1);
    }
}
