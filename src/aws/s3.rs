//! S3 tables' credentials from the process's AWS SDK chain ([`super::CredentialChain`]), as an
//! object_store credential provider: what object_store reads by itself (static keys, instance
//! metadata) misses profiles, SSO, `credential_process`, assume-role and EKS Pod Identity.
//!
//! Invariant: the chain is walked on its own runtime (its STS, SSO and metadata requests never
//! run on, or block, a table's runtime), and credentials are cached by the chain.

use std::sync::Arc;

use object_store::aws::AwsCredential;
use object_store::CredentialProvider;

use super::{runtime, CredentialChain};

/// The default chain for `region`, for an S3 object store.
#[derive(Debug)]
pub struct ChainForObjectStore {
    region: String,
}

impl ChainForObjectStore {
    pub fn new(region: &str) -> Self {
        Self {
            region: region.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl CredentialProvider for ChainForObjectStore {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let region = self.region.clone();
        let c = runtime()
            .spawn(async move {
                CredentialChain::shared_async(&region)
                    .await
                    .credentials()
                    .await
            })
            .await
            .map_err(|e| generic(e.to_string()))?
            .map_err(|e| generic(e.to_string()))?;
        Ok(Arc::new(AwsCredential {
            key_id: c.access_key_id,
            secret_key: c.secret_access_key.expose().to_string(),
            token: c.session_token.map(|t| t.expose().to_string()),
        }))
    }
}

fn generic(why: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "S3",
        source: why.into(),
    }
}

/// The credential provider for an S3 table with `storage` options, or `None` when the options
/// carry keys (or ask for unsigned requests) and object_store needs nothing else.
pub fn provider_for(storage: &[(String, String)]) -> Option<sinks::store::AwsCredentialProvider> {
    let has = |names: &[&str]| {
        storage.iter().any(|(k, _)| {
            let k = k.to_ascii_lowercase();
            names.iter().any(|n| k == *n || k == format!("aws_{n}"))
        })
    };
    if has(&["access_key_id", "secret_access_key", "skip_signature"]) {
        return None;
    }
    let region = storage
        .iter()
        .find(|(k, _)| {
            let k = k.to_ascii_lowercase();
            k == "region" || k == "aws_region"
        })
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into());
    Some(Arc::new(ChainForObjectStore::new(&region)))
}
