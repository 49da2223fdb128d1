//! Dockerfile builds through a real BuildKit: the embedded BuildKit (v0.8) of Debian's
//! docker.io daemon, started by the test itself (tests/common/dockerd.rs) on its own
//! containerd and temp dirs, and stopped by pid afterwards.

mod common;
#[path = "common/dockerd.rs"]
mod dockerd;

use std::collections::HashMap;
use std::path::Path;

use iris_worker::buildkit::{BuildRequest, Client};

const BASE: &str = "iwtest-busybox:latest";

/// A build context with a nested tree, a file to COPY and a RUN with a cache mount.
fn write_context(dir: &Path, marker: &str) {
    std::fs::create_dir_all(dir.join("nested/a/b")).unwrap();
    std::fs::write(dir.join("hello.txt"), format!("hello from the bundle {marker}\n")).unwrap();
    std::fs::write(dir.join("nested/a/b/deep.txt"), "deep\n").unwrap();
    std::fs::write(dir.join("nested/a/top.txt"), "top\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {BASE}\n\
             COPY hello.txt /app/hello.txt\n\
             COPY nested /app/nested\n\
             RUN --mount=type=cache,target=/cache echo ran-in-build >> /cache/runs && cp /cache/runs /ran.txt && echo build-output-line\n\
             ENV GREETING=hi\n\
             WORKDIR /app\n"
        ),
    )
    .unwrap();
}

#[tokio::test]
#[ignore = "root: starts containerd and dockerd (BuildKit peer)"]
async fn the_client_builds_a_dockerfile_with_nested_context_through_dockers_buildkit() {
    if let Err(e) = dockerd::available() {
        panic!("the BuildKit peer cannot run: {e}");
    }
    let d = dockerd::Dockerd::start();
    d.import(&common::rootfs(), BASE);
    let client = Client::connect(&d.buildkit_addr()).await.unwrap_or_else(|e| panic!("{e}\n{}", d.logs()));
    let workers = client.list_workers().await.unwrap();
    assert!(!workers.is_empty(), "BuildKit lists no workers");

    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    write_context(&ctx, "lib");
    let dest = work.path().join("rootfs");
    let mut lines = Vec::new();
    let req = BuildRequest {
        context_dir: ctx.clone(),
        dockerfile: "Dockerfile".into(),
        build_args: HashMap::new(),
        target: None,
    };
    let out = client.build(&req, &dest, |l| lines.push(l)).await.unwrap_or_else(|e| panic!("{e}\n{}", d.logs()));
    let text: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(std::fs::read_to_string(dest.join("app/hello.txt")).unwrap(), "hello from the bundle lib\n");
    assert_eq!(std::fs::read_to_string(dest.join("app/nested/a/b/deep.txt")).unwrap(), "deep\n");
    assert_eq!(std::fs::read_to_string(dest.join("app/nested/a/top.txt")).unwrap(), "top\n");
    assert_eq!(std::fs::read_to_string(dest.join("ran.txt")).unwrap(), "ran-in-build\n");
    assert!(dest.join("bin/busybox").exists());
    assert!(text.iter().any(|l| l.ends_with(" build-output-line")), "{text:#?}");
    assert!(lines.iter().all(|l| l.ts_ms > 1_600_000_000_000), "{lines:?}");
    assert_eq!(out.config.working_dir, "/app");
    assert!(out.config.env.contains(&"GREETING=hi".to_string()), "{:?}", out.config);
}
