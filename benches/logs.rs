//! `scripts/bench logs`: the task log's two hot paths.
//!
//! 1. Ingest: a task printing timestamped lines as fast as it can (256 `cat`s of a 1 MiB block
//!    of whole lines, made first in its workdir), read by its supervisor, stamped and appended
//!    to the indexed log; MB/s from the first line's timestamp to the last's. The peer,
//!    interleaved: the same printer on the host into `cat > file`. Scaled down (and said so)
//!    when less than 8× its size is free.
//! 2. Tail: the last 100 lines of a 5 GB log. The log is a finished task's, grown to 5 GB with
//!    the project's own `LogWriter` (the supervisor's appender) in the benchmark's temp dir,
//!    then read with `logs::read` (what FetchTaskLogs runs) and with FetchTaskLogs over gRPC;
//!    the peer is `tail -n 100` of the same lines as a plain text file. With less than 15 GB
//!    free the log is scaled down to a third of the free space, and the figure says so.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{Figure, Row, Server};
use iris_worker::logs::{LogFilter, LogRecord, LogWriter, Source};
use iris_worker::proto::worker;

/// One log line as a busy service prints it (99 bytes and a newline).
const LINE: &str =
    "2026-11-24T22:41:50.123Z INFO  iris.bench.handler request served path=/api/v1/items status=200 ok=1";
const INGEST_BYTES: u64 = 256 << 20;
const TAIL_BYTES: u64 = 5 << 30;

/// Bytes available to us on the filesystem of `path`.
fn available(path: &Path) -> anyhow::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// The printing script: a block of whole lines made once in `dir` (before the first line is
/// printed), then `copies` cats of it, so the producer is no bottleneck (busybox `yes` writes
/// one line per syscall).
fn printer(dir: &str, copies: u64) -> String {
    let block = BLOCK_LINES * (LINE.len() as u64 + 1);
    format!(
        "yes '{LINE}' | head -c {block} > {dir}/block && i=0 && while [ $i -lt {copies} ]; do cat {dir}/block; i=$((i + 1)); done"
    )
}

/// Lines per block (a block is about 1 MiB).
const BLOCK_LINES: u64 = (1 << 20) / (LINE.len() as u64 + 1);

struct Ingest {
    ours: Figure,
    cat: Figure,
    bytes: u64,
    note: String,
}

async fn ingest(server: &Server, work: &Path, rounds: usize) -> anyhow::Result<Ingest> {
    let mut client = server.client().await?;
    // The log (and its index) and the peer's file exist at once: keep both under an eighth of
    // what is free, as other programs share the disk.
    let free = available(work)?;
    let mut copies = INGEST_BYTES >> 20;
    let mut note = String::new();
    if free / 8 < INGEST_BYTES {
        copies = ((free / 8) >> 20).max(8);
        note = format!("scaled down to {copies} MB: only {} MB free", free >> 20);
        eprintln!("logs: ingest {note}");
    }
    let lines = copies * BLOCK_LINES;
    let bytes = lines * (LINE.len() as u64 + 1);
    let mut f = Ingest {
        ours: Figure::new("log ingest, task → supervisor → indexed log"),
        cat: Figure::new("log ingest peer, the same printer into cat > file"),
        bytes,
        note,
    };
    for i in 0..rounds {
        let task_id = format!("bench/ingest-{i}");
        common::run(&mut client, common::command_task(&task_id, &["sh", "-c", &printer("/workdir", copies)])).await?;
        let tail = |start_line: i64| worker::FetchTaskLogsRequest {
            task_id: task_id.clone(),
            filter: Some(worker::FetchLogsFilter { start_line, max_lines: 1, ..Default::default() }),
        };
        let first = client.fetch_task_logs(tail(0)).await?.into_inner().logs;
        let last = client.fetch_task_logs(tail(-1)).await?.into_inner().logs;
        let (Some(first), Some(last)) = (first.first(), last.first()) else { bail!("{task_id} logged nothing") };
        if last.line_number as u64 + 1 != lines || last.data != LINE {
            bail!("{task_id} logged {} lines ending {:?}, want {lines} of {LINE:?}", last.line_number + 1, last.data);
        }
        // At least 1 ms: the figure is a rate.
        f.ours.samples.push(Duration::from_millis((last.timestamp_ms - first.timestamp_ms).max(1) as u64));
        // The round's log is measured: free its space.
        let task_dir =
            iris_worker::task::store::tasks_dir(&server.state).join(iris_worker::task::store::task_key(&task_id, 0));
        std::fs::remove_dir_all(task_dir.join(iris_worker::taskdir::LOGS))?;
        let _ = std::fs::remove_file(task_dir.join(iris_worker::taskdir::WORKDIR).join("block"));

        // The peer: the same printer, its block made before the clock starts.
        let dir = work.join("peer");
        std::fs::create_dir_all(&dir)?;
        let script = printer(&dir.to_string_lossy(), copies);
        let (make, rest) = script.split_once(" && i=0 && ").context("the printer script")?;
        let sh =
            |script: &str| Command::new(common::rootfs().join("bin/busybox")).arg("sh").arg("-c").arg(script).status();
        if !sh(make)?.success() {
            bail!("making the peer's block failed");
        }
        let file = dir.join("cat-out");
        let t = Instant::now();
        let st = sh(&format!("i=0 && {rest} | cat > {}", file.display()))?;
        f.cat.samples.push(t.elapsed());
        if !st.success() || std::fs::metadata(&file)?.len() != bytes {
            bail!("the cat pipeline failed ({st}) or wrote another size");
        }
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(f)
}

/// Grows the log in `dir` to about `bytes` (records + index) and writes the same lines, newline
/// ended, to `text`. Returns the lines written.
fn grow(dir: &Path, text: &Path, bytes: u64) -> anyhow::Result<u64> {
    let mut w = LogWriter::open(dir)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(text)?);
    // Per line: the record header (13), the line and its number (10), its index entry (16).
    let per_line = 13 + LINE.len() as u64 + 10 + 16;
    let total = bytes / per_line;
    let batch = 8192u64;
    let mut buf = String::new();
    let mut written = 0u64;
    let ts0 = 1_764_000_000_000i64;
    while written < total {
        let n = batch.min(total - written);
        buf.clear();
        let mut ends = Vec::with_capacity(n as usize);
        for j in 0..n {
            // The line's number in its text, so lines differ as real ones do.
            use std::fmt::Write as _;
            let _ = writeln!(buf, "{LINE} {:09}", written + j);
            ends.push(buf.len());
        }
        let mut start = 0;
        let records: Vec<LogRecord<'_>> = ends
            .iter()
            .enumerate()
            .map(|(j, &end)| {
                let r = LogRecord {
                    ts_ms: ts0 + ((written + j as u64) / 1000) as i64,
                    source: Source::Stdout,
                    data: &buf.as_bytes()[start..end - 1],
                };
                start = end;
                r
            })
            .collect();
        w.append(&records)?;
        out.write_all(buf.as_bytes())?;
        written += n;
    }
    out.flush()?;
    Ok(w.lines_written())
}

struct Tail {
    lib: Figure,
    rpc: Figure,
    tail: Figure,
    bytes: u64,
    note: String,
}

async fn tail(server: &Server, work: &Path, reads: usize) -> anyhow::Result<Tail> {
    let free = available(work)?;
    let (bytes, note) = if free >= 15 << 30 {
        (TAIL_BYTES, String::new())
    } else {
        // The log and its plain-text copy: a third of what is free between them.
        let b = free / 6;
        (b, format!("scaled down to {} MB: only {} MB free (< 15 GB)", b >> 20, free >> 20))
    };
    if !note.is_empty() {
        eprintln!("logs: tail {note}");
    }
    let mut client = server.client().await?;
    let task_id = "bench/tail";
    common::run(&mut client, common::command_task(task_id, &["echo", "first line"])).await?;
    let dir = iris_worker::task::store::tasks_dir(&server.state)
        .join(iris_worker::task::store::task_key(task_id, 0))
        .join(iris_worker::taskdir::LOGS);
    let text = work.join("tail.txt");
    let t = Instant::now();
    let lines = grow(&dir, &text, bytes)?;
    let size: u64 =
        ["log.bin", "log.idx"].iter().map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0)).sum();
    eprintln!("logs: wrote a {} MB log ({lines} lines) and its text in {:.1?}", size >> 20, t.elapsed());
    let filter = LogFilter { start_line: -100, max_lines: 100, ..Default::default() };
    let req = worker::FetchTaskLogsRequest {
        task_id: task_id.into(),
        filter: Some(worker::FetchLogsFilter { start_line: -100, max_lines: 100, ..Default::default() }),
    };
    let mut f = Tail {
        lib: Figure::new("tail 100 lines of the log, logs::read"),
        rpc: Figure::new("tail 100 lines of the log, FetchTaskLogs gRPC"),
        tail: Figure::new("tail 100 lines peer, tail -n 100 of the text"),
        bytes: size,
        note,
    };
    for i in 0..reads + 5 {
        let t = Instant::now();
        let got = iris_worker::logs::read(&dir, &filter)?;
        let a = t.elapsed();
        let t = Instant::now();
        let resp = client.fetch_task_logs(req.clone()).await?.into_inner();
        let b = t.elapsed();
        let t = Instant::now();
        let out = Command::new("tail").arg("-n").arg("100").arg(&text).stderr(Stdio::null()).output()?;
        let c = t.elapsed();
        if got.len() != 100 || resp.logs.len() != 100 || out.stdout.iter().filter(|b| **b == b'\n').count() != 100 {
            bail!("a tail did not return 100 lines ({}, {}, tail(1) {:?})", got.len(), resp.logs.len(), out.status);
        }
        if got.last().map(|l| l.line_number + 1) != Some(lines) {
            bail!("the tail's last line is not line {}", lines - 1);
        }
        if i >= 5 {
            f.lib.samples.push(a);
            f.rpc.samples.push(b);
            f.tail.samples.push(c);
        }
    }
    std::fs::remove_file(&text)?;
    std::fs::remove_dir_all(&dir).context("removing the big log")?;
    Ok(f)
}

fn main() -> anyhow::Result<()> {
    let rounds = common::runs(3);
    let work = tempfile::Builder::new().prefix("iris-bench-logs-").tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (ing, t) = rt.block_on(async {
        let server = Server::start(work.path(), "iris-bench-logs", &[])?;
        let ing = ingest(&server, work.path(), rounds).await?;
        let t = tail(&server, work.path(), 100).await?;
        anyhow::Ok((ing, t))
    })?;
    let mb = ing.bytes as f64 / 1e6;
    let rate = |f: &Figure| mb / (f.pct(0.5) / 1e3);
    let (ours_rate, cat_rate) = (rate(&ing.ours), rate(&ing.cat));
    let scaled = |note: &str| if note.is_empty() { String::new() } else { format!(" ({note})") };
    let size = format!("{:.1} GB log{}", t.bytes as f64 / 1e9, scaled(&t.note));
    let tail_us = t.tail.pct(0.5) * 1e3;
    let tail_row = |f: &Figure| {
        let r = Row::timed(f, "µs");
        let ratio = tail_us / r.p50;
        r.vs(format!("{size}; tail(1)/this {ratio:.2}x"))
            .with("tail1_over_this", ratio)
            .with("log_bytes", t.bytes as f64)
    };
    let rows = vec![
        Row::value(ing.ours.name, ing.ours.samples.len(), "MB/s", ours_rate)
            .vs(format!("this/cat {:.2}x; {mb:.0} MB{}", ours_rate / cat_rate, scaled(&ing.note)))
            .with("this_over_cat", ours_rate / cat_rate)
            .with("bytes", ing.bytes as f64)
            .goal(true, 200.0),
        Row::value(ing.cat.name, ing.cat.samples.len(), "MB/s", cat_rate),
        tail_row(&t.lib).goal(false, 5000.0),
        tail_row(&t.rpc),
        tail_row(&t.tail),
    ];
    common::report("logs", &rows);
    Ok(())
}
