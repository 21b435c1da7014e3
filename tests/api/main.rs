//! Integration tests: the real server on port 0 with a temp data directory, driven over HTTP
//! as release engineers and gateways would. One test binary (faster to link).

mod auth;
mod balancer;
mod cli;
mod clients;
mod cluster;
mod devices;
mod downloads;
mod faults;
mod helpers;
mod lifecycle;
mod mqtt_auth;
mod mqtt_external;
mod ops;
mod ota;
mod postgres;
mod proxy;
mod restart;
mod rollouts;
mod s3;
mod simulator;
mod ui;
mod upload;
