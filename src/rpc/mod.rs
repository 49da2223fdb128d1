//! The worker's wire: WorkerService over gRPC (tonic, with reflection) and over the Connect
//! protocol (unary, proto and JSON), on one port and the same paths. Only this module (and
//! clients) see protobuf types; requests become a typed [`crate::task::TaskSpec`] here.
//!
//! What is not WorkerService-specific — the Connect codec, server and client, the accept loop,
//! TLS, tokens — lives in the `iris-wire` crate, which the controller shares; it is re-exported
//! here under its old paths.

mod connect_routes;
mod convert;
mod figures;
pub mod newest;
mod service;
mod status;

pub use iris_wire::server::{ServeError, grpc_with_reflection, one_port};
pub use iris_wire::{ClientSecurity, ServeOptions, auth, connect, listen, tls};

pub use connect_routes::worker_router;
pub use convert::{
    decode_run_task, log_entry as log_entry_proto, log_filter, state_from_proto, state_to_proto,
    task_status as task_status_proto,
};
pub use service::WorkerServiceImpl;
pub use status::to_status;
