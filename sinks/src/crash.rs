//! Crash points: a test hook a sink calls at each step of its commit protocol, so tests and the
//! chaos harness can kill the process between any two steps and prove recovery.

/// Called at named points of the commit protocol (Parquet: `after_stage`, `after_marker`,
/// `mid_publish`; Delta and Databend: `after_stage`, `after_commit`); the crash-safety tests use it to SIGKILL the process at exactly that point.
pub type CrashHook = std::sync::Arc<dyn Fn(&'static str) + Send + Sync>;
