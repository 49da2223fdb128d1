//! BUILDING for `image = "dockerfile[:PATH]"`: the bundle is the build context, BuildKit
//! builds the Dockerfile into the image store (cached by the hash of the Dockerfile and the
//! context, see env/image_build.rs), and the task runs in that image like in any pulled one
//! (prepare/mod.rs: its own overlay rootfs, the image's Env, WorkingDir, Entrypoint/Cmd and User).
//! The bundle is not mounted at /app: the Dockerfile decides what of it the image holds.

use std::path::PathBuf;

use crate::task::Inner;
use crate::task::attempt::Attempt;
use crate::task::spec::TaskSpec;

/// The Dockerfile path `image` asks for, when it is a Dockerfile build.
pub(in crate::task) fn dockerfile_of(image: &str) -> Option<&str> {
    #[cfg(feature = "buildkit")]
    return crate::env::image_build::dockerfile_of(image);
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
) -> Result<crate::runtime::LaunchSpec, super::PrepareError> {
    Err(super::PrepareError::NoBuildkitFeature(spec.image.clone().unwrap_or_default()))
}

#[cfg(feature = "buildkit")]
pub(super) async fn prepare(
    inner: &Inner,
    attempt: &Attempt,
    spec: &TaskSpec,
    workdir: PathBuf,
    dockerfile: &str,
) -> Result<crate::runtime::LaunchSpec, super::PrepareError> {
    use crate::runtime::RuntimeKind;
    use crate::task::state::TaskState;

    let image = spec.image.clone().unwrap_or_default();
    if inner.config.runtime != RuntimeKind::Container {
        return Err(super::PrepareError::ImageNeedsContainers(image));
    }
    let Some(bundle_path) = &spec.bundle_gcs_path else {
        return Err(super::PrepareError::DockerfileWithoutBundle(image));
    };
    let store = inner.envs.image_store().await?;
    let context = super::fetch_bundle(inner, attempt, bundle_path, spec.bundle_sha256.as_deref()).await?.dir;
    attempt.set(inner, TaskState::Building, &format!("building the image from {dockerfile} through BuildKit"));
    let built = inner.envs.built_images().get(store, &context, dockerfile, &attempt.dir).await?;
    inner.janitor.counters().used(crate::cache::Kind::Built, built.from_cache);
    attempt.set_image_build(built.from_cache, format!("dockerfile:{}", &built.key[..16]));
    let reference = crate::env::image_build::reference(&built.key);
    super::launch_in_image(inner, attempt, spec, workdir, store, &built.image, &reference, None)
}
