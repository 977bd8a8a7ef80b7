//! A sink kind's own section of the service's config (`[sink.delta]`, `databend = {..}`): each
//! sink's `config.rs` defines the section as written (serde, unknown keys refused) and checks
//! it into the settings it builds from, so the service maps nothing by hand and adding an
//! option touches one file.

/// A value of a sink's section that cannot be used: `field` names it inside the section (the
/// service prefixes the section's key path), `reason` says why and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SectionError {
    /// The field inside the section.
    pub field: &'static str,
    /// Why the value cannot be used, and what to write instead.
    pub reason: String,
}

impl SectionError {
    /// `field` cannot be used because of `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}
