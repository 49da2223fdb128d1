//! BUILDING for `image = "dockerfile[:PATH]"`: the bundle is the build context, BuildKit
//! builds the Dockerfile into the image store (cached by the hash of the Dockerfile and the
//! context, see env/image_build.rs), and the task runs in that image like in any pulled one
//! (prepare/mod.rs: its own overlay rootfs, the image's Env, WorkingDir, Entrypoint/Cmd and User).
//! The bundle is not mounted at /app: the Dockerfile decides what of it the image holds.

use std::path::PathBuf;

use super::{Environments, Preparing};
use crate::env::spec::TaskSpec;

/// The Dockerfile path `image` asks for, when it is a Dockerfile build.
pub fn dockerfile_of(image: &str) -> Option<&str> {
    #[cfg(feature = "buildkit")]
    return crate::env::image_build::dockerfile_of(image);
    #[cfg(not(feature = "buildkit"))]
    return image.strip_prefix("dockerfile").filter(|r| r.is_empty() || r.starts_with(':')).map(|_| "Dockerfile");
}

#[cfg(not(feature = "buildkit"))]
pub(super) async fn prepare(
    _: &Environments,
    _: &dyn Preparing,
    spec: &TaskSpec,
    _: PathBuf,
    _: &str,
) -> Result<crate::runtime::LaunchSpec, crate::env::EnvError> {
    Err(crate::env::EnvError::NoBuildkitFeature(spec.image.clone().unwrap_or_default()))
}

#[cfg(feature = "buildkit")]
pub(super) async fn prepare(
    envs: &Environments,
    task: &dyn Preparing,
    spec: &TaskSpec,
    workdir: PathBuf,
    dockerfile: &str,
) -> Result<crate::runtime::LaunchSpec, crate::env::EnvError> {
    use crate::runtime::RuntimeKind;

    let image = spec.image.clone().unwrap_or_default();
    if envs.config.runtime != RuntimeKind::Container {
        return Err(crate::env::EnvError::ImageNeedsContainers(image));
    }
    let Some(bundle_path) = &spec.bundle_gcs_path else {
        return Err(crate::env::EnvError::DockerfileWithoutBundle(image));
    };
    let store = envs.image_store().await?;
    let context = super::fetch_bundle(envs, task, bundle_path, spec.bundle_sha256.as_deref()).await?.dir;
    task.progress(&format!("building the image from {dockerfile} through BuildKit"));
    let built = envs.built_images().get(store, &context, dockerfile, task.dir()).await?;
    task.used(crate::cache::Kind::Built, built.from_cache);
    task.built_image(built.from_cache, format!("dockerfile:{}", &built.key[..16]));
    let reference = crate::env::image_build::reference(&built.key);
    super::launch_in_image(envs, task, spec, workdir, store, &built.image, &reference, None)
}
