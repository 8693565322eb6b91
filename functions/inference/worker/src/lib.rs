//! The inference function: one long-lived process per GPU that holds the SDXL base model
//! resident and renders the jobs preprocess queues.
//!
//! It wraps the engine (`darkroom-inference`, which knows nothing of NATS or S3):
//!
//! - [`config`]: `WorkerConfig`, read from `DARKROOM_*` variables (`DARKROOM_MODEL`, …);
//! - [`engine`]: the engine thread — the pipeline, LoRA and ControlNet caches, tone grading —
//!   off the async runtime, one render at a time, cancellable between steps;
//! - [`assets`]: LoRA, ControlNet and LUT names resolved under the worker's folders;
//! - [`digest`]: SHA-256 of weights, for the hashes `completed` events carry;
//! - [`handler`]: the shared `Handler` over inference jobs (fetch, render, store, announce);
//! - [`error`]: why a job failed and whether another delivery could help;
//! - [`watchdog`]: when the engine last made progress, and the stall that ends the process;
//! - [`service`]: connecting, loading, consuming; [`cli`]: the `darkroom-inference` command.

pub mod assets;
pub mod cli;
pub mod config;
pub mod digest;
pub mod engine;
pub mod error;
pub mod handler;
pub mod service;
pub mod watchdog;

#[cfg(feature = "fault-hooks")]
pub mod fault;
