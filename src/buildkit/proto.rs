//! The generated types of proto/buildkit/ (a subset of BuildKit's and fsutil's protos,
//! written from their documentation: same packages, names and field numbers). The modules
//! follow the proto packages, as the generated code refers across them by package path.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod moby {
    pub mod buildkit {
        pub mod v1 {
            tonic::include_proto!("moby.buildkit.v1");
        }
    }
    pub mod filesync {
        pub mod v1 {
            tonic::include_proto!("moby.filesync.v1");
        }
    }
}

pub mod fsutil {
    /// `fsutil.types`: the packets of fsutil's send/receive protocol.
    pub mod types {
        tonic::include_proto!("fsutil.types");
    }
}

pub mod grpc {
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}

/// `grpc.health.v1`: Health (server side, on the session).
pub use grpc::health::v1 as health;
/// `moby.buildkit.v1`: the Control service (client side).
pub use moby::buildkit::v1 as control;
/// `moby.filesync.v1`: FileSync and FileSend (server side, served on the session).
pub use moby::filesync::v1 as filesync;
