//! `lakesink demo`, the README's first command, as a newcomer runs it: on a terminal (a
//! pseudo-terminal), then the DuckDB query it suggests, run as printed.

mod common;

use std::process::Command;

use common::*;

/// Runs the demo on a pseudo-terminal (Python's `pty`), so its progress bars are drawn: the
/// combined stdout and stderr, as the terminal shows them.
fn demo_on_a_terminal(records: u64, dir: &std::path::Path) -> String {
    let out = Command::new(python())
        .args([
            "-c",
            "import os, pty, sys; status = pty.spawn(sys.argv[1:]); \
             sys.exit(os.waitstatus_to_exitcode(status))",
            env!("CARGO_BIN_EXE_lakesink"),
            "demo",
            "--records",
            &records.to_string(),
            "--dir",
        ])
        .arg(dir)
        .env("COLUMNS", "120")
        .env("LINES", "40")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn seconds(s: &str) -> f64 {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        ms.parse::<f64>().unwrap() / 1000.0
    } else if let Some(us) = s.strip_suffix("µs") {
        us.parse::<f64>().unwrap() / 1e6
    } else {
        s.strip_suffix('s').unwrap().parse().unwrap()
    }
}

#[test]
fn the_demo_as_a_newcomer_sees_it() {
    let dir = scratch("demo");
    let records = 30_000u64;
    let out = demo_on_a_terminal(records, &dir);

    // Throughput counts from the first record, and the start-up is reported beside it.
    let sunk = out
        .lines()
        .find_map(|l| l.find("sunk ").map(|at| l[at..].trim_end()))
        .unwrap_or_else(|| panic!("no `sunk` line in: {out}"));
    assert!(
        sunk.starts_with(&format!("sunk {records} rows in ")),
        "{sunk}"
    );
    assert!(sunk.contains(" from the first record ("), "{sunk}");
    let pipeline = seconds(
        sunk.split(" rows in ")
            .nth(1)
            .unwrap()
            .split(" from")
            .next()
            .unwrap(),
    );
    let before = out
        .lines()
        .find(|l| l.contains("reading the table's positions took"))
        .map(|l| l[l.find("before it").unwrap()..].trim_end())
        .unwrap_or_else(|| panic!("no start-up line in: {out}"));
    let start_up = seconds(
        before
            .split(" took ")
            .nth(1)
            .unwrap()
            .split(" (")
            .next()
            .unwrap(),
    );
    let total = seconds(
        before
            .split(" (")
            .nth(1)
            .unwrap()
            .trim_end_matches(" in all)")
            .trim_end_matches(')'),
    );
    assert!(start_up > 0.0, "{before}");
    assert!(
        pipeline + start_up <= total + 0.01,
        "the pipeline ({pipeline}s) and the start-up ({start_up}s) exceed the whole run \
         ({total}s): {sunk} / {before}"
    );

    // No log line is written into a progress bar: each starts a line of its own (after a
    // newline or a carriage return, or after the bars were cleared and the cursor moved: a
    // cursor or erase sequence, `ESC [ n A`..`ESC [ n K`).
    let log_start = regex::Regex::new(
        r"(\x1b\[[0-9;]*m)*\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z(\x1b\[[0-9;]*m)* *(\x1b\[[0-9;]*m)* *(INFO|WARN|ERROR)",
    )
    .unwrap();
    let line_start = regex::Regex::new(r"(\n|\r|\x1b\[[0-9]*[A-K])$").unwrap();
    let mut logs = 0;
    for m in log_start.find_iter(&out) {
        logs += 1;
        let before = &out[..m.start()];
        assert!(
            before.is_empty() || line_start.is_match(before),
            "a log line was written into a progress bar: {:?}",
            &out[m.start().saturating_sub(80)..(m.end() + 40).min(out.len())]
        );
    }
    assert!(logs > 0, "the demo logged nothing at info level: {out}");

    // The DuckDB query it suggests, run as printed (python3 being the test environment's).
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("python3 -c "))
        .unwrap_or_else(|| panic!("no DuckDB query for Python in: {out}"));
    let command = line.trim().replacen("python3", &python(), 1);
    let q = Command::new("sh").args(["-c", &command]).output().unwrap();
    let table = String::from_utf8_lossy(&q.stdout);
    assert!(
        q.status.success(),
        "the suggested query failed: {command}\n{}",
        String::from_utf8_lossy(&q.stderr)
    );
    // Its `lines` column (the third) sums to every record produced.
    let lines: u64 = table
        .lines()
        .filter_map(|row| {
            let cells: Vec<&str> = row.split('│').map(str::trim).collect();
            cells.get(3)?.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(lines, records, "the suggested query's result:\n{table}");
}
