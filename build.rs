//! With the `buildkit` feature, generates the BuildKit client's subset of BuildKit's protos
//! (proto/buildkit/). Iris's own protos (proto/iris, proto/newest) are compiled by the
//! `iris-wire` crate (crates/iris-wire/build.rs), which the worker and controller share.

use std::env;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/buildkit");
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
