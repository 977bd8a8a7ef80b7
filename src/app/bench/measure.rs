//! What the bench measures with: CPU seconds (process, thread, per thread), peak RSS, the
//! timeline, Delta log entries, and the allocator's policy.

use super::*;

/// Peak resident set size of this process in bytes (VmHWM).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak RSS counter (Linux `clear_refs` 5), so a phase can be measured alone.
pub(super) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU seconds of this process.
pub fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU seconds of this process's live threads, to the nanosecond (`/proc/self/stat` counts
/// 10 ms ticks). Threads that exit between two readings are not counted.
pub(super) fn process_cpu_precise() -> f64 {
    thread_cpu_table().values().map(|(_, ns)| *ns).sum::<u64>() as f64 / 1e9
}

/// Where the pipeline process's CPU went, by thread, plus the feed process (the broker).
#[derive(Default)]
pub(super) struct CpuSplit {
    pub(super) start: HashMap<u32, (String, u64)>,
    pub(super) last: HashMap<u32, (String, u64)>,
    pub(super) feed_start: Option<f64>,
    pub(super) feed_last: Option<f64>,
    pub(super) encode_start: u64,
}

impl CpuSplit {
    /// CPU nanoseconds of the tokio, librdkafka, poll and other threads.
    pub(super) fn by_kind(&self) -> (u64, u64, u64, u64) {
        let (mut tokio, mut rdkafka, mut poll, mut other) = (0u64, 0u64, 0u64, 0u64);
        for (tid, (name, ns)) in &self.last {
            let used = ns.saturating_sub(self.start.get(tid).map_or(0, |s| s.1));
            match name.as_str() {
                n if n.starts_with("rdk:") => rdkafka += used,
                "lakesink-source" => poll += used,
                n if n.starts_with("tokio") => tokio += used,
                _ => other += used,
            }
        }
        (tokio, rdkafka, poll, other)
    }

    /// CPU nanoseconds spent consuming: the poll thread and librdkafka's threads.
    pub(super) fn consume_ns(&self) -> u64 {
        let (_, rdkafka, poll, _) = self.by_kind();
        rdkafka + poll
    }

    pub(super) fn report(&self, rows: u64, elapsed: f64) -> String {
        let (tokio, rdkafka, poll, other) = self.by_kind();
        let encode = sinks::encode::totals()
            .cpu_ns
            .saturating_sub(self.encode_start);
        let us = |ns: u64| ns as f64 / 1e3 / rows.max(1) as f64;
        let feed = match (self.feed_start, self.feed_last) {
            (Some(a), Some(b)) => format!(
                "; the feed process (the broker) {:.2} CPU s = {:.2} cores",
                b - a,
                (b - a) / elapsed
            ),
            _ => String::new(),
        };
        format!(
            "  cpu/row:   {:.2} us in all: decode and pipeline {:.2}, Parquet encode {:.2}, librdkafka threads {:.2}, poll thread {:.2}, other {:.2}{feed}",
            us(tokio + rdkafka + poll + other),
            us(tokio.saturating_sub(encode)),
            us(encode),
            us(rdkafka),
            us(poll),
            us(other)
        )
    }
}

/// Commit files (`<version>.json`) in every `_delta_log` under `root`, table creation included.
/// The Parquet data files a directory lister sees below `root` (outside `_lakesink/`): how
/// many, their bytes, and the largest.
pub(super) fn listed_parquet(root: &std::path::Path) -> (usize, u64, u64) {
    let mut out = (0, 0, 0);
    let Ok(entries) = std::fs::read_dir(root) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        if path.is_dir() {
            if name != "_lakesink" {
                let (n, b, m) = listed_parquet(&path);
                out = (out.0 + n, out.1 + b, out.2.max(m));
            }
        } else if name.to_string_lossy().ends_with(".parquet") {
            let len = e.metadata().map_or(0, |m| m.len());
            out = (out.0 + 1, out.1 + len, out.2.max(len));
        }
    }
    out
}

pub(super) fn delta_log_entries(root: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        if e.file_name() == "_delta_log" {
            n += std::fs::read_dir(&path)
                .map(|d| {
                    d.flatten()
                        .filter(|f| {
                            let name = f.file_name();
                            let name = name.to_string_lossy();
                            name.ends_with(".json") && name.as_bytes()[0].is_ascii_digit()
                        })
                        .count()
                })
                .unwrap_or(0);
        } else {
            n += delta_log_entries(&path);
        }
    }
    n
}

/// CPU nanoseconds of every live thread of this process: tid -> (name, ns).
pub(super) fn thread_cpu_table() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        out.insert(tid, (name.trim().to_string(), ns));
    }
    out
}

/// With `LAKESINK_BENCH_TIMELINE=path`: every 10 ms from the first record, one line of where the
/// pipeline is (records in, rows committed, buffered MiB) and of what each kind of thread did
/// since the last line (CPU ms of tokio, librdkafka, poll and other threads; encode CPU ms; ms
/// the poll thread waited on full queues and for records), and of memory: the process's RSS, and
/// what jemalloc (lakesink's own allocations; librdkafka's are glibc's) has allocated and keeps
/// resident; and the flushes in flight (being staged, committing or waiting to, the MiB
/// they hold, and the writers holding a buffer). For finding stalls and what holds memory, not for figures: the sampling costs CPU
/// of its own.
pub(super) async fn write_timeline(path: std::path::PathBuf, progress: Arc<Progress>) {
    use std::fmt::Write as _;
    while progress.records_in.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let kinds = |t: &HashMap<u32, (String, u64)>| {
        let split = CpuSplit {
            last: t.clone(),
            ..CpuSplit::default()
        };
        split.by_kind()
    };
    let counters = |p: &Progress| {
        (
            p.backpressure_ns.load(Ordering::Relaxed),
            p.poll_idle_ns.load(Ordering::Relaxed),
            sinks::encode::totals().cpu_ns,
        )
    };
    let mut out = String::from("ms records_in rows_committed buffered_mib tokio_ms rdkafka_ms poll_ms other_ms encode_ms backpressure_ms poll_idle_ms rss_mib jemalloc_allocated_mib jemalloc_resident_mib staging committing in_flight_mib holders\n");
    let (mut last_cpu, mut last) = (kinds(&thread_cpu_table()), counters(&progress));
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (cpu, now) = (kinds(&thread_cpu_table()), counters(&progress));
        let ms = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e6;
        let (allocated, resident) = jemalloc_mib();
        let (staging, committing, in_flight, holders) = progress.flushes();
        let _ = writeln!(
            out,
            "{} {} {} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {allocated:.1} {resident:.1} {staging} {committing} {:.1} {holders}",
            started.elapsed().as_millis(),
            progress.records_in.load(Ordering::Relaxed),
            progress.rows_committed.load(Ordering::Relaxed),
            progress.buffer_bytes() as f64 / (1 << 20) as f64,
            ms(cpu.0, last_cpu.0),
            ms(cpu.1, last_cpu.1),
            ms(cpu.2, last_cpu.2),
            ms(cpu.3, last_cpu.3),
            ms(now.2, last.2),
            ms(now.0, last.0),
            ms(now.1, last.1),
            rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64,
            in_flight as f64 / (1 << 20) as f64,
        );
        (last_cpu, last) = (cpu, now);
        let _ = std::fs::write(&path, &out);
    }
}

/// Resident set size of this process in bytes now (VmRSS).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// What jemalloc has allocated and keeps resident now, in MiB (0 when it cannot say).
fn jemalloc_mib() -> (f64, f64) {
    use tikv_jemalloc_ctl::{epoch, stats};
    let _ = epoch::advance();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    (
        stats::allocated::read().map_or(0.0, mib),
        stats::resident::read().map_or(0.0, mib),
    )
}

/// User + system CPU seconds of another process.
pub(super) fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
}

/// CPU seconds of the calling thread, to the nanosecond (Linux schedstat; 0 elsewhere).
pub(super) fn thread_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0) as f64
        / 1e9
}

/// jemalloc's options as it runs them (the `lakesink` binary's defaults, or
/// `_RJEM_MALLOC_CONF`), so every bench result says which allocator policy it measured.
pub(super) fn allocator() -> String {
    use tikv_jemalloc_ctl::opt;
    let arenas = opt::narenas::read().map_or("?".into(), |n| n.to_string());
    let background = opt::background_thread::read().unwrap_or(false);
    format!(
        "jemalloc, {arenas} arenas, background purging {} (librdkafka: glibc malloc)",
        if background { "on" } else { "off" }
    )
}
