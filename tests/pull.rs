//! The pull policy (issue 20): `--pull always` asks the registry (or containerd) which manifest
//! a tag names each time and fetches only the layers that changed; `missing` (the default)
//! uses the store's copy; `never` fails at once when the store lacks the image; a reference
//! pinned by digest gets exactly that image whatever the tag names now.
//!
//! Root-only (`#[ignore = "root: …"]`): each test runs its own `docker-registry` (and
//! containerd) and workers with image stores of their own.

mod common;
#[path = "common/registry.rs"]
mod registry;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use iris_worker::task::TaskState;
use registry::{Containerd, ImageStore, Registry};

const WITHIN: Duration = Duration::from_secs(120);

async fn worker(name: &str, store: &ImageStore, extra: &[&str]) -> Worker {
    Worker::start(name, &store.args(extra)).await
}

/// Runs `cat /etc/image-marker` in `image`: (state, output or error).
async fn marker(w: &Worker, id: &str, image: &str) -> (TaskState, String) {
    let mut c = w.client().await;
    let mut req = sh(id, "cat /etc/image-marker");
    req.image = image.to_string();
    c.run_task(req).await.unwrap();
    let s = wait_end(&mut c, id, WITHIN).await;
    let out: String = all_logs(&mut c, id).await.into_iter().map(|l| l.data).collect();
    let state = state_of(&s);
    (state, if state == TaskState::Succeeded { out } else { s.error })
}

/// Layers reused and unpacked (see [`registry::image_layers`]).
fn layers(w: &Worker) -> (u64, u64) {
    registry::image_layers(&w.addr())
}

/// The digest the registry gives the manifest `name:tag` names now.
fn manifest_digest(reg: &Registry, name: &str) -> String {
    let mut s = std::net::TcpStream::connect(reg.host()).unwrap();
    write!(
        s,
        "HEAD /v2/{name}/manifests/test HTTP/1.1\r\nHost: {}\r\nAccept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json\r\nConnection: close\r\n\r\n",
        reg.host()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("docker-content-digest").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no digest: {text}"))
}

fn require_peers() {
    registry::require_peers("pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs a registry and containers"]
async fn always_picks_up_a_re_pushed_tag_and_fetches_only_the_new_layers() {
    require_peers();
    let reg = Registry::start();
    let app = reg.push("busybox", "app");
    let insecure = reg.host();
    let (s1, s2) = (ImageStore::new("pull"), ImageStore::new("pull"));
    let always = worker("pull-always", &s1, &["--insecure-registry", &insecure, "--pull", "always"]).await;
    let missing = worker("pull-missing", &s2, &["--insecure-registry", &insecure]).await;
    assert_eq!(marker(&always, "a/1", &app).await, (TaskState::Succeeded, "busybox".into()));
    assert_eq!(marker(&missing, "m/1", &app).await, (TaskState::Succeeded, "busybox".into()));
    assert_eq!(layers(&always).1, 2, "busybox's two layers unpacked");

    // The tag moves to an image with the same base and another top layer.
    reg.push("busybox-extra", "app");
    assert_eq!(marker(&always, "a/2", &app).await, (TaskState::Succeeded, "busybox-extra".into()));
    assert_eq!(layers(&always).1, 3, "only the new top layer was fetched");
    // The tag did not move: nothing is fetched.
    let (hits, _) = layers(&always);
    assert_eq!(marker(&always, "a/3", &app).await, (TaskState::Succeeded, "busybox-extra".into()));
    assert_eq!(layers(&always), (hits + 2, 3));
    // `missing` keeps the copy it has, and never asks the registry for it.
    assert_eq!(marker(&missing, "m/2", &app).await, (TaskState::Succeeded, "busybox".into()));
    drop(reg);
    assert_eq!(marker(&missing, "m/3", &app).await, (TaskState::Succeeded, "busybox".into()));
    let (state, error) = marker(&always, "a/4", &app).await;
    assert_eq!(state, TaskState::Failed, "`always` asks, and the registry is gone");
    assert!(error.contains("registry"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs a registry and containers"]
async fn never_fails_at_once_without_the_image_and_a_digest_pins_the_image() {
    require_peers();
    let reg = Registry::start();
    let app = reg.push("busybox", "app");
    let digest = manifest_digest(&reg, "app");
    let pinned = format!("{}/app@{digest}", reg.host());
    let insecure = reg.host();
    let store = ImageStore::new("pull");
    let never = worker("pull-never", &store, &["--insecure-registry", &insecure, "--pull", "never"]).await;
    let missing = worker("pull-pin", &store, &["--insecure-registry", &insecure]).await;

    // Not in the store: fails at once, the registry never asked (this one does not exist).
    let t = Instant::now();
    let (state, error) = marker(&never, "n/1", "127.0.0.1:1/nowhere:test").await;
    assert_eq!(state, TaskState::Failed);
    assert_eq!(
        error,
        "image \"127.0.0.1:1/nowhere:test\": not in this worker's image store, and the pull policy is never (serve --pull)"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    let (state, error) = marker(&never, "n/2", &app).await;
    assert_eq!(state, TaskState::Failed, "{error}");

    // Pinned by digest: exactly that image, before and after the tag moves.
    assert_eq!(marker(&missing, "p/1", &pinned).await, (TaskState::Succeeded, "busybox".into()));
    reg.push("busybox-extra", "app");
    assert_eq!(marker(&missing, "p/2", &app).await, (TaskState::Succeeded, "busybox-extra".into()));
    assert_eq!(marker(&missing, "p/3", &pinned).await, (TaskState::Succeeded, "busybox".into()));
    // What the store has (another worker on it pulled it), `never` runs.
    assert_eq!(marker(&never, "n/3", &pinned).await, (TaskState::Succeeded, "busybox".into()));
    assert_eq!(marker(&never, "n/4", &app).await, (TaskState::Succeeded, "busybox-extra".into()));
    // A digest that is not the manifest's is refused.
    let wrong = format!("{}/app@sha256:{}", reg.host(), "0".repeat(64));
    let (state, error) = marker(&missing, "p/4", &wrong).await;
    assert_eq!(state, TaskState::Failed, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs a registry, containerd and containers"]
async fn the_pull_policy_holds_for_containerd_images() {
    require_peers();
    let reg = Registry::start();
    let pushed = reg.push("busybox", "app");
    let ctd = Containerd::start();
    ctd.pull("iwtest", &pushed);
    let socket = ctd.socket().display().to_string();
    let image = format!("containerd:{pushed}");
    let ctd_flags = ["--containerd-socket", socket.as_str(), "--containerd-namespace", "iwtest"];
    let (s1, s2, s3) = (ImageStore::new("pull"), ImageStore::new("pull"), ImageStore::new("pull"));
    let with = |policy: &'static str| -> Vec<&str> {
        let mut v = ctd_flags.to_vec();
        v.extend(["--pull", policy]);
        v
    };
    let missing = worker("ctd-missing", &s1, &with("missing")).await;
    let always = worker("ctd-always", &s2, &with("always")).await;
    let never = worker("ctd-never", &s3, &with("never")).await;
    assert_eq!(marker(&missing, "m/1", &image).await, (TaskState::Succeeded, "busybox".into()));
    assert_eq!(marker(&always, "a/1", &image).await, (TaskState::Succeeded, "busybox".into()));
    let (state, error) = marker(&never, "n/1", &image).await;
    assert_eq!(state, TaskState::Failed);
    assert!(error.contains("the pull policy is never"), "{error}");

    // The name now names another image in containerd.
    reg.push("busybox-extra", "app");
    ctd.pull("iwtest", &pushed);
    assert_eq!(marker(&always, "a/2", &image).await, (TaskState::Succeeded, "busybox-extra".into()));
    assert_eq!(layers(&always).1, 3, "only the new top layer was read from containerd");
    assert_eq!(marker(&missing, "m/2", &image).await, (TaskState::Succeeded, "busybox".into()));
}
