//! The image config of a build's result. The `tar` exporter sends only the filesystem, so the
//! config comes from the solve response when BuildKit includes one there
//! (`containerimage.config`, base64 JSON), and otherwise from the Dockerfile itself: its final
//! stage's ENV, WORKDIR, ENTRYPOINT, CMD and USER, following `FROM <earlier stage>` back
//! through the stages. What a base *image* brings (its own ENV, CMD, …) is not known this way;
//! `FROM scratch` and images made by `docker import` bring nothing.

use std::collections::HashMap;

use serde::Deserialize;

/// The parts of an OCI image config a task uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub user: String,
}

impl ImageConfig {
    /// The config in an exporter response's `containerimage.config` (base64 of the image
    /// config JSON), if there is one.
    pub fn from_exporter_response(response: &HashMap<String, String>) -> Option<ImageConfig> {
        use base64::Engine;
        #[derive(Deserialize)]
        struct Image {
            config: Option<ImageConfig>,
        }
        let raw = response.get("containerimage.config")?;
        let json = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
        serde_json::from_slice::<Image>(&json).ok()?.config
    }

    /// The final stage's config of `dockerfile`, with `build_args` for `${NAME}` in values.
    pub fn from_dockerfile(dockerfile: &str, build_args: &HashMap<String, String>) -> ImageConfig {
        let mut stages: Vec<(Option<String>, ImageConfig)> = Vec::new();
        let mut global_args: HashMap<String, String> = HashMap::new();
        let mut args: HashMap<String, String> = HashMap::new();
        let mut cmd_inherited = false;
        for (keyword, rest) in instructions(dockerfile) {
            let vars = |cfg: &ImageConfig, args: &HashMap<String, String>| {
                let mut vars = args.clone();
                for e in &cfg.env {
                    if let Some((k, v)) = e.split_once('=') {
                        vars.insert(k.to_string(), v.to_string());
                    }
                }
                vars
            };
            if keyword == "FROM" {
                let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                let base = words.first().copied().unwrap_or("scratch").to_string();
                let name = match (words.get(1), words.get(2)) {
                    (Some(a), Some(n)) if a.eq_ignore_ascii_case("as") => Some(n.to_ascii_lowercase()),
                    _ => None,
                };
                let inherited = stages
                    .iter()
                    .rev()
                    .find(|(n, _)| n.as_deref() == Some(&base.to_ascii_lowercase()))
                    .map(|(_, c)| c.clone());
                cmd_inherited = inherited.as_ref().is_some_and(|c| c.cmd.is_some());
                stages.push((name, inherited.unwrap_or_default()));
                args = global_args.clone();
                continue;
            }
            let Some((_, cfg)) = stages.last_mut() else {
                if keyword == "ARG" {
                    arg(&rest, build_args, &mut global_args);
                }
                continue;
            };
            match keyword.as_str() {
                "ARG" => arg(&rest, build_args, &mut args),
                "ENV" => {
                    let vars = vars(cfg, &args);
                    for (k, v) in key_values(&rest) {
                        let v = expand(&v, &vars);
                        cfg.env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
                        cfg.env.push(format!("{k}={v}"));
                    }
                }
                "WORKDIR" => {
                    let dir = expand(rest.trim(), &vars(cfg, &args));
                    cfg.working_dir = if dir.starts_with('/') {
                        dir
                    } else {
                        format!(
                            "{}/{dir}",
                            if cfg.working_dir.is_empty() { "" } else { cfg.working_dir.trim_end_matches('/') }
                        )
                    };
                }
                "USER" => cfg.user = expand(rest.trim(), &vars(cfg, &args)),
                "CMD" => {
                    cfg.cmd = Some(command(&rest));
                    cmd_inherited = false;
                }
                "ENTRYPOINT" => {
                    cfg.entrypoint = Some(command(&rest));
                    // Docker: a new ENTRYPOINT drops a CMD that came from the base stage.
                    if cmd_inherited {
                        cfg.cmd = None;
                        cmd_inherited = false;
                    }
                }
                _ => {}
            }
        }
        stages.pop().map(|(_, c)| c).unwrap_or_default()
    }

    /// The argv the image would run with no command given.
    pub fn default_argv(&self) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        argv
    }
}

fn arg(rest: &str, build_args: &HashMap<String, String>, into: &mut HashMap<String, String>) {
    let rest = rest.trim();
    let (name, default) = match rest.split_once('=') {
        Some((k, v)) => (k.trim(), Some(unquote(v.trim()))),
        None => (rest, None),
    };
    if let Some(v) = build_args.get(name).cloned().or(default) {
        into.insert(name.to_string(), v);
    }
}

/// The Dockerfile's instructions: keyword (upper case) and the rest, continuation lines joined,
/// comments and parser directives dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let full = full.trim();
        if full.is_empty() {
            continue;
        }
        let (kw, rest) = full.split_once(char::is_whitespace).unwrap_or((full, ""));
        out.push((kw.to_ascii_uppercase(), rest.trim().to_string()));
    }
    out
}

/// `ENV K=V K2="a b"` or the legacy `ENV K V W`.
fn key_values(rest: &str) -> Vec<(String, String)> {
    let rest = rest.trim();
    let first = rest.split_whitespace().next().unwrap_or("");
    if !first.contains('=') {
        let (k, v) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        return vec![(k.to_string(), v.trim().to_string())];
    }
    words(rest).into_iter().filter_map(|w| w.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
}

/// Splits on whitespace outside quotes, removing the quotes and backslash escapes.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    let mut any = false;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (q, '\\') if q != Some('\'') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() || any {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (_, c) => cur.push(c),
        }
    }
    if !cur.is_empty() || any {
        out.push(cur);
    }
    out
}

fn unquote(s: &str) -> String {
    words(s).join(" ")
}

/// The exec form (`["a", "b"]`) as is; the shell form wrapped in `/bin/sh -c`.
fn command(rest: &str) -> Vec<String> {
    let rest = rest.trim();
    if rest.starts_with('[')
        && let Ok(v) = serde_json::from_str::<Vec<String>>(rest)
    {
        return v;
    }
    vec!["/bin/sh".into(), "-c".into(), rest.to_string()]
}

/// `$NAME` and `${NAME}` from `vars` (unknown ones become empty, as in Docker).
fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        if b[i] == '\\' && i + 1 < b.len() && b[i + 1] == '$' {
            out.push('$');
            i += 2;
            continue;
        }
        if b[i] == '$' && i + 1 < b.len() {
            let (name, next) = if b[i + 1] == '{' {
                match b[i + 2..].iter().position(|&c| c == '}') {
                    Some(end) => (b[i + 2..i + 2 + end].iter().collect::<String>(), i + 3 + end),
                    None => (String::new(), i + 1),
                }
            } else {
                let len = b[i + 1..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == '_').count();
                (b[i + 1..i + 1 + len].iter().collect(), i + 1 + len)
            };
            if !name.is_empty() {
                let name = name.split(":-").next().unwrap_or_default();
                out.push_str(vars.get(name).map(String::as_str).unwrap_or(""));
                i = next;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_stage_gives_env_workdir_user_and_command() {
        let df = r#"
# syntax is ignored
ARG BASE=busybox
FROM $BASE AS builder
ENV BUILDER=1
CMD ["from-builder"]

from builder
ARG VERSION=1.0
ENV APP_HOME=/srv/app \
    GREETING="hello world" VERSION=${VERSION}
ENV LEGACY some value
WORKDIR $APP_HOME
WORKDIR sub
USER 1000:1000
ENTRYPOINT ["/bin/run", "--flag"]
"#;
        let args = HashMap::from([("VERSION".to_string(), "2.5".to_string())]);
        let c = ImageConfig::from_dockerfile(df, &args);
        assert_eq!(
            c.env,
            ["BUILDER=1", "APP_HOME=/srv/app", "GREETING=hello world", "VERSION=2.5", "LEGACY=some value"]
        );
        assert_eq!(c.working_dir, "/srv/app/sub");
        assert_eq!(c.user, "1000:1000");
        assert_eq!(c.entrypoint, Some(vec!["/bin/run".to_string(), "--flag".into()]));
        // The builder stage's CMD is dropped by the new ENTRYPOINT.
        assert_eq!(c.cmd, None);
        let shell = ImageConfig::from_dockerfile("FROM scratch\nCMD echo hi\n", &HashMap::new());
        assert_eq!(shell.default_argv(), ["/bin/sh", "-c", "echo hi"]);
    }

    #[test]
    fn an_exporter_response_config_is_read() {
        use base64::Engine;
        let json = r#"{"architecture":"amd64","config":{"Env":["A=1"],"WorkingDir":"/w","Cmd":["sh"]}}"#;
        let resp = HashMap::from([(
            "containerimage.config".to_string(),
            base64::engine::general_purpose::STANDARD.encode(json),
        )]);
        let c = ImageConfig::from_exporter_response(&resp).unwrap();
        assert_eq!(c.env, ["A=1"]);
        assert_eq!(c.working_dir, "/w");
        assert_eq!(c.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(ImageConfig::from_exporter_response(&HashMap::new()), None);
    }
}
