//! Logging: the filter (`LAKESINK_LOG`), text or JSON on stderr, and the one library message
//! dropped.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::LogFormat;

/// The log filter when `LAKESINK_LOG` is unset. lakesink's own events at info; its libraries
/// at warn. The Delta kernel and deltalake log several info events per commit, some of them
/// spans that print the whole table snapshot (every log file it lists): 3.9 MB of text for 1M
/// records into 20 tables. The kernel's snapshot builder also logs an ERROR for every probe of
/// a table that does not exist yet, which is how lakesink finds out it must create it.
const DEFAULT_LOG_FILTER: &str =
    "info,librdkafka=warn,buoyant_kernel=warn,buoyant_kernel::snapshot::builder=off,deltalake_core=warn";

/// What rust-rdkafka logs, as an ERROR, when a consumer that has already left its group is
/// dropped.
const DOUBLE_CLOSE: &str = "Failed to close consumer queue on drop";

/// Drops rust-rdkafka's [`DOUBLE_CLOSE`] ERROR. The source leaves the group itself, polling every
/// 5 ms (the consumer's drop polls in 100 ms steps, which cost every stop about 100 ms); the
/// drop then closes the consumer a second time, fails with "broker handle destroyed", and logs
/// that at ERROR on every clean stop. Only that message is dropped: the same module's other
/// events (an invalid rebalance, an ignored event) still pass.
struct QuietDoubleClose;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QuietDoubleClose {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if *event.metadata().level() != tracing::Level::ERROR {
            return true;
        }
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}").starts_with(DOUBLE_CLOSE);
                }
            }
        }
        let mut m = Message(false);
        event.record(&mut m);
        !m.0
    }
}

/// One log line on stderr, written whole once formatted, with the demo's progress bars
/// cleared around it (a line written while a bar is drawn would land in the middle of it).
struct LineOut(Vec<u8>);

impl std::io::Write for LineOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineOut {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            lakesink::app::bars::suspend_bars(|| {
                let _ = std::io::Write::write_all(&mut std::io::stderr(), &self.0);
            });
        }
    }
}

/// Installs the global subscriber.
pub(super) fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAKESINK_LOG")
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let logs = tracing_subscriber::registry()
        .with(filter)
        .with(QuietDoubleClose);
    match format {
        // Colours only on a terminal (and without NO_COLOR): log files, `kubectl logs` and
        // collectors get plain text.
        LogFormat::Text => logs
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(
                        std::io::IsTerminal::is_terminal(&std::io::stderr())
                            && std::env::var_os("NO_COLOR").is_none(),
                    )
                    .with_writer(|| LineOut(Vec::new())),
            )
            .init(),
        LogFormat::Json => logs
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}
