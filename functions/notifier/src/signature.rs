//! Standard Webhooks signatures: signing every request, and a reference verifier for receivers
//! and tests.
//!
//! Spec: <https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>.
//! A request carries three headers:
//!
//! - `webhook-id`: the message id, the same on every retry of one delivery;
//! - `webhook-timestamp`: Unix seconds of this attempt;
//! - `webhook-signature`: space-separated `v1,<base64 signature>` entries, one per secret.
//!
//! The signature is HMAC-SHA256, keyed with the bytes of the secret (the base64 text after the
//! `whsec_` prefix, decoded), over `"{id}.{timestamp}.{body}"` with the body as sent, byte for
//! byte. Signing with every configured secret lets an operator rotate one: the receiver accepts
//! any signature it can verify.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of a symmetric Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Version tag of an HMAC-SHA256 signature.
pub const SIGNATURE_VERSION: &str = "v1";
/// Header naming the message.
pub const HEADER_ID: &str = "webhook-id";
/// Header with the attempt's Unix time in seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header with the signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// Shortest secret accepted, in bytes (the spec's lower bound).
pub const MIN_SECRET_BYTES: usize = 24;
/// Longest secret accepted, in bytes (the spec's upper bound).
pub const MAX_SECRET_BYTES: usize = 64;
/// How far a timestamp may be from the receiver's clock (the spec suggests five minutes).
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

type HmacSha256 = Hmac<Sha256>;

/// Why a `whsec_` secret was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// It does not start with `whsec_`.
    #[error("a webhook secret must start with {SECRET_PREFIX:?}")]
    MissingPrefix,
    /// The text after the prefix is not standard base64.
    #[error("the text after {SECRET_PREFIX:?} is not standard base64")]
    NotBase64,
    /// The decoded key is shorter or longer than the spec allows.
    #[error(
        "a webhook secret must decode to {MIN_SECRET_BYTES}–{MAX_SECRET_BYTES} bytes, not {len}"
    )]
    Length {
        /// Decoded length.
        len: usize,
    },
}

/// A symmetric signing key. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret({} bytes)", self.key.len())
    }
}

impl WebhookSecret {
    /// Reads a `whsec_<base64>` secret.
    ///
    /// # Errors
    /// A missing prefix, bad base64, or a key outside 24–64 bytes.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        Self::from_bytes(key)
    }

    /// A secret from raw key bytes.
    ///
    /// # Errors
    /// A key outside 24–64 bytes.
    pub fn from_bytes(key: Vec<u8>) -> Result<Self, SecretError> {
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(SecretError::Length { len: key.len() });
        }
        Ok(WebhookSecret { key })
    }

    /// The secret in its `whsec_<base64>` form, as given to receivers.
    pub fn to_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.key))
    }

    /// One `v1,<base64>` signature of `body` sent as message `id` at `timestamp`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("{SIGNATURE_VERSION},{}", STANDARD.encode(tag))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length; the constructor cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// Whether `signature` (the base64 part of a `v1` entry) is this secret's signature of the
    /// message; compared in constant time.
    fn verifies(&self, id: &str, timestamp: i64, body: &[u8], signature: &str) -> bool {
        let Ok(tag) = STANDARD.decode(signature) else {
            return false;
        };
        self.mac(id, timestamp, body).verify_slice(&tag).is_ok()
    }
}

/// The `webhook-signature` header value: one `v1,` signature per secret, space-separated.
pub fn signature_header(
    secrets: &[WebhookSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why the reference verifier rejected a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `webhook-timestamp` is not an integer.
    #[error("webhook-timestamp {0:?} is not Unix seconds")]
    BadTimestamp(String),
    /// The timestamp is older than the tolerance allows (a replay, or a very late retry).
    #[error("webhook-timestamp is {age_secs} s old, over the tolerance")]
    TooOld {
        /// How old.
        age_secs: i64,
    },
    /// The timestamp is further in the future than the tolerance allows.
    #[error("webhook-timestamp is {ahead_secs} s in the future, over the tolerance")]
    TooNew {
        /// How far ahead.
        ahead_secs: i64,
    },
    /// No `v1` signature in the header matches any of the secrets.
    #[error("no signature matches")]
    NoMatch,
}

/// Verifies a request as a Standard Webhooks receiver does: the timestamp within `tolerance`
/// of `now` (Unix seconds), then any `v1` entry of `signature` matching any of `secrets` over
/// `id`, `timestamp` and the raw `body`.
///
/// # Errors
/// See [`VerifyError`].
pub fn verify(
    secrets: &[WebhookSecret],
    id: &str,
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let sent: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp(timestamp.to_owned()))?;
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    let age = now.saturating_sub(sent);
    if age > tolerance {
        return Err(VerifyError::TooOld { age_secs: age });
    }
    if -age > tolerance {
        return Err(VerifyError::TooNew { ahead_secs: -age });
    }
    let matched = signature
        .split_ascii_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == SIGNATURE_VERSION)
        .any(|(_, tag)| {
            secrets
                .iter()
                .any(|secret| secret.verifies(id, sent, body, tag))
        });
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The example of the `standard-webhooks-consumer` Java library's README and tests.
    const VECTOR_SECRET: &str = "whsec_b6Ovv5eS7H5seJrGSStBYDivs8v2/KrFjfMaVZYsi7w=";
    const VECTOR_ID: &str = "7a2486b3-31cf-4bd3-a460-df8845d16cd5";
    const VECTOR_TIMESTAMP: i64 = 1_737_987_215;
    const VECTOR_BODY: &[u8] = br#"{"greetings": "Hello World"}"#;
    const VECTOR_SIGNATURE: &str = "v1,iayM3VaiYCEDP/CxWUFWcxUCJk2YmBDQHtHTsaHzrwo=";

    #[test]
    fn signs_the_published_vector() {
        let secret = WebhookSecret::parse(VECTOR_SECRET).unwrap();
        assert_eq!(
            secret.sign(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY),
            VECTOR_SIGNATURE
        );
    }

    #[test]
    fn signs_a_vector_computed_by_hand() {
        // HMAC-SHA256 with key base64("MfKQ…") over "msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{…}",
        // computed with Python's hmac module.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            secret.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_must_be_whsec_base64_of_24_to_64_bytes() {
        assert_eq!(
            WebhookSecret::parse("b6Ovv5eS7H5seJrGSStBYDivs8v2/KrFjfMaVZYsi7w="),
            Err(SecretError::MissingPrefix)
        );
        assert_eq!(
            WebhookSecret::parse("whsec_not base64!"),
            Err(SecretError::NotBase64)
        );
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 23]))),
            Err(SecretError::Length { len: 23 })
        );
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 65]))),
            Err(SecretError::Length { len: 65 })
        );
        let secret = WebhookSecret::parse(VECTOR_SECRET).unwrap();
        assert_eq!(secret.to_whsec(), VECTOR_SECRET);
        assert_eq!(format!("{secret:?}"), "WebhookSecret(32 bytes)");
    }

    #[test]
    fn the_verifier_accepts_the_vector_and_rejects_every_alteration() {
        let secret = WebhookSecret::parse(VECTOR_SECRET).unwrap();
        let secrets = [secret];
        let ts = VECTOR_TIMESTAMP.to_string();
        let check = |id: &str, ts: &str, sig: &str, body: &[u8], now: i64| {
            verify(&secrets, id, ts, sig, body, now, DEFAULT_TOLERANCE)
        };
        let now = VECTOR_TIMESTAMP + 10;
        assert_eq!(
            check(VECTOR_ID, &ts, VECTOR_SIGNATURE, VECTOR_BODY, now),
            Ok(())
        );
        // Tampered body, id or timestamp.
        let tampered = br#"{"greetings": "Hello World!"}"#;
        assert_eq!(
            check(VECTOR_ID, &ts, VECTOR_SIGNATURE, tampered, now),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            check("another-id", &ts, VECTOR_SIGNATURE, VECTOR_BODY, now),
            Err(VerifyError::NoMatch)
        );
        let shifted = (VECTOR_TIMESTAMP + 1).to_string();
        assert_eq!(
            check(VECTOR_ID, &shifted, VECTOR_SIGNATURE, VECTOR_BODY, now),
            Err(VerifyError::NoMatch)
        );
        // Stale and future timestamps, just past the tolerance either way.
        assert_eq!(
            check(
                VECTOR_ID,
                &ts,
                VECTOR_SIGNATURE,
                VECTOR_BODY,
                VECTOR_TIMESTAMP + 301
            ),
            Err(VerifyError::TooOld { age_secs: 301 })
        );
        assert_eq!(
            check(
                VECTOR_ID,
                &ts,
                VECTOR_SIGNATURE,
                VECTOR_BODY,
                VECTOR_TIMESTAMP + 300
            ),
            Ok(())
        );
        assert_eq!(
            check(
                VECTOR_ID,
                &ts,
                VECTOR_SIGNATURE,
                VECTOR_BODY,
                VECTOR_TIMESTAMP - 301
            ),
            Err(VerifyError::TooNew { ahead_secs: 301 })
        );
        assert!(matches!(
            check(VECTOR_ID, "yesterday", VECTOR_SIGNATURE, VECTOR_BODY, now),
            Err(VerifyError::BadTimestamp(_))
        ));
        // Other versions, and garbage, are ignored.
        let v2 = VECTOR_SIGNATURE.replace("v1,", "v2,");
        assert_eq!(
            check(VECTOR_ID, &ts, &v2, VECTOR_BODY, now),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            check(VECTOR_ID, &ts, "v1,%%% nonsense", VECTOR_BODY, now),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn rotation_signs_with_every_secret_and_either_verifies() {
        let old = WebhookSecret::from_bytes(vec![1; 32]).unwrap();
        let new = WebhookSecret::from_bytes(vec![2; 32]).unwrap();
        let wrong = WebhookSecret::from_bytes(vec![3; 32]).unwrap();
        let header = signature_header(&[old.clone(), new.clone()], "msg_1", 1000, b"{}");
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], old.sign("msg_1", 1000, b"{}"));
        assert_eq!(entries[1], new.sign("msg_1", 1000, b"{}"));
        for receiver in [old, new] {
            assert_eq!(
                verify(
                    &[receiver],
                    "msg_1",
                    "1000",
                    &header,
                    b"{}",
                    1000,
                    DEFAULT_TOLERANCE
                ),
                Ok(())
            );
        }
        assert_eq!(
            verify(
                &[wrong],
                "msg_1",
                "1000",
                &header,
                b"{}",
                1000,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::NoMatch)
        );
    }
}
