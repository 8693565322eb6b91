//! Darkroom's NATS security in one declarative place: the `DARKROOM` account, one user per
//! function ([`Role`]) with least-privilege permissions derived from
//! [`darkroom_events::subjects`] ([`permissions`]), rendered into a `nats-server` config
//! ([`server_config`]) that names each user by its NKey public key; the seeds are generated
//! locally and never leave their clients ([`secrets`]). The servers can serve TLS to clients
//! and routes ([`ServerTls`]), with certificates from a private CA ([`tls`]).
//!
//! The binary `darkroom-nats-config` writes the config; `infra/nats/README.md` has the table.

pub mod permissions;
pub mod secrets;
pub mod server_config;
pub mod tls;

pub use permissions::{Permissions, Role};
pub use secrets::UserKey;
pub use server_config::{ACCOUNT, ClusterSettings, ServerSettings, ServerTls, render};
