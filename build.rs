//! Generates the protobuf types, the gRPC server/client and a descriptor set (for gRPC
//! reflection and for the Connect protocol's JSON form) from proto/iris/cluster.proto; the
//! newest Iris generation's types and descriptor set from proto/newest/ into their own output
//! directory (both generations use the package `iris.cluster`, so sharing one directory would
//! make them overwrite each other's `iris.cluster.rs`); and, with the `buildkit` feature, the
//! BuildKit client's subset of BuildKit's protos (proto/buildkit/).

use std::env;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("iris_descriptor.bin"))
        .compile_protos(&["proto/iris/cluster.proto"], &["proto"])?;
    // Messages only: the newest wire is served over Connect, not gRPC.
    let newest = out.join("newest");
    std::fs::create_dir_all(&newest)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .out_dir(&newest)
        .file_descriptor_set_path(newest.join("descriptor.bin"))
        .compile_protos(
            &[
                "proto/newest/iris/worker.proto",
                "proto/newest/iris/controller.proto",
                "proto/newest/finelog/logging.proto",
            ],
            &["proto/newest"],
        )?;
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
