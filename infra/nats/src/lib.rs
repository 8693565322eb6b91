//! Darkroom's NATS security in one declarative place: the `DARKROOM` account, one user per
//! function ([`Role`]) with least-privilege permissions derived from
//! [`darkroom_events::subjects`] ([`permissions`]), rendered into a `nats-server` config
//! ([`server_config`]) with passwords generated locally ([`secrets`]).
//!
//! The binary `darkroom-nats-config` writes the config; `infra/nats/README.md` has the table.

pub mod permissions;
pub mod secrets;
pub mod server_config;

pub use permissions::{Permissions, Role};
pub use server_config::{ACCOUNT, ClusterSettings, ServerSettings, render};
