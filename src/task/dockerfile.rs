//! BUILDING for `image = "dockerfile[:PATH]"`: the bundle is the build context, BuildKit
//! builds the Dockerfile into the image store (cached by the hash of the Dockerfile and the
//! context, see env/dockerfile.rs), and the task runs in that image like in any pulled one
//! (prepare.rs: its own overlay rootfs, the image's Env, WorkingDir, Entrypoint/Cmd and User).
//! The bundle is not mounted at /app: the Dockerfile decides what of it the image holds.

use std::path::PathBuf;

use super::Inner;
use super::attempt::Attempt;
use super::spec::TaskSpec;

/// The Dockerfile path `image` asks for, when it is a Dockerfile build.
pub(super) fn dockerfile_of(image: &str) -> Option<&str> {
    #[cfg(feature = "buildkit")]
    return crate::env::dockerfile::dockerfile_of(image);
    #[cfg(not(feature = "buildkit"))]
    return image.strip_prefix("dockerfile").filter(|r| r.is_empty() || r.starts_with(':')).map(|_| "Dockerfile");
}

#[cfg(not(feature = "buildkit"))]
pub(super) async fn prepare(
    _: &Inner,
    _: &Attempt,
    spec: &TaskSpec,
    _: PathBuf,
    _: &str,
) -> Result<crate::runtime::LaunchSpec, String> {
    Err(format!(
        "image {:?}: this worker was built without the buildkit feature",
        spec.image.clone().unwrap_or_default()
    ))
}

#[cfg(feature = "buildkit")]
pub(super) async fn prepare(
    inner: &Inner,
    attempt: &Attempt,
    spec: &TaskSpec,
    workdir: PathBuf,
    dockerfile: &str,
) -> Result<crate::runtime::LaunchSpec, String> {
    use crate::runtime::RuntimeKind;
    use crate::task::state::TaskState;

    let image = spec.image.clone().unwrap_or_default();
    if inner.config.runtime != RuntimeKind::Container {
        return Err(format!("image {image:?}: images need the container runtime"));
    }
    let Some(bundle_path) = &spec.bundle_gcs_path else {
        return Err(format!("image {image:?} is built from the bundle's Dockerfile, but the task has no bundle"));
    };
    let store = inner.image_store().await.map_err(|e| format!("opening the image store: {e}"))?;
    let context = inner.fetch_bundle(attempt, bundle_path, spec.bundle_sha256.as_deref()).await?.dir;
    attempt.set(inner, TaskState::Building, &format!("building the image from {dockerfile} through BuildKit"));
    let built =
        inner.dockerfile_images.get(store, &context, dockerfile, &attempt.dir).await.map_err(|e| e.to_string())?;
    inner.janitor.counters().used(crate::cache::Kind::Built, built.from_cache);
    attempt.set_image_build(built.from_cache, format!("dockerfile:{}", &built.key[..16]));
    let reference = crate::env::dockerfile::reference(&built.key);
    super::prepare::launch_in_image(inner, attempt, spec, workdir, store, &built.image, &reference, None)
}
