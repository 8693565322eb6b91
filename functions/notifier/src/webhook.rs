//! One webhook request: signed, sent only to a permitted address, bounded in time and in the
//! response read, and classified for the retry policy.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};

use crate::endpoint::{Endpoint, Registry};
use crate::network::{PolicyResolver, TargetRefused, refusal_in};
use crate::retry::parse_retry_after;
use crate::signature::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, signature_header};

/// Limits of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Time to establish the connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Time for the whole request, response body included.
    pub request_timeout: Duration,
    /// Bytes of the response body read (for the log); the rest is dropped with the connection.
    pub max_response_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_response_bytes: 64 * 1024,
        }
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx answer.
    Delivered {
        /// The status.
        status: u16,
    },
    /// `410 Gone`: the receiver wants nothing more; the endpoint is to be disabled.
    Gone,
    /// Any other answer, or no answer: worth another try.
    Failed {
        /// The status, when there was an answer.
        status: Option<u16>,
        /// For the log and the dead letter.
        error: String,
        /// What `Retry-After` asked for, when present and readable.
        retry_after: Option<Duration>,
    },
    /// The target is refused by the network policy; no request was made.
    Refused(TargetRefused),
}

/// Sends webhook requests; one HTTP client per endpoint, each resolving through that
/// endpoint's network policy.
#[derive(Debug, Clone)]
pub struct WebhookSender {
    clients: HashMap<String, reqwest::Client>,
    limits: RequestLimits,
}

/// The HTTP client could not be built (TLS set-up).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for webhook endpoint {endpoint}: {message}")]
pub struct ClientError {
    /// The endpoint.
    pub endpoint: String,
    /// What reqwest said.
    pub message: String,
}

impl WebhookSender {
    /// Clients for every endpoint of `registry`.
    ///
    /// # Errors
    /// A client that cannot be built.
    pub fn new(registry: &Registry, limits: RequestLimits) -> Result<Self, ClientError> {
        let mut clients = HashMap::new();
        for endpoint in registry.endpoints() {
            let client = reqwest::Client::builder()
                .dns_resolver(PolicyResolver::new(endpoint.policy.clone()))
                // A redirect or a proxy would lead the request past the address check.
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .connect_timeout(limits.connect_timeout)
                .timeout(limits.request_timeout)
                .build()
                .map_err(|e| ClientError {
                    endpoint: endpoint.id.clone(),
                    message: e.to_string(),
                })?;
            clients.insert(endpoint.id.clone(), client);
        }
        Ok(WebhookSender { clients, limits })
    }

    /// POSTs `body` to `endpoint` as message `webhook_id`, signed with every secret and
    /// stamped with the current time.
    pub async fn send(&self, endpoint: &Endpoint, webhook_id: &str, body: &Bytes) -> Attempt {
        if let Err(refused) = endpoint.policy.check_url(&endpoint.url) {
            return Attempt::Refused(refused);
        }
        let Some(client) = self.clients.get(&endpoint.id) else {
            return Attempt::Failed {
                status: None,
                error: format!("no HTTP client for endpoint {}", endpoint.id),
                retry_after: None,
            };
        };
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signature_header(&endpoint.secrets, webhook_id, timestamp, body);
        let request = client
            .post(endpoint.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                USER_AGENT,
                HeaderValue::from_static(concat!("darkroom-notifier/", env!("CARGO_PKG_VERSION"))),
            )
            .header(HEADER_ID, webhook_id)
            .header(HEADER_TIMESTAMP, timestamp.to_string())
            .header(HEADER_SIGNATURE, signature)
            .body(body.clone());
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                if let Some(refused) = refusal_in(&error) {
                    return Attempt::Refused(refused);
                }
                return Attempt::Failed {
                    status: None,
                    error: darkroom_shared::error_chain(&error),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let excerpt = read_capped(&mut response, self.limits.max_response_bytes).await;
        if status.is_success() {
            Attempt::Delivered {
                status: status.as_u16(),
            }
        } else if status == StatusCode::GONE {
            Attempt::Gone
        } else {
            Attempt::Failed {
                status: Some(status.as_u16()),
                error: format!("HTTP {status}: {excerpt}"),
                retry_after,
            }
        }
    }
}

/// Up to `cap` bytes of the body, as text for the log (at most 200 characters of it).
async fn read_capped(response: &mut reqwest::Response, cap: usize) -> String {
    let mut read = Vec::new();
    while read.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = cap - read.len();
                read.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&read)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect::<String>()
        .trim()
        .to_owned()
}
