//! `iris-worker cleanup`.

use std::path::PathBuf;

use anyhow::Context;

use super::config::DEFAULT_STATE_DIR;

#[derive(clap::Args, Debug)]
pub struct CleanupArgs {
    /// The stopped worker's state root.
    #[arg(long, env = "IRIS_WORKER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Also remove the task directories (logs and exit records) and the caches' rootfs trees.
    #[arg(long)]
    pub all: bool,
    /// The cache root to clear with --all.
    #[arg(long, env = "IRIS_WORKER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

pub fn run(args: CleanupArgs) -> anyhow::Result<()> {
    let n = crate::task::cleanup(&args.state_dir, args.all)
        .with_context(|| format!("cleaning up {}", args.state_dir.display()))?;
    println!("cleaned up {n} task director{}", if n == 1 { "y" } else { "ies" });
    if args.all
        && let Some(cache) = args.cache_dir
        && cache.exists()
    {
        std::fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
        println!("removed {}", cache.display());
    }
    Ok(())
}
