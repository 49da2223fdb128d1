//! Dockerfile builds through a real BuildKit: the embedded BuildKit (v0.8) of Debian's
//! docker.io daemon, started by the test itself (tests/common/dockerd.rs) on its own
//! containerd and temp dirs, and stopped by pid afterwards.

#![cfg(feature = "buildkit")]

mod common;
#[path = "common/dockerd.rs"]
mod dockerd;

use std::collections::HashMap;
use std::path::Path;

use iris_worker::buildkit::{BuildRequest, Client};

const BASE: &str = "iwtest-busybox:latest";

/// A build context with a nested tree, a file to COPY and a RUN with a cache mount. The RUN
/// takes over 2 s: BuildKit v0.8 health-checks the session every second and drops it (and with
/// it the export) when a check fails, so the session's Health service is exercised too.
fn write_context(dir: &Path, marker: &str) {
    std::fs::create_dir_all(dir.join("nested/a/b")).unwrap();
    std::fs::write(dir.join("hello.txt"), format!("hello from the bundle {marker}\n")).unwrap();
    std::fs::write(dir.join("nested/a/b/deep.txt"), "deep\n").unwrap();
    std::fs::write(dir.join("nested/a/top.txt"), "top\n").unwrap();
    // .dockerignore: BuildKit sends its patterns with the context request; the sender honours them.
    std::fs::write(dir.join("nested/a/b/secret.key"), "not for the image\n").unwrap();
    std::fs::write(dir.join(".dockerignore"), "**/*.key\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {BASE}\n\
             COPY hello.txt /app/hello.txt\n\
             COPY nested /app/nested\n\
             COPY . /all\n\
             RUN --mount=type=cache,target=/cache echo ran-in-build >> /cache/runs && cp /cache/runs /ran.txt && sleep 2.5 && echo build-output-line\n\
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
    assert_eq!(std::fs::read_to_string(dest.join("all/nested/a/b/deep.txt")).unwrap(), "deep\n");
    assert!(!dest.join("all/nested/a/b/secret.key").exists(), "the .dockerignore'd file reached the image");
    assert!(!dest.join("app/nested/a/b/secret.key").exists());
    assert_eq!(std::fs::read_to_string(dest.join("ran.txt")).unwrap(), "ran-in-build\n");
    assert!(dest.join("bin/busybox").exists());
    assert!(text.iter().any(|l| l.ends_with(" build-output-line")), "{text:#?}");
    assert!(lines.iter().all(|l| l.ts_ms > 1_600_000_000_000), "{lines:?}");
    assert_eq!(out.config.working_dir, "/app");
    assert!(out.config.env.contains(&"GREETING=hi".to_string()), "{:?}", out.config);

    // A failing step: BuildKit's message, and nothing left at the destination.
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {BASE}\nRUN echo about-to-fail && exit 3\n")).unwrap();
    let failed_dest = work.path().join("failed");
    let mut lines = Vec::new();
    let e = client.build(&req, &failed_dest, |l| lines.push(l)).await.unwrap_err();
    assert!(matches!(e, iris_worker::buildkit::BuildkitError::BuildFailed(_)), "{e}");
    assert!(e.to_string().contains("exit code: 3"), "{e}");
    assert!(lines.iter().any(|l| l.text.ends_with(" about-to-fail")), "{lines:?}");
    assert!(!failed_dest.exists());
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only ctx and rootfs remain (no tarball): {left:?}");
}

/// A zip of the context (the bundle the tasks name).
fn bundle_zip(ctx: &Path, out: &Path) {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::fs::File::create(out).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    fn add(z: &mut zip::ZipWriter<std::fs::File>, root: &Path, dir: &Path, opts: zip::write::SimpleFileOptions) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                z.add_directory(format!("{name}/"), opts).unwrap();
                add(z, root, &p, opts);
            } else {
                z.start_file(name, opts).unwrap();
                z.write_all(&std::fs::read(&p).unwrap()).unwrap();
            }
        }
    }
    add(&mut z, ctx, ctx, opts);
    z.finish().unwrap();
}

fn texts(entries: &[iris_worker::proto::worker::LogEntry]) -> Vec<String> {
    entries.iter().map(|e| e.data.clone()).collect()
}

async fn source_log(c: &mut common::Client, task_id: &str, source: &str) -> Vec<iris_worker::proto::worker::LogEntry> {
    common::logs(
        c,
        task_id,
        iris_worker::proto::worker::FetchLogsFilter { source: source.into(), ..Default::default() },
    )
    .await
}

const WITHIN: std::time::Duration = std::time::Duration::from_secs(180);

#[tokio::test]
#[ignore = "root: starts containerd and dockerd (BuildKit peer), runs containers"]
async fn a_task_runs_in_the_image_built_from_its_bundles_dockerfile_and_the_second_is_a_cache_hit() {
    if let Err(e) = dockerd::available() {
        panic!("the BuildKit peer cannot run: {e}");
    }
    let d = dockerd::Dockerd::start();
    d.import(&common::rootfs(), BASE);
    let files = tempfile::Builder::new().prefix("iris-worker-test-dockerfile-").tempdir().unwrap();
    let ctx = files.path().join("ctx");
    write_context(&ctx, "task");
    let zip = files.path().join("bundle.zip");
    bundle_zip(&ctx, &zip);
    let cache = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
    let addr = d.buildkit_addr();
    let bundles = files.path().to_str().unwrap();
    let w = common::Worker::start(
        "dockerfile",
        &["--cache-dir", cache.path().to_str().unwrap(), "--buildkit", &addr, "--allow-bundle-path", bundles],
    )
    .await;
    let mut c = w.client().await;

    let script = "cat /app/hello.txt /app/nested/a/b/deep.txt /ran.txt; echo cwd=$(pwd) greeting=$GREETING";
    let request = |id: &str| {
        let mut r = common::sh(id, script);
        r.image = "dockerfile".into();
        r.bundle_gcs_path = format!("file://{}", zip.display());
        r
    };
    // Two tasks at once: one build (single flight); either may be the one that builds.
    c.run_task(request("dockerfile/first")).await.unwrap();
    c.run_task(request("dockerfile/concurrent")).await.unwrap();
    let mut ended = Vec::new();
    for id in ["dockerfile/first", "dockerfile/concurrent"] {
        let s = common::wait_end(&mut c, id, WITHIN).await;
        assert_eq!(common::state_of(&s), iris_worker::task::TaskState::Succeeded, "{s:?}\n{}\n{}", w.logs(), d.logs());
        ended.push((id, s.build_metrics.clone().unwrap()));
    }
    let builders: Vec<_> = ended.iter().filter(|(_, m)| !m.from_cache).collect();
    assert_eq!(builders.len(), 1, "exactly one of two concurrent tasks builds: {ended:?}");
    let (builder, metrics) = builders[0].clone();
    let (waiter, _) = ended.iter().find(|(id, _)| *id != builder).unwrap();
    assert!(source_log(&mut c, waiter, "build").await.is_empty());
    let out = texts(&source_log(&mut c, builder, "stdout").await);
    assert_eq!(out, ["hello from the bundle task", "deep", "ran-in-build", "cwd=/app greeting=hi"], "{out:?}");
    assert_eq!(texts(&source_log(&mut c, waiter, "stdout").await), out);
    let build = source_log(&mut c, builder, "build").await;
    let build_text = texts(&build);
    assert!(build_text.iter().any(|l| l.ends_with(" build-output-line")), "{build_text:#?}");
    assert!(build_text.iter().any(|l| l.contains("COPY nested /app/nested")), "{build_text:#?}");
    assert!(build.iter().all(|e| e.timestamp_ms > 1_600_000_000_000), "{build:?}");
    assert!(metrics.image_tag.starts_with("dockerfile:"), "{metrics:?}");

    // The same Dockerfile and context: no build, no build log, the same image.
    c.run_task(request("dockerfile/second")).await.unwrap();
    let s2 = common::wait_end(&mut c, "dockerfile/second", WITHIN).await;
    assert_eq!(common::state_of(&s2), iris_worker::task::TaskState::Succeeded, "{s2:?}");
    let metrics2 = s2.build_metrics.clone().unwrap();
    assert!(metrics2.from_cache, "{metrics2:?}");
    assert_eq!(metrics2.image_tag, metrics.image_tag);
    eprintln!(
        "figure: BUILDING took {} ms with a build (RUN sleeps 2.5 s), {} ms on a cache hit",
        metrics.build_finished_ms - metrics.build_started_ms,
        metrics2.build_finished_ms - metrics2.build_started_ms
    );
    assert!(source_log(&mut c, "dockerfile/second", "build").await.is_empty());
    assert_eq!(texts(&source_log(&mut c, "dockerfile/second", "stdout").await), out);
    // One image in the store (one record, one layer), nothing left in its staging area.
    let names = |sub: &str| -> Vec<String> {
        std::fs::read_dir(cache.path().join("images").join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names("images").len(), 1, "{:?}", names("images"));
    assert_eq!(names("layers").iter().filter(|n| !n.ends_with(".json")).count(), 1, "{:?}", names("layers"));
    assert!(names("tmp").is_empty(), "{:?}", names("tmp"));
}

#[tokio::test]
#[ignore = "root: runs a worker with containers"]
async fn an_unreachable_buildkit_fails_the_task_naming_the_address() {
    let files = tempfile::Builder::new().prefix("iris-worker-test-dockerfile-").tempdir().unwrap();
    let ctx = files.path().join("ctx");
    write_context(&ctx, "unreachable");
    let zip = files.path().join("bundle.zip");
    bundle_zip(&ctx, &zip);
    let cache = tempfile::Builder::new().prefix("iris-worker-test-cache-").tempdir().unwrap();
    let addr = format!("docker-unix://{}/no-daemon.sock", files.path().display());
    let w = common::Worker::start(
        "dockerfile-unreachable",
        &[
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--buildkit",
            &addr,
            "--allow-bundle-path",
            files.path().to_str().unwrap(),
        ],
    )
    .await;
    let mut c = w.client().await;
    let mut r = common::sh("dockerfile/unreachable", "true");
    r.image = "dockerfile".into();
    r.bundle_gcs_path = format!("file://{}", zip.display());
    c.run_task(r).await.unwrap();
    let s = common::wait_end(&mut c, "dockerfile/unreachable", WITHIN).await;
    assert_eq!(common::state_of(&s), iris_worker::task::TaskState::Failed, "{s:?}");
    assert!(s.error.contains(&addr) && s.error.contains("unreachable"), "{}", s.error);
    // The attempt is in the task's build log too.
    let build = texts(&source_log(&mut c, "dockerfile/unreachable", "build").await);
    assert!(build.iter().any(|l| l.contains(&addr)), "{build:?}");
}
