//! Generates the protobuf types, the gRPC server/client and a descriptor set (for gRPC
//! reflection and for the Connect protocol's JSON form) from the repository's
//! proto/iris/cluster.proto; and the newest Iris generation's types and descriptor set from
//! proto/newest/ into their own output directory (both generations use the package
//! `iris.cluster`, so sharing one directory would make them overwrite each other's
//! `iris.cluster.rs`). The .proto files stay in the top-level proto/ folder, beside BuildKit's,
//! which only the worker compiles.

use std::env;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", protos.join("iris").display());
    println!("cargo:rerun-if-changed={}", protos.join("newest").display());
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("iris_descriptor.bin"))
        .compile_protos(&[protos.join("iris/cluster.proto")], std::slice::from_ref(&protos))?;
    // Messages only: the newest wire is served over Connect, not gRPC.
    let newest = out.join("newest");
    std::fs::create_dir_all(&newest)?;
    let newest_protos = protos.join("newest");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .out_dir(&newest)
        .file_descriptor_set_path(newest.join("descriptor.bin"))
        .compile_protos(
            &[
                newest_protos.join("iris/worker.proto"),
                newest_protos.join("iris/controller.proto"),
                newest_protos.join("finelog/logging.proto"),
            ],
            std::slice::from_ref(&newest_protos),
        )?;
    Ok(())
}
