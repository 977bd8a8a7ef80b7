//! Observability: the HTTP listener that serves the metrics (`/metrics`: OpenMetrics text when
//! the scraper asks for it, as Prometheus does, else the Prometheus text format; see
//! [`exposition`]), `/healthz` and `/readyz` (what stops readiness, by partition).
//!
//! Invariant: nothing here is on the per-record hot path except relaxed atomic increments;
//! histograms are observed once per flush and commit.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::pipeline::Progress;

mod exposition;

pub use exposition::render;

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` in the background.
pub async fn serve(addr: SocketAddr, progress: Arc<Progress>) -> std::io::Result<SocketAddr> {
    let metrics = progress.clone();
    let ready = progress.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let p = metrics.clone();
                async move {
                    let openmetrics = headers
                        .get(axum::http::header::ACCEPT)
                        .and_then(|a| a.to_str().ok())
                        .is_some_and(|a| a.contains("application/openmetrics-text"));
                    let (content_type, body) = render(&p, openmetrics);
                    ([("content-type", content_type)], body)
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let p = ready.clone();
                async move {
                    let stalled = p.stalled.lock().expect("progress").clone();
                    let quarantined = p.quarantined.lock().expect("progress").clone();
                    if p.ready() {
                        (StatusCode::OK, "ready\n".to_string())
                    } else if p.health.draining.load(Relaxed) {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string())
                    } else if !stalled.is_empty() {
                        let lines: Vec<String> = stalled
                            .iter()
                            .map(|(tp, (offset, cause))| {
                                format!("partition {tp} stalled at offset {offset}: {cause}\n")
                            })
                            .collect();
                        (StatusCode::SERVICE_UNAVAILABLE, lines.concat())
                    } else if !quarantined.is_empty() {
                        let lines: Vec<String> = quarantined
                            .iter()
                            .map(|((tp, sink), why)| {
                                format!("partition {tp} quarantined (sink {sink}): {why}\n")
                            })
                            .collect();
                        (StatusCode::SERVICE_UNAVAILABLE, lines.concat())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no partitions assigned\n".to_string(),
                        )
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn probes_and_metrics_over_http() {
        let p = Arc::new(Progress::default());
        p.sink("orders").rows_written.fetch_add(42, Relaxed);
        p.tables.lock().unwrap().insert(
            ("orders".into(), "shop.public.orders".into()),
            "s3://lake/cdc/public/orders".into(),
        );
        p.sink("orders")
            .commit_seconds
            .observe(Duration::from_millis(30));
        let addr = serve("127.0.0.1:0".parse().unwrap(), p.clone())
            .await
            .unwrap();
        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            async move {
                let r = reqwest::get(url).await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(get("/healthz").await.0, 200);
        assert_eq!(get("/readyz").await.0, 503, "no partitions yet");
        p.health.assigned.store(true, Relaxed);
        assert_eq!(get("/readyz").await.0, 200);
        p.health.draining.store(true, Relaxed);
        let (code, body) = get("/readyz").await;
        assert_eq!((code, body.as_str()), (503, "draining\n"));
        let (_, m) = get("/metrics").await;
        assert!(
            m.contains("lakesink_rows_written_total{sink=\"orders\"} 42"),
            "{m}"
        );
        assert!(
            m.contains("lakesink_commit_seconds_bucket{sink=\"orders\",le=\"0.05\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("lakesink_commit_seconds_count{sink=\"orders\"} 1"),
            "{m}"
        );
        assert!(
            m.contains(
                "lakesink_table_info{sink=\"orders\",topic=\"shop.public.orders\",table=\"s3://lake/cdc/public/orders\"} 1"
            ),
            "{m}"
        );
        // Freshness has buckets of its own, up to an hour.
        assert!(
            m.contains("lakesink_freshness_seconds_bucket{sink=\"orders\",le=\"3600\"} 0"),
            "{m}"
        );
        assert!(!m.contains("# EOF"), "the Prometheus text format: {m}");
        // OpenMetrics for a scraper that asks for it, as Prometheus does.
        let r = reqwest::Client::new()
            .get(format!("http://{addr}/metrics"))
            .header(
                "accept",
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            )
            .send()
            .await
            .unwrap();
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        let om = r.text().await.unwrap();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE lakesink_rows_written counter"), "{om}");
        assert!(
            om.contains("lakesink_rows_written_total{sink=\"orders\"} 42"),
            "{om}"
        );
    }
}
