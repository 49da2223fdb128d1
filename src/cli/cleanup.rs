//! `iris-worker cleanup`.

use std::path::PathBuf;

use anyhow::Context;

use super::config::DEFAULT_STATE_DIR;

#[derive(clap::Args, Debug)]
pub struct CleanupArgs {
    /// The stopped worker's state root.
    #[arg(long, env = "IRIS_WORKER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Also remove the task directories (logs and exit records), the port lock files no
    /// process holds, and with --cache-dir every cache entry no process uses (what a task of
    /// another worker on the same cache uses stays).
    #[arg(long)]
    pub all: bool,
    /// The cache root to clear with --all.
    #[arg(long, env = "IRIS_WORKER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The image store to clear with --all and --cache-dir [default: <cache-dir>/images].
    #[arg(long, env = "IRIS_WORKER_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,
    /// Where the host's workers lock their ports (as given to `serve`).
    #[arg(long, env = "IRIS_WORKER_PORT_LOCK_DIR", default_value = crate::task::DEFAULT_PORT_LOCKS)]
    pub port_lock_dir: PathBuf,
}

pub fn run(args: CleanupArgs) -> anyhow::Result<()> {
    let n = crate::task::cleanup(&args.state_dir, args.all)
        .with_context(|| format!("cleaning up {}", args.state_dir.display()))?;
    println!("cleaned up {n} task director{}", if n == 1 { "y" } else { "ies" });
    if !args.all {
        return Ok(());
    }
    // The host's other workers and their tasks hold their ports' locks: those stay.
    let ports = crate::task::remove_unheld_port_locks(&args.port_lock_dir)
        .with_context(|| format!("removing unused port locks in {}", args.port_lock_dir.display()))?;
    if ports > 0 {
        println!("removed {ports} unused port lock{}", if ports == 1 { "" } else { "s" });
    }
    if let Some(cache) = args.cache_dir
        && cache.exists()
    {
        let images = args.image_dir.unwrap_or_else(|| cache.join("images"));
        let cleared =
            crate::janitor::tools::clear(&crate::cache::CacheDirs::new(&cache, images), &super::cache::describe_holder);
        println!(
            "removed {} cache entr{} from {}",
            cleared.removed.len(),
            plural(cleared.removed.len()),
            cache.display()
        );
        for kept in &cleared.in_use {
            println!("kept {} ({}): in use by {}", kept.entry.name, kept.entry.kind, kept.holders.join(", "));
        }
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "y" } else { "ies" }
}
