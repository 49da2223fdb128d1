//! BUILDING for `image = "dockerfile[:PATH]"`: the bundle is the build context, BuildKit
//! builds the Dockerfile (cached by its hash and the context's, see env/dockerfile.rs), and the
//! task runs in the built root filesystem with the image's Env and WorkingDir. The task's own
//! env vars win over the image's; its command wins over the image's Entrypoint/Cmd, which run
//! when it gives none. The image's User is not applied yet: tasks run as root.

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
    use crate::runtime::{Mount, RuntimeKind};
    use crate::task::state::TaskState;

    let image = spec.image.clone().unwrap_or_default();
    if inner.config.runtime != RuntimeKind::Container {
        return Err(format!("image {image:?} needs the container runtime"));
    }
    let Some(bundle_path) = &spec.bundle_gcs_path else {
        return Err(format!("image {image:?} is built from the bundle's Dockerfile, but the task has no bundle"));
    };
    let context = inner.fetch_bundle(attempt, bundle_path, spec.bundle_sha256.as_deref()).await?;
    attempt.set(inner, TaskState::Building, &format!("building the image from {dockerfile} through BuildKit"));
    let built = inner.dockerfile_images.get(&context, dockerfile, &attempt.dir).await.map_err(|e| e.to_string())?;
    attempt.set_image_build(built.from_cache, format!("dockerfile:{}", &built.key[..16]));

    let argv = match &spec.command {
        Some(command) => command.to_argv(),
        None if !built.config.default_argv().is_empty() => built.config.default_argv(),
        None => return Err(format!("image {image:?}: the task has no command and the image no Entrypoint or Cmd")),
    };
    let cwd =
        if built.config.working_dir.is_empty() { "/workdir".to_string() } else { built.config.working_dir.clone() };
    let mut env = super::env::task_env(spec, &inner.config.env, &attempt.meta.ports, "/workdir");
    for var in &built.config.env {
        let Some((k, _)) = var.split_once('=') else { continue };
        if spec.env_vars.contains_key(k) || k.starts_with("IRIS_") {
            continue;
        }
        env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k));
        env.push(var.clone());
    }
    let mounts = vec![Mount { host: workdir, target: "/workdir".into(), read_only: false }];
    Ok(super::prepare::launch_spec(inner, attempt, spec, argv, env, cwd, built.rootfs, mounts))
}
