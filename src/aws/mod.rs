//! AWS credentials for MSK IAM and for S3 tables, from the AWS SDK's default credential chain
//! (`aws-config`), the one the AWS SDKs and CLI use, in their order: environment variables; the shared config and
//! credentials files (`AWS_PROFILE`, static keys, `credential_process`, SSO, assume-role
//! profiles); web identity (IRSA on EKS: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`);
//! container credentials (ECS task roles and EKS Pod Identity:
//! `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` / `_FULL_URI` with
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`); then the EC2 instance metadata service (IMDSv2).
//! Endpoints follow the SDK's settings (`AWS_ENDPOINT_URL_STS`,
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`; the tests use them).
//!
//! S3 Parquet tables take it through [`s3::ChainForObjectStore`]; S3 Delta tables through
//! deltalake's own use of the same SDK chain (`DefaultCredentialsChain`). A `storage` table with
//! keys (`access_key_id`, `secret_access_key`) uses those instead.
//!
//! Invariants: one chain per process and region, built once; credentials are kept until five
//! minutes before they expire (static ones are looked up again every 15 minutes, so a rotated
//! credentials file is picked up), so a token refresh does not walk the chain. Secrets are
//! [`Secret`]s; errors name the chain's failure, never a secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use chrono::{DateTime, Utc};

use crate::config::Secret;

pub mod s3;

/// Credentials for signing.
#[derive(Debug, Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// When temporary credentials expire.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Why no AWS credentials could be resolved (the message names the chain's failure and the
/// fix; never a secret).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CredentialsError(String);

/// Credentials kept this long before their expiry are fetched again.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// Credentials without an expiry (keys) are looked up again after this long.
const RECHECK_STATIC: Duration = Duration::from_secs(900);

/// The default credential chain for one region, with what it last returned.
pub struct CredentialChain {
    provider: SharedCredentialsProvider,
    cached: Mutex<Option<(AwsCredentials, Instant)>>,
}

impl std::fmt::Debug for CredentialChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialChain").finish_non_exhaustive()
    }
}

/// The runtime that drives the chain's requests (STS, SSO, container and instance metadata):
/// one per process, so the SDK's connection pools outlive each token refresh.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lakesink-aws-credentials")
            .enable_all()
            .build()
            .expect("a runtime for AWS credentials")
    })
}

impl CredentialChain {
    /// A fresh chain for `region` (reads the environment and files as they are now).
    pub async fn new(region: &str) -> Self {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .load()
            .await;
        let provider = config
            .credentials_provider()
            .expect("aws-config's defaults always have a credentials provider");
        Self {
            provider,
            cached: Mutex::new(None),
        }
    }

    /// The process's chain for `region`, built at first use. Blocks: for threads outside any
    /// runtime (librdkafka's).
    pub fn shared(region: &str) -> Arc<CredentialChain> {
        runtime().block_on(Self::shared_async(region))
    }

    /// [`CredentialChain::shared`] for async callers.
    pub async fn shared_async(region: &str) -> Arc<CredentialChain> {
        static CHAINS: OnceLock<Mutex<HashMap<String, Arc<CredentialChain>>>> = OnceLock::new();
        let chains = CHAINS.get_or_init(Mutex::default);
        if let Some(c) = chains.lock().expect("chains").get(region) {
            return c.clone();
        }
        let chain = Arc::new(CredentialChain::new(region).await);
        chains
            .lock()
            .expect("chains")
            .entry(region.to_string())
            .or_insert(chain)
            .clone()
    }

    /// Credentials, from the cache while they are good (see the module doc). Blocks: for
    /// librdkafka's token refresh callback, which runs on a client's own thread.
    pub fn credentials_blocking(&self) -> Result<AwsCredentials, CredentialsError> {
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        runtime().block_on(self.credentials())
    }

    fn fresh(&self) -> Option<AwsCredentials> {
        let cached = self.cached.lock().expect("credentials cache");
        let (c, fetched) = cached.as_ref()?;
        let good = match c.expires_at {
            Some(at) => at - chrono::Duration::from_std(REFRESH_BEFORE_EXPIRY).ok()? > Utc::now(),
            None => fetched.elapsed() < RECHECK_STATIC,
        };
        good.then(|| c.clone())
    }

    /// Credentials, from the cache while they are good, else from the chain.
    pub async fn credentials(&self) -> Result<AwsCredentials, CredentialsError> {
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        let c = self.provider.provide_credentials().await.map_err(|e| {
            // Each cause's message, not the SDK's debug form (which can hold response bodies).
            let mut why = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                why.push_str(": ");
                why.push_str(&c.to_string());
                cause = c.source();
            }
            CredentialsError(format!(
                "no AWS credentials: {why} (the default chain looks at the \
                 environment, the shared config and credentials files, web identity, ECS or EKS \
                 Pod Identity container credentials, then the instance metadata service)"
            ))
        })?;
        let c = AwsCredentials {
            access_key_id: c.access_key_id().to_string(),
            secret_access_key: Secret::new(c.secret_access_key()),
            session_token: c.session_token().map(Secret::new),
            expires_at: c.expiry().map(DateTime::<Utc>::from),
        };
        *self.cached.lock().expect("credentials cache") = Some((c.clone(), Instant::now()));
        Ok(c)
    }
}
