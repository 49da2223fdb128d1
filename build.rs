//! Generates the protobuf types, the gRPC server/client and a descriptor set (for gRPC
//! reflection and for the Connect protocol's JSON form) from proto/iris/cluster.proto, and,
//! with the `buildkit` feature, the BuildKit client's subset of BuildKit's protos
//! (proto/buildkit/).

use std::env;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("iris_descriptor.bin"))
        .compile_protos(&["proto/iris/cluster.proto"], &["proto"])?;
    if env::var_os("CARGO_FEATURE_BUILDKIT").is_some() {
        // We call the daemon's Control service and serve the session's services to it.
        tonic_prost_build::configure()
            .build_server(false)
            .compile_protos(&["proto/buildkit/control.proto"], &["proto"])?;
        tonic_prost_build::configure().build_client(false).compile_protos(
            &["proto/buildkit/filesync.proto", "proto/buildkit/fsutil.proto", "proto/buildkit/health.proto"],
            &["proto"],
        )?;
    }
    Ok(())
}
