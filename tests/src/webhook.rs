//! A scripted webhook receiver: an HTTP server on 127.0.0.1 that answers each request with the
//! next reply of its script (200 once it runs out), or not at all while told to hang, and
//! records what it got.

// Test harness: a failure here is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// One answer of the receiver.
#[derive(Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// A `Retry-After` header value.
    pub retry_after: Option<&'static str>,
}

/// A reply with this status and no `Retry-After`.
pub fn status(status: u16) -> Reply {
    Reply {
        status,
        retry_after: None,
    }
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    /// Its headers, names in lower case.
    pub headers: HashMap<String, String>,
    /// Its body.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct ReceiverState {
    script: Mutex<VecDeque<Reply>>,
    received: Mutex<Vec<Received>>,
    hanging: AtomicBool,
}

/// An HTTP server on 127.0.0.1 answering from a script (200 once it runs out).
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts answering from `script`.
    pub async fn start(script: Vec<Reply>) -> Self {
        use axum::extract::State;
        use axum::http::{HeaderMap as HttpHeaders, StatusCode};
        use axum::response::IntoResponse;

        async fn hook(
            State(state): State<Arc<ReceiverState>>,
            headers: HttpHeaders,
            body: Bytes,
        ) -> axum::response::Response {
            let hang = state.hanging.load(Ordering::SeqCst);
            let reply = state
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(status(200));
            state.received.lock().unwrap().push(Received {
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                    .collect(),
                body,
                at: Instant::now(),
            });
            if hang {
                // Never answer: the sender's request timeout ends it.
                std::future::pending::<()>().await;
            }
            let code = StatusCode::from_u16(reply.status).unwrap();
            match reply.retry_after {
                Some(after) => (code, [("retry-after", after)], "scripted").into_response(),
                None => (code, "scripted").into_response(),
            }
        }

        let state = Arc::new(ReceiverState::default());
        state.script.lock().unwrap().extend(script);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, state, task }
    }

    /// The URL to register.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// From now on, record requests but never answer them (`true`), or answer again (`false`).
    pub fn hang(&self, hanging: bool) {
        self.state.hanging.store(hanging, Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The requests once there are at least `count` (panics after 30 s).
    pub async fn wait_for_requests(&self, count: usize) -> Vec<Received> {
        crate::wait_for(
            Duration::from_secs(30),
            || async { self.received() },
            |r| r.len() >= count,
        )
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
