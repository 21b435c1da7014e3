//! fwrepo: a firmware artifact repository and OTA rollout server for gateways (drone docks and
//! remote controllers) that speak a DJI-Cloud-API-style MQTT protocol.
//!
//! Layers, dependencies pointing inward: [`http`] (the only module that knows actix-web) calls
//! [`upload`], [`download`], [`firmware`] and [`progress`], which use [`catalog`] (sled),
//! [`blobs`] (object_store) and [`domain`]. Each layer has its own error type; [`http::error`]
//! maps them to HTTP answers in one place.

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod auth;
pub mod backup;
pub mod blobs;
pub mod catalog;
pub mod checksum;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod devices;
pub mod domain;
pub mod download;
pub mod firmware;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod ota;
pub mod progress;
pub mod rollout;
pub mod secrets;
pub mod simulator;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upload;

/// Locks `m`, recovering the data if a holder panicked (state here stays consistent between
/// statements: a panic mid-update is a bug reported elsewhere, not a reason to stop serving).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
