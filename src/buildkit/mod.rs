//! A client of BuildKit's gRPC Control API: builds a Dockerfile with the `dockerfile.v0`
//! frontend and brings the result back as a root filesystem directory.
//!
//! - [`connect`]: `unix://`, `tcp://` and `docker-unix://` (a Docker daemon's embedded
//!   BuildKit, reached by an HTTP/1.1 upgrade on `/grpc`) addresses → a gRPC channel.
//! - [`session`]: the session BuildKit calls back on: an HTTP/2 gRPC server tunnelled through
//!   `Control.Session`'s BytesMessage stream, serving file sync, file send and health.
//! - [`fsutil`]: fsutil's stat/packet protocol, the sender side (the build context).
//! - [`export`]: the `tar` exporter's stream unpacked into the destination directory.
//! - [`progress`]: `Control.Status` updates turned into timestamped log lines.
//! - [`dockerfile`]: the image config (Env, WorkingDir, Entrypoint, Cmd, User) read from the
//!   Dockerfile's final stage: the `tar` exporter returns no image config.
//! - [`client`]: [`Client::connect`], [`Client::build`], [`Client::list_workers`].
//!
//! The requests use only fields that BuildKit v0.8 (Docker 20.10's embedded BuildKit) and
//! current BuildKit both read: the legacy `Exporter`/`ExporterAttrs` fields, the built-in
//! Dockerfile frontend with its `context` and `dockerfile` local sources.

pub mod client;
pub mod connect;
pub mod dockerfile;
mod error;
pub mod export;
pub mod fsutil;
pub mod progress;
pub mod proto;
pub mod session;

pub use client::{BuildOutput, BuildRequest, Client, WorkerInfo};
pub use dockerfile::ImageConfig;
pub use error::BuildkitError;
pub use progress::LogLine;
