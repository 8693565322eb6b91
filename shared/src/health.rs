//! Health endpoints for orchestrators: `GET /healthz` answers 200 while the process runs,
//! `GET /readyz` answers 200 only while the function is ready to take work (the inference
//! worker: once its model is loaded) and 503 otherwise, and `POST /drain` (or GET) stops taking work
//! (as SIGTERM does) and answers once the message in hand is settled: a Kubernetes preStop
//! hook, so a pod is only signalled once it is idle. Served on `health_addr` when set.

use std::net::SocketAddr;

use axum::http::StatusCode;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Result, RuntimeError};

/// Whether the function is ready; starts not ready.
#[derive(Debug, Clone)]
pub struct Readiness(watch::Sender<bool>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(watch::Sender::new(false))
    }
}

impl Readiness {
    /// Marks the function ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.send_replace(ready);
    }

    /// Whether it is ready now.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the function is not ready (returns at once when it is not).
    pub async fn wait_not_ready(&self) {
        let mut ready = self.0.subscribe();
        let _ = ready.wait_for(|ready| !*ready).await;
    }
}

/// Serves `/healthz` and `/readyz` on `addr` until `shutdown` fires; returns once listening.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RuntimeError::Telemetry(format!("health endpoint on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| RuntimeError::Telemetry(format!("health endpoint on {addr}: {e}")))?;
    let drain = {
        let readiness = readiness.clone();
        let shutdown = shutdown.clone();
        move || {
            let readiness = readiness.clone();
            let shutdown = shutdown.clone();
            async move {
                tracing::info!("drain requested: no new work; waiting for the message in hand");
                shutdown.cancel();
                readiness.wait_not_ready().await;
                "drained"
            }
        }
    };
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        // GET too: a Kubernetes preStop `httpGet` hook can only send GET.
        .route("/drain", axum::routing::post(drain.clone()).get(drain))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        );
    tokio::spawn(async move {
        // Not stopped by `shutdown`: a drain request that fired it is still to be answered, and
        // the endpoint goes away with the process.
        let stopped = axum::serve(listener, app);
        if let Err(error) = stopped.await {
            tracing::warn!(%error, "health endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> u16 {
        request(addr, "GET", path).await
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response[9..12].parse().unwrap()
    }

    #[tokio::test]
    async fn ready_only_once_told() {
        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        assert_eq!(get(addr, "/healthz").await, 200);
        assert_eq!(get(addr, "/readyz").await, 503);
        readiness.set(true);
        assert_eq!(get(addr, "/readyz").await, 200);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_drain_stops_intake_and_answers_once_idle() {
        let readiness = Readiness::default();
        readiness.set(true);
        let shutdown = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let drain = tokio::spawn(async move { request(addr, "POST", "/drain").await });
        // The consumer loop sees the shutdown, settles its message, then reports not ready.
        shutdown.cancelled().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !drain.is_finished(),
            "answered before the work in hand was settled"
        );
        readiness.set(false);
        assert_eq!(drain.await.unwrap(), 200);
    }
}
