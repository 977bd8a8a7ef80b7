//! Authentication to managed Kafka services that needs code rather than configuration:
//! Amazon MSK IAM (SASL/OAUTHBEARER with a token signed with AWS SigV4 from the AWS SDK's
//! default credential chain, see [`crate::aws`]). SASL PLAIN / SCRAM (Confluent Cloud, Event
//! Hubs, MSK SCRAM), OAuth/OIDC (librdkafka's own client) and TLS are plain librdkafka
//! configuration (`[kafka] security`, `properties`).

pub mod msk_iam;

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::client::OAuthToken;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;

use crate::config::ValidatedConfig;

/// What a Kafka client needs to authenticate beyond librdkafka properties.
#[derive(Debug, Clone, Default)]
pub struct KafkaAuth {
    /// `security.mechanism = "AWS_MSK_IAM"`: the region whose MSK cluster is signed for.
    pub msk_iam_region: Option<String>,
    /// Tokens generated so far (for tests and logs).
    pub tokens: Arc<AtomicU64>,
    /// Announce a shorter lifetime than the token's 15 minutes (tests of the refresh timing).
    pub lifetime: Option<std::time::Duration>,
    /// The last client-level error librdkafka reported (a failed TLS handshake, a rejected
    /// login): what `check` and the dead-letter producer name when a request then fails with
    /// only "transport failure" or a timeout. librdkafka's messages carry no secrets.
    pub last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl KafkaAuth {
    pub fn from_config(cfg: &ValidatedConfig) -> Self {
        Self {
            msk_iam_region: cfg.msk_iam_region.clone(),
            tokens: Arc::default(),
            lifetime: None,
            last_error: Arc::default(),
        }
    }

    /// Records a client-level error (see [`KafkaAuth::last_error`]).
    pub fn record_error(&self, error: &KafkaError, reason: &str) {
        *self.last_error.lock().expect("last_error") = Some(format!("{error}: {reason}"));
    }

    /// The last client-level error with what to do about it, for an error message.
    pub fn explain_last_error(&self) -> Option<String> {
        let e = self.last_error.lock().expect("last_error").clone()?;
        Some(match connection_hint(&e) {
            Some(hint) => format!("{e} ({hint})"),
            None => e,
        })
    }

    /// A fresh OAUTHBEARER token. Called by librdkafka from a client's poll thread.
    pub fn oauth_token(&self) -> Result<OAuthToken, Box<dyn Error>> {
        let region = self.msk_iam_region.as_deref().ok_or(
            "OAUTHBEARER without a token source: set security.mechanism = \"AWS_MSK_IAM\" and security.region",
        )?;
        let creds = crate::aws::CredentialChain::shared(region).credentials_blocking()?;
        let now = chrono::Utc::now();
        let mut t = msk_iam::token(region, &creds, now);
        if let Some(l) = self.lifetime {
            t.expires_at_ms = t
                .expires_at_ms
                .min(now.timestamp_millis() + l.as_millis() as i64);
        }
        self.tokens.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(region, "signed a new MSK IAM token");
        Ok(OAuthToken {
            token: t.token,
            principal_name: creds.access_key_id,
            lifetime_ms: t.expires_at_ms,
        })
    }
}

/// Forwards a librdkafka log line to `tracing` (target `librdkafka`), keeping error lines as
/// the client's last error: librdkafka reports a failed login or TLS handshake as an error log
/// from its broker threads at once, while its error event waits for a poll that a blocking
/// metadata request never makes.
pub fn forward_log(
    auth: &KafkaAuth,
    level: rdkafka::config::RDKafkaLogLevel,
    fac: &str,
    message: &str,
) {
    use rdkafka::config::RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => {
            *auth.last_error.lock().expect("last_error") = Some(message.to_string());
            tracing::error!(target: "librdkafka", fac, "{message}");
        }
        Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
        Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// What to do about a connection error librdkafka reported, if it is a common one.
pub fn connection_hint(error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
    if e.contains("invalid username or password") || e.contains("authentication failed") {
        Some(
            "the broker rejected the login: check kafka.security.username / password and mechanism",
        )
    } else if e.contains("certificate verify failed") || e.contains("could not be verified") {
        Some("the broker's TLS certificate is not trusted: add the CA that signed it with kafka.properties ssl.ca.location")
    } else if e.contains("unsupported sasl mechanism") {
        Some("the broker does not offer this SASL mechanism: check kafka.security.mechanism")
    } else if e.contains("ssl handshake failed") || e.contains("disconnected while requesting") {
        Some("the TLS connection failed: check kafka.security.protocol and the port (SSL / SASL_SSL listener)")
    } else {
        None
    }
}

/// A client context that only authenticates (for `check`, `status` and the dead-letter
/// producer).
#[derive(Debug, Clone, Default)]
pub struct AuthContext(pub KafkaAuth);

impl ClientContext for AuthContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.record_error(&error, reason);
        if let Some(held) = super::repeats::admit(reason) {
            let more = super::repeats::suffix(held);
            tracing::warn!(target: "librdkafka", error = %error, "{reason}{more}");
        }
    }

    /// No statistics: these clients (`check`, `status`, the dead-letter producers) have no
    /// use for them, and rust-rdkafka's default logs each 4 KB report at INFO.
    fn stats_raw(&self, _statistics: &[u8]) {}

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(&self.0, level, fac, log_message);
    }

    fn generate_oauth_token(&self, _config: Option<&str>) -> Result<OAuthToken, Box<dyn Error>> {
        self.0.oauth_token()
    }
}

impl ConsumerContext for AuthContext {}
