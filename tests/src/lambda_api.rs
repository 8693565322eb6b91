//! A fake AWS Lambda Runtime API (<https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html>):
//! serves one event on `next` and records what the function answers, so a test can run a
//! function's real `lambda_runtime` loop in a child process.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use serde_json::Value;

/// The event to serve and what the function answered.
#[derive(Default)]
pub struct RuntimeApi {
    /// Served once by `next`; later polls wait forever (until the child is stopped).
    pub event: Mutex<Option<Value>>,
    /// `(request id, "response" or "error", body)` per answer.
    pub responses: tokio::sync::Mutex<Vec<(String, String, Value)>>,
    /// The function name in the invoked ARN.
    function: Mutex<String>,
}

impl RuntimeApi {
    /// Serves `api` on a free loopback port as function `function`; returns the address (for
    /// `AWS_LAMBDA_RUNTIME_API`) and the server task.
    pub async fn serve(
        api: Arc<RuntimeApi>,
        function: &str,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        *api.function.lock().unwrap() = function.to_owned();
        let app = axum::Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route("/2018-06-01/runtime/invocation/{id}/{kind}", post(outcome))
            .with_state(api);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (addr, task)
    }
}

async fn next(State(api): State<Arc<RuntimeApi>>) -> (HeaderMap, String) {
    let event = api.event.lock().unwrap().take();
    let Some(event) = event else {
        // One invocation only.
        std::future::pending::<()>().await;
        unreachable!();
    };
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    let function = api.function.lock().unwrap().clone();
    let mut headers = HeaderMap::new();
    headers.insert("lambda-runtime-aws-request-id", "req-1".parse().unwrap());
    headers.insert(
        "lambda-runtime-deadline-ms",
        deadline.to_string().parse().unwrap(),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        format!("arn:aws:lambda:eu-west-1:123456789012:function:{function}")
            .parse()
            .unwrap(),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        "Root=1-5759e988-bd862e3fe1be46a994272793".parse().unwrap(),
    );
    (headers, event.to_string())
}

async fn outcome(
    State(api): State<Arc<RuntimeApi>>,
    Path((id, kind)): Path<(String, String)>,
    body: Bytes,
) -> axum::http::StatusCode {
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    api.responses.lock().await.push((id, kind, body));
    axum::http::StatusCode::ACCEPTED
}
