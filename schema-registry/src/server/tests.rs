use super::*;
use crate::{RegistryClient, RegistryConfig, SchemaId};

const S1: &str = r#"{"type":"record","name":"E","fields":[{"name":"x","type":"long"}]}"#;

#[tokio::test]
async fn register_fetch_persist_and_single_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, task) = spawn("127.0.0.1:0".parse().unwrap(), Some(dir.path().into()))
        .await
        .unwrap();
    let client = RegistryClient::new(RegistryConfig::new(format!("http://{addr}"))).unwrap();
    let id = client.register("t-value", S1).await.unwrap();
    // Idempotent, whitespace-insensitive re-registration.
    let spaced = S1.replace(',', " , ");
    assert_eq!(client.register("t-value", &spaced).await.unwrap(), id);
    assert_eq!(client.latest("t-value").await.unwrap().version, 1);
    // 16 concurrent misses, one request.
    let futs = (0..16).map(|_| client.schema(id));
    for s in futures_join(futs).await {
        assert_eq!(s.unwrap().schema, S1);
    }
    assert_eq!(client.fetches(), 1);
    let e = client.schema(SchemaId(999)).await.unwrap_err();
    assert!(
        matches!(e, crate::Error::SchemaNotFound { code: 40403, .. }),
        "{e}"
    );
    let e = client.latest("nope").await.unwrap_err();
    assert!(
        matches!(e, crate::Error::SubjectNotFound { code: 40401, .. }),
        "{e}"
    );
    task.abort();
    // Restart on the same directory: the id survives.
    let (addr, _task) = spawn("127.0.0.1:0".parse().unwrap(), Some(dir.path().into()))
        .await
        .unwrap();
    let client = RegistryClient::new(RegistryConfig::new(format!("http://{addr}"))).unwrap();
    assert_eq!(client.schema(id).await.unwrap().schema, S1);
    assert_eq!(client.register("other-value", S1).await.unwrap(), id);
}

#[tokio::test]
async fn incompatible_versions_are_refused_and_testable() {
    let (addr, _task) = spawn("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let client = RegistryClient::new(RegistryConfig::new(format!("http://{addr}"))).unwrap();
    client.register("s-value", S1).await.unwrap();
    let added_optional = r#"{"type":"record","name":"E","fields":[{"name":"x","type":"long"},{"name":"y","type":["null","string"],"default":null}]}"#;
    let added_required = r#"{"type":"record","name":"E","fields":[{"name":"x","type":"long"},{"name":"z","type":"string"}]}"#;
    assert!(
        client
            .compatible("s-value", added_optional)
            .await
            .unwrap()
            .0
    );
    let (ok, messages) = client.compatible("s-value", added_required).await.unwrap();
    assert!(!ok);
    assert!(messages.iter().any(|m| m.contains("`z`")), "{messages:?}");
    let e = client
        .register("s-value", added_required)
        .await
        .unwrap_err();
    assert!(matches!(e, crate::Error::Incompatible { .. }), "{e}");
    assert!(e.to_string().contains("no default"), "{e}");
    // The refused schema did not burn an id: the next registration gets 2.
    assert_eq!(
        client.register("s-value", added_optional).await.unwrap(),
        SchemaId(2)
    );
}

#[tokio::test]
async fn references_are_stored_and_inlined_by_the_client() {
    let (addr, _task) = spawn("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let client = RegistryClient::new(RegistryConfig::new(format!("http://{addr}"))).unwrap();
    let address = r#"{"type":"record","name":"Address","namespace":"com.acme","fields":[{"name":"city","type":"string"}]}"#;
    let order = r#"{"type":"record","name":"Order","namespace":"com.acme","fields":[{"name":"ship","type":"com.acme.Address"},{"name":"bill","type":["null","com.acme.Address"],"default":null}]}"#;
    client.register("address", address).await.unwrap();
    let refs = [crate::references::Reference {
        name: "com.acme.Address".into(),
        subject: "address".into(),
        version: 1,
    }];
    let id = client
        .register_with_references("orders-value", order, &refs)
        .await
        .unwrap();
    let got: Value = serde_json::from_str(&client.schema(id).await.unwrap().schema).unwrap();
    assert_eq!(got["fields"][0]["type"]["type"], "record", "{got}");
    assert_eq!(got["fields"][0]["type"]["name"], "Address");
    assert_eq!(
        got["fields"][1]["type"],
        json!(["null", "com.acme.Address"])
    );
    // A reference to a missing subject is refused.
    let bad = [crate::references::Reference {
        name: "com.acme.Address".into(),
        subject: "nope".into(),
        version: 1,
    }];
    let e = client
        .register_with_references("x-value", order, &bad)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("42201"), "{e}");
}

/// A registry that fails the first `fail` requests with 503 and requires a bearer token.
async fn flaky(fail: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new().route(
        "/schemas/ids/{id}",
        get(move |Path(id): Path<u32>, headers: axum::http::HeaderMap| {
            let c = c.clone();
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst);
                if headers.get("authorization").and_then(|v| v.to_str().ok())
                    != Some("Bearer t0ken")
                {
                    return ApiError(StatusCode::UNAUTHORIZED, 401, "unauthorized".into())
                        .into_response();
                }
                if n < fail {
                    return ApiError(StatusCode::SERVICE_UNAVAILABLE, 50301, "try later".into())
                        .into_response();
                }
                if id != 1 {
                    return ApiError(StatusCode::NOT_FOUND, 40403, "Schema not found".into())
                        .into_response();
                }
                Json(json!({ "schema": S1 })).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), calls)
}

#[tokio::test]
async fn retries_5xx_never_4xx_and_sends_the_bearer_token() {
    use std::sync::atomic::Ordering;
    let (url, calls) = flaky(2).await;
    let mut cfg = RegistryConfig::new(&url);
    cfg.bearer_token = Some("t0ken".into());
    let client = RegistryClient::new(cfg.clone()).unwrap();
    assert_eq!(client.schema(SchemaId(1)).await.unwrap().schema, S1);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two 503s, then success");
    calls.store(100, Ordering::SeqCst);
    let e = client.schema(SchemaId(2)).await.unwrap_err();
    assert!(matches!(e, crate::Error::SchemaNotFound { .. }), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 101, "a 404 is not retried");
    let no_token = RegistryClient::new(RegistryConfig::new(&url)).unwrap();
    let e = no_token.schema(SchemaId(1)).await.unwrap_err();
    assert!(
        matches!(e, crate::Error::Rejected { status: 401, .. }),
        "{e}"
    );
    assert!(
        !format!("{e} {cfg:?}").contains("t0ken"),
        "the token never prints"
    );
}

async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.collect();
    let mut out = Vec::new();
    // Poll them concurrently on one task.
    let joined = futures::future::join_all(handles).await;
    out.extend(joined);
    out
}

#[tokio::test]
async fn invalid_avro_is_refused_and_renamed_records_are_incompatible() {
    let (addr, _task) = spawn("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let client = RegistryClient::new(RegistryConfig::new(format!("http://{addr}"))).unwrap();
    for (bad, why) in [
        (
            r#"{"type":"record","name":"E","fields":[{"name":"x","type":"strng"}]}"#,
            "an unknown type",
        ),
        (
            r#"{"type":"enum","name":"S","symbols":["A","A"]}"#,
            "a repeated enum symbol",
        ),
        (
            r#"{"type":"record","name":"E","fields":[{"name":"x","type":"long","default":"seven"}]}"#,
            "a default of the wrong type",
        ),
        (r#"{"type":"fixed","name":"F"}"#, "a fixed without size"),
    ] {
        let e = client.register("bad-value", bad).await.unwrap_err();
        assert!(e.to_string().contains("42201"), "{why}: {e}");
    }
    // The same schema with its keys in another order is the same schema.
    let id = client.register("t-value", S1).await.unwrap();
    let reordered = r#"{"fields":[{"type":"long","name":"x"}],"name":"E","type":"record"}"#;
    assert_eq!(client.register("t-value", reordered).await.unwrap(), id);
    // A record renamed without an alias cannot read what the old name wrote.
    let renamed = r#"{"type":"record","name":"F","fields":[{"name":"x","type":"long"}]}"#;
    let e = client.register("t-value", renamed).await.unwrap_err();
    assert!(e.to_string().contains("incompatible"), "{e}");
    assert!(e.to_string().contains("`E` is not the reader's `F`"), "{e}");
    let aliased =
        r#"{"type":"record","name":"F","aliases":["E"],"fields":[{"name":"x","type":"long"}]}"#;
    client.register("t-value", aliased).await.unwrap();
}
