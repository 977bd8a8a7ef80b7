//! Amazon MSK IAM authentication: an OAUTHBEARER token that is a SigV4-presigned
//! `kafka-cluster:Connect` request, exactly as AWS's `aws-msk-iam-sasl-signer` libraries build
//! it (base64url, unpadded, of `https://kafka.<region>.amazonaws.com/?Action=...&X-Amz-...`
//! plus a `User-Agent` parameter), valid for 15 minutes.
//!
//! librdkafka asks for a new token at 80 % of its lifetime from the client's poll loop; lakesink
//! polls its consumer continuously (idle or not) and the dead-letter producer polls from its own
//! thread, so tokens are refreshed in the background before they expire.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::aws::AwsCredentials;

/// Token lifetime, as the AWS signers use.
pub const EXPIRES_SECONDS: i64 = 900;
const SERVICE: &str = "kafka-cluster";
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A signed token and when it expires.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: String,
    pub expires_at_ms: i64,
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// The presigned URL (without the user agent), signed at `now`.
pub fn presigned_url(region: &str, creds: &AwsCredentials, now: DateTime<Utc>) -> String {
    let host = format!("kafka.{region}.amazonaws.com");
    let datetime = now.format("%Y%m%dT%H%M%SZ").to_string();
    let date = now.format("%Y%m%d").to_string();
    let scope = format!("{date}/{region}/{SERVICE}/aws4_request");
    let mut params: Vec<(&str, String)> = vec![
        ("Action", "kafka-cluster:Connect".into()),
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".into()),
        (
            "X-Amz-Credential",
            format!("{}/{scope}", creds.access_key_id),
        ),
        ("X-Amz-Date", datetime.clone()),
        ("X-Amz-Expires", EXPIRES_SECONDS.to_string()),
        ("X-Amz-SignedHeaders", "host".into()),
    ];
    if let Some(t) = &creds.session_token {
        params.push(("X-Amz-Security-Token", t.expose().to_string()));
    }
    // The URL keeps the operation parameter first, then the auth parameters (as botocore);
    // the canonical form sorts them.
    let url_query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    let mut sorted = url_query.clone();
    sorted.sort();
    let canonical_request = format!(
        "GET\n/\n{}\nhost:{host}\n\nhost\n{EMPTY_SHA256}",
        sorted.join("&")
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{datetime}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac(
        format!("AWS4{}", creds.secret_access_key.expose()).as_bytes(),
        &date,
    );
    let k_region = hmac(&k_date, region);
    let k_service = hmac(&k_region, SERVICE);
    let k_signing = hmac(&k_service, "aws4_request");
    let signature = hex(&hmac(&k_signing, &string_to_sign));
    format!(
        "https://{host}/?{}&X-Amz-Signature={signature}",
        url_query.join("&")
    )
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
