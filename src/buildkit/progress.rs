//! `Control.Status` updates → timestamped log lines, in the style of BuildKit's plain
//! progress output: `#N <vertex name>` when a step starts, its output lines prefixed `#N `,
//! and `#N DONE 0.4s`, `#N CACHED` or `#N ERROR: …` when it ends.

use std::collections::HashMap;

use super::proto::control::StatusResponse;

/// One line of the build's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When BuildKit says it happened (milliseconds since the epoch).
    pub ts_ms: i64,
    pub text: String,
}

#[derive(Debug, Default)]
struct VertexState {
    number: usize,
    started: bool,
    done: bool,
    /// Output not yet ended by a newline.
    partial: Vec<u8>,
}

/// Turns status updates into lines; one per build.
#[derive(Debug, Default)]
pub struct Progress {
    vertices: HashMap<String, VertexState>,
    /// The messages of failed vertices, for the build's error.
    errors: Vec<String>,
}

fn ms(ts: &Option<crate::buildkit::proto::control::Timestamp>) -> Option<i64> {
    ts.as_ref().map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Progress {
    /// The lines `update` adds to the log.
    pub fn lines(&mut self, update: &StatusResponse) -> Vec<LogLine> {
        let mut out = Vec::new();
        for v in &update.vertexes {
            let next = self.vertices.len() + 1;
            let state = self
                .vertices
                .entry(v.digest.clone())
                .or_insert_with(|| VertexState { number: next, ..Default::default() });
            let n = state.number;
            if (v.started.is_some() || v.cached) && !state.started {
                state.started = true;
                out.push(LogLine { ts_ms: ms(&v.started).unwrap_or_else(now_ms), text: format!("#{n} {}", v.name) });
            }
            if (v.completed.is_some() || v.cached || !v.error.is_empty()) && !state.done {
                state.done = true;
                let ts = ms(&v.completed).unwrap_or_else(now_ms);
                if !state.partial.is_empty() {
                    let rest = String::from_utf8_lossy(&std::mem::take(&mut state.partial)).into_owned();
                    out.push(LogLine { ts_ms: ts, text: format!("#{n} {rest}") });
                }
                let text = if !v.error.is_empty() {
                    self.errors.push(format!("{}: {}", v.name, v.error));
                    format!("#{n} ERROR: {}", v.error)
                } else if v.cached {
                    format!("#{n} CACHED")
                } else {
                    match (ms(&v.started), ms(&v.completed)) {
                        (Some(a), Some(b)) => format!("#{n} DONE {:.1}s", (b - a) as f64 / 1000.0),
                        _ => format!("#{n} DONE"),
                    }
                };
                out.push(LogLine { ts_ms: ts, text });
            }
        }
        for s in &update.statuses {
            if s.completed.is_some() && !s.id.is_empty() {
                let n = self.vertices.get(&s.vertex).map(|v| v.number).unwrap_or(0);
                let size = if s.total > 0 { format!(" {}/{}", s.current, s.total) } else { String::new() };
                out.push(LogLine {
                    ts_ms: ms(&s.completed).unwrap_or_else(now_ms),
                    text: format!("#{n} {}{size} done", s.id),
                });
            }
        }
        for l in &update.logs {
            let next = self.vertices.len() + 1;
            let state = self
                .vertices
                .entry(l.vertex.clone())
                .or_insert_with(|| VertexState { number: next, ..Default::default() });
            let ts = ms(&l.timestamp).unwrap_or_else(now_ms);
            state.partial.extend_from_slice(&l.msg);
            while let Some(i) = state.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = state.partial.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).trim_end_matches('\r').to_string();
                out.push(LogLine { ts_ms: ts, text: format!("#{} {text}", state.number) });
            }
        }
        out
    }

    /// What failed, from the vertices' errors (empty when none did).
    pub fn errors(&self) -> &[String] {
        &self.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buildkit::proto::control::{Vertex, VertexLog};

    fn ts(ms: i64) -> Option<crate::buildkit::proto::control::Timestamp> {
        Some(crate::buildkit::proto::control::Timestamp { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 })
    }

    #[test]
    fn vertices_and_their_output_become_numbered_lines_with_buildkits_times() {
        let mut p = Progress::default();
        let v = |started, completed, cached| Vertex {
            digest: "sha256:a".into(),
            name: "[2/3] RUN echo hi".into(),
            started,
            completed,
            cached,
            ..Default::default()
        };
        let lines = p.lines(&StatusResponse { vertexes: vec![v(ts(1000), None, false)], ..Default::default() });
        assert_eq!(lines, vec![LogLine { ts_ms: 1000, text: "#1 [2/3] RUN echo hi".into() }]);
        let log =
            |msg: &[u8], t| VertexLog { vertex: "sha256:a".into(), timestamp: ts(t), stream: 1, msg: msg.to_vec() };
        let lines =
            p.lines(&StatusResponse { logs: vec![log(b"hel", 1100), log(b"lo\nwor", 1200)], ..Default::default() });
        assert_eq!(lines, vec![LogLine { ts_ms: 1200, text: "#1 hello".into() }]);
        let lines = p.lines(&StatusResponse { vertexes: vec![v(ts(1000), ts(1500), false)], ..Default::default() });
        assert_eq!(lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["#1 wor", "#1 DONE 0.5s"]);
        assert_eq!(lines[1].ts_ms, 1500);
        let other =
            Vertex { digest: "sha256:b".into(), name: "[1/3] FROM base".into(), cached: true, ..Default::default() };
        let lines = p.lines(&StatusResponse { vertexes: vec![other], ..Default::default() });
        assert_eq!(lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["#2 [1/3] FROM base", "#2 CACHED"]);
        let failed = Vertex {
            digest: "sha256:c".into(),
            name: "RUN false".into(),
            started: ts(2000),
            completed: ts(2100),
            error: "exit code: 1".into(),
            ..Default::default()
        };
        let lines = p.lines(&StatusResponse { vertexes: vec![failed], ..Default::default() });
        assert_eq!(lines.last().unwrap().text, "#3 ERROR: exit code: 1");
        assert_eq!(p.errors(), ["RUN false: exit code: 1"]);
    }
}
