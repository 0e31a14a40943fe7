//! A Prometheus endpoint for the `metrics` facade: `metrics-exporter-prometheus` renders the
//! text format, a small hyper server answers `GET /metrics` on the address given (port 0: an
//! ephemeral one, printed by the caller).

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::Matcher;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::net::TcpListener;

/// Bucket bounds of the `*_seconds` histograms.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Installs the Prometheus recorder as the process's `metrics` recorder and serves it at
/// `http://{addr}/metrics`. Returns the bound address.
pub(crate) async fn serve(addr: SocketAddr) -> Result<SocketAddr, Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the metrics listener to {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let handle = PrometheusBuilder::new()
        // Gauges of peers that are gone stop being exported a while after their last update;
        // the mesh refreshes the gauges of live members every probe period.
        .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(120)))
        // Times (`reapi_queue_seconds`, `reapi_execution_seconds`) as Prometheus histograms,
        // from a millisecond to an hour, so replicas' buckets add up across the cluster.
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .map_err(|e| format!("configuring the histogram buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, handle.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

async fn answer(
    request: Request<Incoming>,
    handle: PrometheusHandle,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if request.uri().path() == "/metrics" {
        Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(handle.render())))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
    };
    Ok(response.unwrap_or_default())
}
