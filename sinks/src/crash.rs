//! Crash points: a test hook a sink calls at each step of its commit protocol, so tests and the
//! chaos harness can kill the process between any two steps and prove recovery.

/// Called at named points of the commit protocol (Parquet: `after_stage`, `after_marker`,
/// `mid_publish`; Delta and Databend: `after_stage`, `after_commit`); the crash-safety tests
/// use it to SIGKILL the process at exactly that point.
pub type CrashHook = std::sync::Arc<dyn Fn(&'static str) + Send + Sync>;

/// A sink's crash points: no hook outside tests. One per sink, called at each named point.
#[derive(Clone, Default)]
pub struct CrashPoints(Option<CrashHook>);

impl CrashPoints {
    /// Calls `hook` at every crash point from now on.
    pub fn set(&mut self, hook: CrashHook) {
        self.0 = Some(hook);
    }

    /// The protocol reached `name`: a test may kill the process here.
    pub fn at(&self, name: &'static str) {
        if let Some(h) = &self.0 {
            h(name);
        }
    }
}

impl std::fmt::Debug for CrashPoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "hooked" } else { "none" })
    }
}
