//! The NATS connection.

use async_nats::ConnectOptions;

use crate::{Result, RuntimeConfig, RuntimeError};

/// Connects to NATS as `client_name` with the configured credentials.
///
/// The first connection must succeed (a function that cannot reach its bus should fail loudly at
/// start); after that the client reconnects on its own for as long as the process lives.
pub async fn connect(config: &RuntimeConfig, client_name: &str) -> Result<async_nats::Client> {
    let connect_error = |message: String| RuntimeError::Connect {
        url: config.nats_url.clone(),
        message,
    };
    let mut options = ConnectOptions::new().name(client_name).max_reconnects(None);
    if let Some(path) = &config.nats_creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| connect_error(format!("credentials file {}: {e}", path.display())))?;
    }
    if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.nats_token {
        options = options.token(token.clone());
    }
    options
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| connect_error(e.to_string()))
}
