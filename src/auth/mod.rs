//! Authentication to managed Kafka services that needs code rather than configuration:
//! Amazon MSK IAM (SASL/OAUTHBEARER with a token signed with AWS SigV4 from the standard AWS
//! credential chain). SASL PLAIN / SCRAM (Confluent Cloud, Event Hubs, MSK SCRAM) and TLS are
//! plain librdkafka configuration (`[kafka] security`, `properties`).

pub mod aws;
pub mod msk_iam;

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::client::OAuthToken;
use rdkafka::consumer::ConsumerContext;
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
}

impl KafkaAuth {
    pub fn from_config(cfg: &ValidatedConfig) -> Self {
        Self {
            msk_iam_region: cfg.msk_iam_region.clone(),
            tokens: Arc::default(),
            lifetime: None,
        }
    }

    /// A fresh OAUTHBEARER token. Called by librdkafka from a client's poll thread.
    pub fn oauth_token(&self) -> Result<OAuthToken, Box<dyn Error>> {
        let region = self.msk_iam_region.as_deref().ok_or(
            "OAUTHBEARER without a token source: set security.mechanism = \"AWS_MSK_IAM\" and security.region",
        )?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let creds = rt.block_on(aws::resolve(&aws::ProcessEnv, region))?;
        let now = chrono::Utc::now();
        let mut t = msk_iam::token(region, &creds, now);
        if let Some(l) = self.lifetime {
            t.expires_at_ms = t
                .expires_at_ms
                .min(now.timestamp_millis() + l.as_millis() as i64);
        }
        self.tokens.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(source = creds.source, region, "signed a new MSK IAM token");
        Ok(OAuthToken {
            token: t.token,
            principal_name: creds.access_key_id,
            lifetime_ms: t.expires_at_ms,
        })
    }
}

/// A client context that only authenticates (for `check`, `status` and the dead-letter
/// producer).
#[derive(Debug, Clone, Default)]
pub struct AuthContext(pub KafkaAuth);

impl ClientContext for AuthContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(&self, _config: Option<&str>) -> Result<OAuthToken, Box<dyn Error>> {
        self.0.oauth_token()
    }
}

impl ConsumerContext for AuthContext {}
