//! The standard AWS credential chain, in the SDKs' order: environment variables, web identity
//! (IRSA on EKS: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, exchanged with STS), the shared
//! credentials file (`AWS_PROFILE`, default `default`), then the EC2 instance metadata service
//! (IMDSv2). Endpoints can be overridden with `AWS_ENDPOINT_URL_STS` and
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT` (used by the tests).
//!
//! Invariant: secrets are [`Secret`]s; errors name the source that failed, never a secret.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::Secret;

/// Credentials for signing.
#[derive(Debug, Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// When temporary credentials expire.
    pub expires_at: Option<DateTime<Utc>>,
    /// Where they came from, for logs.
    pub source: &'static str,
}

/// Where to look up credentials (the process environment in production; tests inject their own).
pub trait Env: Send + Sync {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

/// Why no AWS credentials could be resolved (the message names the step of the chain and the
/// fix; never a secret).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CredentialsError(String);

impl From<String> for CredentialsError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for CredentialsError {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// Resolves credentials through the chain.
pub async fn resolve(env: &dyn Env, region: &str) -> Result<AwsCredentials, CredentialsError> {
    if let (Some(id), Some(secret)) = (
        env.var("AWS_ACCESS_KEY_ID"),
        env.var("AWS_SECRET_ACCESS_KEY"),
    ) {
        return Ok(AwsCredentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: env.var("AWS_SESSION_TOKEN").map(Secret::new),
            expires_at: None,
            source: "environment",
        });
    }
    if let (Some(token_file), Some(role)) = (
        env.var("AWS_WEB_IDENTITY_TOKEN_FILE"),
        env.var("AWS_ROLE_ARN"),
    ) {
        return web_identity(env, region, &token_file, &role).await;
    }
    if let Some(c) = profile(env)? {
        return Ok(c);
    }
    if env.var("AWS_EC2_METADATA_DISABLED").as_deref() != Some("true") {
        match imds(env).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                return Err(CredentialsError::from(format!(
                    "no AWS credentials: not in the environment (AWS_ACCESS_KEY_ID), no web \
                     identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN), no profile in the \
                     shared credentials file, and the instance metadata service failed: {e}"
                )))
            }
        }
    }
    Err(CredentialsError::from(
        "no AWS credentials found in the environment, web identity, shared credentials file or instance metadata",
    ))
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("http client")
}

fn xml_tag<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].trim())
}

async fn web_identity(
    env: &dyn Env,
    region: &str,
    token_file: &str,
    role: &str,
) -> Result<AwsCredentials, CredentialsError> {
    let token = std::fs::read_to_string(token_file).map_err(|e| {
        format!("web identity: cannot read AWS_WEB_IDENTITY_TOKEN_FILE {token_file}: {e}")
    })?;
    let endpoint = env
        .var("AWS_ENDPOINT_URL_STS")
        .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
    let session = env
        .var("AWS_ROLE_SESSION_NAME")
        .unwrap_or_else(|| "lakesink".into());
    let resp = http()
        .get(format!("{}/", endpoint.trim_end_matches('/')))
        .query(&[
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", role),
            ("RoleSessionName", session.as_str()),
            ("WebIdentityToken", token.trim()),
            ("DurationSeconds", "3600"),
        ])
        .send()
        .await
        .map_err(|e| {
            format!(
                "web identity: STS at {endpoint} is unreachable: {}",
                e.without_url()
            )
        })?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|e| format!("web identity: {}", e.without_url()))?;
    if !status.is_success() {
        let msg = xml_tag(&body, "Message").unwrap_or("no message");
        return Err(CredentialsError::from(format!(
            "web identity: STS refused AssumeRoleWithWebIdentity for {role} (HTTP {status}): {msg}"
        )));
    }
    let get = |t: &str| {
        xml_tag(&body, t)
            .map(str::to_string)
            .ok_or_else(|| format!("web identity: STS answer has no {t}"))
    };
    Ok(AwsCredentials {
        access_key_id: get("AccessKeyId")?,
        secret_access_key: Secret::new(get("SecretAccessKey")?),
        session_token: Some(Secret::new(get("SessionToken")?)),
        expires_at: xml_tag(&body, "Expiration").and_then(|e| e.parse().ok()),
        source: "web identity",
    })
}

fn profile(env: &dyn Env) -> Result<Option<AwsCredentials>, CredentialsError> {
    let path = match env.var("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => match env.var("HOME") {
            Some(h) => std::path::Path::new(&h).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let want = env.var("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let mut section = String::new();
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().trim_start_matches("profile ").to_string();
            continue;
        }
        if section != want {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok(Some(AwsCredentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: token.map(Secret::new),
            expires_at: None,
            source: "shared credentials file",
        })),
        (None, None) => Ok(None),
        _ => Err(CredentialsError::from(format!(
            "profile `{want}` in {} needs both aws_access_key_id and aws_secret_access_key",
            path.display()
        ))),
    }
}

async fn imds(env: &dyn Env) -> Result<AwsCredentials, CredentialsError> {
    let base = env
        .var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .unwrap_or_else(|| "http://169.254.169.254".into());
    let base = base.trim_end_matches('/');
    let http = http();
    let token = http
        .put(format!("{base}/latest/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
        .send()
        .await
        .map_err(|e| format!("IMDS token: {}", e.without_url()))?
        .text()
        .await
        .map_err(|e| format!("IMDS token: {}", e.without_url()))?;
    let get = |path: String| {
        let http = http.clone();
        let token = token.clone();
        async move {
            let r = http
                .get(path)
                .header("X-aws-ec2-metadata-token", token.trim())
                .send()
                .await
                .map_err(|e| format!("IMDS: {}", e.without_url()))?;
            if !r.status().is_success() {
                return Err(CredentialsError::from(format!("IMDS: HTTP {}", r.status())));
            }
            r.text()
                .await
                .map_err(|e| CredentialsError::from(format!("IMDS: {}", e.without_url())))
        }
    };
    let roles = get(format!("{base}/latest/meta-data/iam/security-credentials/")).await?;
    let role = roles
        .lines()
        .next()
        .ok_or("IMDS: the instance has no IAM role")?
        .trim()
        .to_string();
    let body = get(format!(
        "{base}/latest/meta-data/iam/security-credentials/{role}"
    ))
    .await?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("IMDS: bad credentials JSON: {e}"))?;
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("IMDS: no {k}"))
    };
    Ok(AwsCredentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: Secret::new(field("SecretAccessKey")?),
        session_token: Some(Secret::new(field("Token")?)),
        expires_at: v["Expiration"].as_str().and_then(|e| e.parse().ok()),
        source: "instance metadata",
    })
}
