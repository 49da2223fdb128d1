//! Tasks in OCI images: pulled from a real registry, taken from an OCI layout or a real
//! containerd, unpacked once into the worker's image store, run on an overlay rootfs. Bad
//! images (tampered, hostile, unsupported) fail the task with an error naming what failed and
//! leave nothing behind.
//!
//! Root-only (`#[ignore = "root: …"]`): each test starts its own `docker-registry` (and
//! containerd) from tests/common/registry.rs, and a worker with its own image store.

mod common;
#[path = "common/registry.rs"]
mod registry;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use iris_worker::task::TaskState;
use registry::{Containerd, ImageStore, Registry};
use sha2::{Digest, Sha256};

const WITHIN: Duration = Duration::from_secs(120);

/// A worker with an image store of its own. Bind as `let (store, w) = …`: the worker drops
/// (and cleans up its mounts) before the store is removed.
async fn worker(name: &str, extra: &[&str]) -> (ImageStore, Worker) {
    let store = ImageStore::new("images");
    let w = Worker::start(name, &store.args(extra)).await;
    (store, w)
}

fn image_task(task_id: &str, image: &str, script: &str) -> iris_worker::proto::worker::RunTaskRequest {
    let mut req = sh(task_id, script);
    req.image = image.to_string();
    req
}

async fn run(
    c: &mut Client,
    req: iris_worker::proto::worker::RunTaskRequest,
) -> (iris_worker::proto::TaskStatus, String) {
    let id = req.task_id.clone();
    c.run_task(req).await.unwrap();
    let s = wait_end(c, &id, WITHIN).await;
    let out: String = all_logs(c, &id).await.into_iter().map(|l| l.data + "\n").collect();
    (s, out)
}

/// Layers reused and unpacked (see [`registry::image_layers`]).
fn image_cache(addr: &str) -> (u64, u64) {
    registry::image_layers(addr)
}

/// The unpacked layer directories of a store.
fn layer_dirs(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.join("layers"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether any overlay mount uses something below `dir`.
fn overlays_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - overlay ") && l.contains(&needle))
        .map(str::to_string)
        .collect()
}

fn require_peers() {
    registry::require_peers("image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs a registry and containers"]
async fn a_registry_image_runs_and_is_unpacked_once() {
    require_peers();
    let reg = Registry::start();
    let python = reg.push("python", "python");
    let insecure = reg.host();
    let (store, w) = worker("img-python", &["--insecure-registry", &insecure]).await;
    let images = store.0.clone();
    let mut c = w.client().await;

    // Three tasks at once on an empty store: the image and each layer are fetched once.
    for i in 0..3 {
        c.run_task(image_task(&format!("py/task-{i}"), &python, "python3 -c 'print(1)'")).await.unwrap();
    }
    for i in 0..3 {
        let id = format!("py/task-{i}");
        let s = wait_end(&mut c, &id, WITHIN).await;
        assert_eq!(state_of(&s), TaskState::Succeeded, "{s:?}\n{}", w.logs());
        let out: Vec<String> = all_logs(&mut c, &id).await.into_iter().map(|l| l.data).collect();
        assert_eq!(out, vec!["1".to_string()], "{id}");
    }
    let (_, misses) = image_cache(&w.addr());
    assert_eq!(misses, 2, "the python image has two layers, each unpacked once");
    assert_eq!(layer_dirs(&images).len(), 2);

    // A later task of the same image unpacks nothing new, and runs from a fresh upper layer.
    let (s, out) = run(
        &mut c,
        image_task(
            "py2/task-0",
            &python,
            "test ! -e /created-by-an-earlier-task && cat /etc/image-marker && touch /created-by-an-earlier-task",
        ),
    )
    .await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{out}");
    assert_eq!(out, "python\n");
    let (hits, misses) = image_cache(&w.addr());
    assert_eq!(misses, 2, "no layer unpacked again");
    assert!(hits >= 2, "hits {hits}");
    let (s, out) = run(&mut c, image_task("py3/task-0", &python, "test ! -e /created-by-an-earlier-task")).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "a task's writes must not reach the next task: {out}");

    // Every task's rootfs was unmounted when it ended.
    assert!(overlays_using(w.state_dir()).is_empty(), "{:?}", overlays_using(w.state_dir()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs a registry and containers"]
async fn images_sharing_a_base_layer_store_it_once_and_whiteouts_hide_files() {
    require_peers();
    let reg = Registry::start();
    let busybox = reg.push("busybox", "busybox");
    let extra = reg.push("busybox-extra", "busybox-extra");
    let insecure = reg.host();
    let (store, w) = worker("img-layers", &["--insecure-registry", &insecure]).await;
    let images = store.0.clone();
    let mut c = w.client().await;

    // The whiteout hides /fixture/gone; the opaque /fixture/opq shows only the top layer's c.
    let (s, out) = run(
        &mut c,
        image_task(
            "wh/task-0",
            &busybox,
            "test ! -e /fixture/gone && cat /fixture/kept && ls /fixture/opq && ls -a /fixture | grep -c wh; true",
        ),
    )
    .await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{out}");
    assert_eq!(out, "kept\nc\n0\n", "whiteout files must not show, nor hidden ones");

    // The image's config applies: WorkingDir, Env (with the request's and IRIS_* on top),
    // and Entrypoint/Cmd when the task gives no command.
    let mut req = image_task("cfg/task-0", &busybox, "pwd; echo $IMAGE_VAR $MINE $IRIS_TASK_ID");
    req.environment = Some(iris_worker::proto::EnvironmentConfig {
        env_vars: [("MINE".to_string(), "from-request".to_string())].into(),
        ..Default::default()
    });
    let (s, out) = run(&mut c, req).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{out}");
    assert_eq!(out, "/fixture\nfrom-image from-request cfg/task-0\n");
    let mut req = image_task("cmd/task-0", &busybox, "");
    req.command = None;
    let (s, out) = run(&mut c, req).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{out}");
    assert_eq!(out, "default command of the image\n");

    let (s, out) = run(&mut c, image_task("extra/task-0", &extra, "cat /etc/image-marker /fixture/gone")).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{out}");
    assert_eq!(out, "busybox-extra\nhidden by a whiteout\n");
    // busybox: base + top; busybox-extra: the same base + its own top.
    assert_eq!(layer_dirs(&images).len(), 3, "the shared base layer is stored once");
    assert_eq!(image_cache(&w.addr()).1, 3);
}

/// A manifest of the task's root filesystem: every path, its type, mode, owner and content.
const MANIFEST: &str = r#"find / -xdev | sort | while read -r p; do
  if [ -f "$p" ] && [ ! -L "$p" ]; then h=$(sha256sum < "$p" | cut -c1-16); else h=-; fi
  if [ -L "$p" ]; then l=$(readlink "$p"); else l=-; fi
  echo "$p $(stat -c '%F %a %u %g' "$p") $h $l"
done"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs a registry, containerd and containers"]
async fn an_oci_layout_and_containerd_give_the_same_rootfs() {
    require_peers();
    let reg = Registry::start();
    let pushed = reg.push("busybox", "busybox");
    let ctd = Containerd::start();
    ctd.pull("iwtest", &pushed);
    let socket = ctd.socket().display().to_string();

    // Two workers with their own stores, so each unpacks the image from its own source.
    let (s1, from_layout) = worker("img-layout", &[]).await;
    let layout_store = s1.0.clone();
    let (s2, from_containerd) =
        worker("img-ctd", &["--containerd-socket", &socket, "--containerd-namespace", "iwtest"]).await;
    let ctd_store = s2.0.clone();

    let layout_ref = format!("oci:{}:busybox", registry::layout().display());
    let (s, a) = run(&mut from_layout.client().await, image_task("m/task-0", &layout_ref, MANIFEST)).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{a}");
    let (s, b) =
        run(&mut from_containerd.client().await, image_task("m/task-0", &format!("containerd:{pushed}"), MANIFEST))
            .await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{b}\n{}", from_containerd.logs());
    assert!(a.lines().count() > 100, "a whole rootfs: {a}");
    assert!(a.contains("/fixture/opq/c regular file 644 0 0"), "{a}");
    assert!(!a.contains("/fixture/gone"), "{a}");
    if a != b {
        let only_a: Vec<&str> = a.lines().filter(|l| !b.contains(l)).take(10).collect();
        let only_b: Vec<&str> = b.lines().filter(|l| !a.contains(l)).take(10).collect();
        panic!("the rootfs differs:\nonly from the layout: {only_a:#?}\nonly from containerd: {only_b:#?}");
    }
    assert_eq!(layer_dirs(&layout_store), layer_dirs(&ctd_store), "the same layers, by digest");

    // An image containerd does not have fails the task, naming containerd and the image.
    let (s, _) =
        run(&mut from_containerd.client().await, image_task("m/task-1", "containerd:no/such:image", "true")).await;
    assert_eq!(state_of(&s), TaskState::Failed);
    assert!(s.error.contains("containerd") && s.error.contains("no/such:image"), "{}", s.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs a registry and containers"]
async fn a_tampered_layer_fails_with_a_digest_error_and_leaves_nothing() {
    require_peers();
    let reg = Registry::start();
    let busybox = reg.push("busybox", "busybox");
    // The top layer of the busybox image (the fixture's manifest names it).
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(registry::layout().join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "busybox")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = |d: &str| registry::layout().join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&manifest_digest)).unwrap()).unwrap();
    let top = manifest["layers"][1]["digest"].as_str().unwrap().to_string();
    let path = reg.blob_path(&top);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let insecure = reg.host();
    let (store, w) = worker("img-tamper", &["--insecure-registry", &insecure]).await;
    let images = store.0.clone();
    let mut c = w.client().await;
    let (s, _) = run(&mut c, image_task("t/task-0", &busybox, "true")).await;
    assert_eq!(state_of(&s), TaskState::Failed);
    assert!(s.error.contains("digest mismatch") && s.error.contains(&top), "{}", s.error);
    assert!(!layer_dirs(&images).contains(&top.trim_start_matches("sha256:").to_string()));
    // The other layer's unpack, abandoned when this one failed, removes its temp dir when it
    // stops.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(images.join("tmp")).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "a half-unpacked layer is left in {}", images.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An unreachable registry and a malformed reference.
    let (s, _) = run(&mut c, image_task("t/task-1", "127.0.0.1:1/nothing:here", "true")).await;
    assert_eq!(state_of(&s), TaskState::Failed);
    assert!(s.error.contains("registry 127.0.0.1:1"), "{}", s.error);
    let err = c.run_task(image_task("t/task-2", "Not A Reference!", "true")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("image"), "{}", err.message());
}

/// Writes an OCI layout at `dir` with one image `tag` of one gzip layer made of `entries`
/// (raw tar names: hostile ones included) and layer media type `media_type`.
fn hostile_layout(dir: &Path, tag: &str, entries: &[(&str, &[u8])], media_type: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append(&h, *data).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    let (layer, layer_size) = put(&gz.finish().unwrap());
    let (config, config_size) = put(br#"{"architecture":"amd64","os":"linux","config":{}}"#);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": media_type, "digest": layer, "size": layer_size}],
    });
    let (m, m_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m, "size": m_size,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs containers"]
async fn a_hostile_layer_fails_and_nothing_is_written_outside_the_store() {
    require_peers();
    let (store, w) = worker("img-hostile", &[]).await;
    let images = store.0.clone();
    let mut c = w.client().await;
    let layouts = tempfile::Builder::new().prefix("iwtest-layouts-").tempdir().unwrap();
    let marker = format!("iwtest-escaped-{}", std::process::id());

    // `../../<marker>` from a layer's temp dir (<store>/tmp/<x>/) would land in the store's
    // parent; `../../../../etc/<marker>` would climb further.
    let evil = layouts.path().join("evil");
    let up = format!("../../{marker}");
    let etc = format!("../../../../../../../../etc/{marker}");
    hostile_layout(&evil, "v1", &[("ok", b"fine"), (&up, b"x")], "application/vnd.oci.image.layer.v1.tar+gzip");
    let (s, _) = run(&mut c, image_task("h/task-0", &format!("oci:{}:v1", evil.display()), "true")).await;
    assert_eq!(state_of(&s), TaskState::Failed);
    assert!(s.error.contains("'..'"), "{}", s.error);
    let evil2 = layouts.path().join("evil2");
    hostile_layout(&evil2, "v1", &[(&etc, b"x")], "application/vnd.oci.image.layer.v1.tar+gzip");
    let (s, _) = run(&mut c, image_task("h/task-1", &format!("oci:{}:v1", evil2.display()), "true")).await;
    assert_eq!(state_of(&s), TaskState::Failed);
    let abs = layouts.path().join("abs");
    let abs_name = format!("/tmp/{marker}");
    hostile_layout(&abs, "v1", &[(&abs_name, b"x")], "application/vnd.oci.image.layer.v1.tar+gzip");
    let (s, _) = run(&mut c, image_task("h/task-2", &format!("oci:{}:v1", abs.display()), "true")).await;
    assert_eq!(state_of(&s), TaskState::Failed);
    assert!(s.error.contains("absolute"), "{}", s.error);

    for p in [
        images.parent().unwrap().join(&marker),
        images.join(&marker),
        PathBuf::from("/etc").join(&marker),
        PathBuf::from("/tmp").join(&marker),
    ] {
        assert!(!p.exists(), "{} was written", p.display());
    }
    assert!(layer_dirs(&images).is_empty(), "{:?}", layer_dirs(&images));
    assert_eq!(std::fs::read_dir(images.join("tmp")).unwrap().count(), 0, "no half-unpacked layer is left");

    // An unsupported layer media type is refused before anything is fetched.
    let wasm = layouts.path().join("wasm");
    hostile_layout(&wasm, "v1", &[("ok", b"fine")], "application/vnd.wasm.content.layer.v1+wasm");
    let (s, _) = run(&mut c, image_task("h/task-3", &format!("oci:{}:v1", wasm.display()), "true")).await;
    assert_eq!(state_of(&s), TaskState::Failed);
    assert!(s.error.contains("unsupported media type") && s.error.contains("wasm"), "{}", s.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root: runs a registry and containers"]
async fn the_layer_bound_evicts_unused_layers_but_never_a_running_tasks() {
    require_peers();
    let reg = Registry::start();
    let busybox = reg.push("busybox", "busybox");
    let extra = reg.push("busybox-extra", "busybox-extra");
    let insecure = reg.host();
    // A bound of 1 KiB: every pull is over it, so each one evicts all it may.
    let (store, w) = worker("img-evict", &["--insecure-registry", &insecure, "--image-cache-size", "1K"]).await;
    let images = store.0.clone();
    let mut c = w.client().await;

    c.run_task(image_task("ev/running", &busybox, "sleep 60")).await.unwrap();
    wait_for(&mut c, "ev/running", WITHIN, |s| state_of(s) == TaskState::Running).await;
    let running_layers = layer_dirs(&images);
    assert_eq!(running_layers.len(), 2);

    // Pulling another image evicts, but not the layers the running task's rootfs is made of.
    let (s, out) = run(&mut c, image_task("ev/extra", &extra, "cat /etc/image-marker")).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{out}");
    let now = layer_dirs(&images);
    for l in &running_layers {
        assert!(now.contains(l), "layer {l} of a running task was evicted: {now:?}");
    }
    let (s, out) = run(&mut c, image_task("ev/check", &busybox, "cat /etc/image-marker")).await;
    assert_eq!(state_of(&s), TaskState::Succeeded, "{out}");

    // Once nothing runs in busybox, the next pull evicts its top layer (busybox-extra's own
    // top is pinned by that pull; the base is shared with it).
    c.kill_task(iris_worker::proto::worker::KillTaskRequest { task_id: "ev/running".into(), term_timeout_ms: 100 })
        .await
        .unwrap();
    wait_end(&mut c, "ev/running", WITHIN).await;
    // The same image under a new name: a pull (its layers are all there), then eviction,
    // while the task runs on them.
    let extra2 = reg.push("busybox-extra", "busybox-extra2");
    c.run_task(image_task("ev/extra3", &extra2, "sleep 60")).await.unwrap();
    wait_for(&mut c, "ev/extra3", WITHIN, |s| state_of(s) == TaskState::Running).await;
    // Eviction runs beside the task (the cache budget looks once the task is prepared): poll.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let after = layer_dirs(&images);
        let gone: Vec<&String> = running_layers.iter().filter(|l| !after.contains(l)).collect();
        if gone.len() == 1 {
            break;
        }
        assert!(gone.len() < 2, "the shared base must stay: before {running_layers:?}, after {after:?}");
        assert!(std::time::Instant::now() < deadline, "busybox's own top layer was not evicted: {after:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
