//! The `lakesink` binary: the allocators' settings and the runtime. The command line (arguments,
//! logging, each command, exit codes) is in `cli`.

mod cli;

use std::process::ExitCode;

/// glibc's malloc now serves librdkafka and the other C code only (Rust's allocations go to
/// jemalloc, below); these two settings were measured when it served everything.
///
/// At most two glibc malloc arenas per core (unless `MALLOC_ARENA_MAX` says otherwise; glibc's
/// default is eight per core). Freed Arrow and Parquet buffers stay in the arena of the thread
/// that freed them. Measured on 2 cores, 1M JSON records, medians of 3 alternating runs:
/// 48 partitions 241 MiB (4 arenas) vs 263 MiB (16), 398k vs 425k records/s within the noise;
/// 2 arenas went to 226 MiB but cost ~10 % throughput. Set before the runtime starts threads.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(2 * cores).unwrap_or(i32::MAX).max(2);
        // SAFETY: mallopt only adjusts allocator parameters; no other thread is running yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Allocations of 512 KiB and more get their own mapping, returned to the system when freed
/// (unless `MALLOC_MMAP_THRESHOLD_` says otherwise). glibc's default threshold starts at
/// 128 KiB but rises with every such block freed, up to 32 MiB; after that, Arrow's and
/// Parquet's large buffers come from the arenas, whose freed memory fragments and stays
/// resident. A fixed 128 KiB kept one partition at 211–215 MiB instead of 259–286 MiB, but
/// doubled the page faults (5–15 % more CPU). 512 KiB, with the smaller librdkafka pre-fetch
/// queue (`kafka::client_config`), keeps every measured Parquet case under 256 MiB with 40 %
/// fewer page faults than 128 KiB (docs/perf-notes.md). Trimming the arenas instead cost more.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only adjusts allocator parameters; no other thread is running yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
        }
    }
}

/// Rust's allocations go to jemalloc. Against glibc's malloc (alternated runs, 1M records,
/// docs/perf-notes.md): 20 Delta tables used 6.7–8.4 CPU s instead of 7.9–9.4 at the same or lower
/// peak RSS, and JSON on 48 partitions 3.5–4.3 CPU s instead of 4.3–4.7. librdkafka, a C
/// library, still uses glibc's malloc, which the two `mallopt` settings above still shape.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (before `main`); `_RJEM_MALLOC_CONF` in the
/// environment overrides them. Two arenas, as many as the 2 cores lakesink is sized for (with
/// one arena per CPU, a pod limited to 2 CPUs of a 64-CPU node would get 64); a background
/// thread hands freed pages back after 500 ms, so memory freed after a burst (a Delta
/// commit's log replay, a MERGE) does not stay resident. Returning them at once instead cost
/// 40 % more CPU; keeping jemalloc's 10 s default measured 297–395 MiB on 20 Delta tables.
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &[u8; 69] =
    b"narenas:2,background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0\0";

/// deltalake's budget for the bytes of data files still uploading (`DELTARS_MAX_IN_FLIGHT_UPLOAD_BYTES`).
const UPLOAD_BUDGET: &str = "DELTARS_MAX_IN_FLIGHT_UPLOAD_BYTES";

/// deltalake sizes its upload budget from the memory limit (a quarter of it) but never below
/// four of the writer's target files: 400 MiB for a flush's writer, unbounded for a
/// compaction's, which writes one file per bin. Below 1.6 GiB (a 1 GiB pod) the floor wins,
/// and deltalake warns at every writer it opens: every flush of every table, every
/// compaction. What lakesink holds is bounded by its own budget (`max_buffer_bytes`, one
/// compaction per table at a time), so it gives deltalake the budget deltalake falls back
/// to when it cannot read the limit, 512 MiB, unless the environment sets one.
fn set_upload_budget() {
    if std::env::var_os(UPLOAD_BUDGET).is_none() {
        // No other thread is running yet.
        std::env::set_var(UPLOAD_BUDGET, (512u64 << 20).to_string());
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    fix_mmap_threshold();
    set_upload_budget();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(cli::run());
            // Blocking tasks still running are abandoned, not awaited: a dead-letter session
            // waiting for another writer's open transaction (up to 90 s) must not hold the exit
            // after the drain. Nothing they do is needed once the pipeline has returned: a dead
            // letter is committed before the table commit that covers it, and an open
            // transaction of this process is aborted by the broker.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
