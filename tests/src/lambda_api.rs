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

    /// This test binary again, running only its ignored test `lambda_child` with `child_env`
    /// set to 1, as Lambda runs a function: the Runtime API at `addr`, the function's name and
    /// memory. The caller adds the function's own configuration and spawns it.
    pub fn child_command(
        addr: SocketAddr,
        function: &str,
        memory_mb: u32,
        child_env: &str,
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "lambda_child", "--ignored", "--nocapture"])
            .env_remove("DARKROOM_CONFIG")
            .env(child_env, "1")
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", function)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory_mb.to_string())
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            // The child's test-harness chatter; its logs go to stderr.
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Waits up to `timeout` for the function's answer and asserts it was the response
    /// `{"status": "ok"}` to the one invocation.
    pub async fn assert_answered_ok(&self, timeout: std::time::Duration) {
        let responses = crate::wait_for(
            timeout,
            || async { self.responses.lock().await.clone() },
            |r| !r.is_empty(),
        )
        .await;
        assert_eq!(
            responses[0],
            (
                "req-1".to_owned(),
                "response".to_owned(),
                serde_json::json!({"status": "ok"})
            )
        );
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
