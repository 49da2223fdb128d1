//! Generates the protobuf types, the gRPC server/client and a descriptor set (for gRPC
//! reflection and for the Connect protocol's JSON form) from proto/iris/cluster.proto.

use std::env;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("iris_descriptor.bin"))
        .compile_protos(&["proto/iris/cluster.proto"], &["proto"])?;
    Ok(())
}
