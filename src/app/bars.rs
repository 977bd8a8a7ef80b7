//! Progress bars on stderr when it is a terminal (the demo's producer, a catch-up run), all in
//! one [`indicatif::MultiProgress`]. Invariant: every log line is written through
//! [`suspend_bars`] (the CLI's log writer does it), so no line lands in the middle of a bar.

use std::sync::OnceLock;

static BARS: OnceLock<indicatif::MultiProgress> = OnceLock::new();

/// A bar of `total` steps drawn with `template`, or `None` when stderr is not a terminal.
pub fn bar(total: u64, template: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let b = BARS
            .get_or_init(indicatif::MultiProgress::new)
            .add(indicatif::ProgressBar::new(total));
        b.set_style(
            indicatif::ProgressStyle::with_template(template)
                .expect("template")
                .progress_chars("=> "),
        );
        b
    })
}

/// Runs `write` with the bars (if any) cleared, and draws them again after it.
pub fn suspend_bars<R>(write: impl FnOnce() -> R) -> R {
    match BARS.get() {
        Some(bars) => bars.suspend(write),
        None => write(),
    }
}
