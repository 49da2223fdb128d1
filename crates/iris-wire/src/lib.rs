//! The Iris wire, shared by the worker and the controller: the protobuf types of both Iris
//! generations ([`proto`], [`proto::newest`]), the Connect protocol's codec, server routes and
//! client ([`connect`]), one port for gRPC, Connect and pages ([`server`]), the bounded accept
//! loop ([`listen`]), TLS ([`tls`]), bearer tokens and the Host check ([`auth`]), and what a
//! worker and controller agree on beyond the messages ([`cluster`]).
//!
//! Nothing here knows what a task is: the services are the worker's and the controller's. See
//! docs/ARCHITECTURE.md at the repository's root.

#![warn(missing_docs)]

pub mod auth;
pub mod clock;
pub mod cluster;
pub mod connect;
pub mod listen;
pub mod proto;
mod security;
pub mod server;
pub mod text;
pub mod tls;

pub use security::{ClientSecurity, ServeOptions};
