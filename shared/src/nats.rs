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
        .connect(server_urls(&config.nats_url))
        .await
        .map_err(|e| connect_error(e.to_string()))
}

/// The server URLs of a comma-separated list (`nats://a:4222, nats://b:4222`): the client
/// connects to one of them and learns the rest of a cluster from it, but a list of every seed
/// lets it start (and reconnect) while any one of them is down.
pub fn server_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_list_gives_every_server() {
        assert_eq!(
            server_urls("nats://a:1, nats://b:2,,nats://c:3 "),
            ["nats://a:1", "nats://b:2", "nats://c:3"]
        );
        assert_eq!(
            server_urls("nats://127.0.0.1:4222"),
            ["nats://127.0.0.1:4222"]
        );
    }
}
