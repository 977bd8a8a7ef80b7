//! Amazon MSK IAM authentication: an OAUTHBEARER token that is a SigV4-presigned
//! `kafka-cluster:Connect` request, exactly as AWS's `aws-msk-iam-sasl-signer` libraries build
//! it (base64url, unpadded, of `https://kafka.<region>.amazonaws.com/?Action=...&X-Amz-...`
//! plus a `User-Agent` parameter), valid for 15 minutes.
//!
//! librdkafka asks for a new token at 80 % of its lifetime from the client's poll loop; lakesink
//! polls its consumer continuously (idle or not) and the dead-letter producer polls from its own
//! thread, so tokens are refreshed in the background before they expire.

use chrono::{DateTime, Utc};

use crate::aws::AwsCredentials;

/// Token lifetime, as the AWS signers use.
pub const EXPIRES_SECONDS: i64 = 900;
const SERVICE: &str = "kafka-cluster";

/// A signed token and when it expires.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: String,
    pub expires_at_ms: i64,
}

/// AWS URI encoding: unreserved characters stay, everything else is `%XX`.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The presigned URL (without the user agent), signed at `now` with SigV4 (`aws-sigv4`, the
/// AWS SDK's signer): a `GET` of `https://kafka.<region>.amazonaws.com/?Action=...` signed in
/// its query parameters for [`EXPIRES_SECONDS`], as botocore's presigner does.
pub fn presigned_url(region: &str, creds: &AwsCredentials, now: DateTime<Utc>) -> String {
    use aws_sigv4::http_request::{
        sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    };
    let url = format!("https://kafka.{region}.amazonaws.com/?Action=kafka-cluster%3AConnect");
    let identity = aws_credential_types::Credentials::new(
        &creds.access_key_id,
        creds.secret_access_key.expose(),
        creds.session_token.as_ref().map(|t| t.expose().to_string()),
        None,
        "lakesink",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(std::time::Duration::from_secs(EXPIRES_SECONDS as u64));
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(now.into())
        .settings(settings)
        .build()
        .expect("every signing parameter is set")
        .into();
    let request = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::empty(),
        SignableBody::Bytes(&[]),
    )
    .expect("a valid URL");
    let (instructions, _) = sign(request, &params)
        .expect("SigV4 signs a request with static credentials")
        .into_parts();
    // The signature last, as botocore (and AWS's MSK IAM signers) write it.
    let mut params: Vec<_> = instructions.params().iter().collect();
    params.sort_by_key(|(k, _)| *k == "X-Amz-Signature");
    let mut out = url;
    for (k, v) in params {
        out.push('&');
        out.push_str(&encode(k));
        out.push('=');
        out.push_str(&encode(v));
    }
    out
}

/// The OAUTHBEARER token for `region`, signed at `now`.
pub fn token(region: &str, creds: &AwsCredentials, now: DateTime<Utc>) -> Token {
    use base64::Engine;
    let url = format!(
        "{}&User-Agent={}",
        presigned_url(region, creds, now),
        encode(&format!("lakesink/{}", env!("CARGO_PKG_VERSION")))
    );
    Token {
        token: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url),
        expires_at_ms: now.timestamp_millis() + EXPIRES_SECONDS * 1000,
    }
}
