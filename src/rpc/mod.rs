//! The wire: WorkerService over gRPC (tonic, with reflection) and over the Connect protocol
//! (unary, proto and JSON), on one port and the same paths. Only this module (and clients)
//! see protobuf types; requests become a typed [`crate::task::TaskSpec`] here.

pub mod auth;
pub mod connect;
mod convert;
pub mod listen;
pub mod newest;
mod security;
mod server;
mod service;
mod status;
pub mod tls;

pub use convert::{
    decode_run_task, log_entry as log_entry_proto, log_filter, state_from_proto, state_to_proto,
    task_status as task_status_proto,
};
pub use security::{ClientSecurity, ServeOptions};
pub use server::{ServeError, grpc_with_reflection, one_port, serve, serve_with};
pub use service::WorkerServiceImpl;
pub use status::to_status;
