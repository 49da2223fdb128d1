//! What a venv build takes from the bundle itself, read from the bundle's `pyproject.toml`,
//! `uv.toml` and `uv.lock` files and the task's `pip_packages`.
//!
//! Venvs are cached and shared by every task whose key matches (see [`super::venv`]). A build
//! that installs only registry packages makes the same venv for every bundle with the same
//! project files, so those share it. A build that installs anything *from the bundle* — the
//! project itself (uv builds it with its build backend, running the bundle's code as root in the
//! build container), a path or workspace source, a local wheel directory or index, a `file:`
//! requirement — makes a venv that depends on the rest of the bundle too: sharing it by the
//! project files alone would let one job's code end up in another job's venv. Such venvs are
//! keyed by the bundle's sha256 as well.
//!
//! The reading is conservative: anything it cannot tell (a file that is not valid TOML, a
//! relative index) counts as installing from the bundle, which only costs sharing.

/// A file of the bundle that the build reads: its path in the bundle and its content.
pub struct ProjectFile<'a> {
    pub rel: &'a str,
    pub content: &'a [u8],
}

/// Why the build installs something from the bundle, or `None` when it installs only
/// registry packages.
pub fn installs_from_bundle(files: &[ProjectFile<'_>], pip_packages: &[String]) -> Option<String> {
    for f in files {
        let name = f.rel.rsplit('/').next().unwrap_or(f.rel);
        let Some(doc) = std::str::from_utf8(f.content).ok().and_then(|t| t.parse::<toml::Table>().ok()) else {
            return Some(format!("{} is not valid TOML", f.rel));
        };
        let why = match name {
            "pyproject.toml" => pyproject(&doc),
            "uv.toml" => uv_settings(&doc),
            "uv.lock" => lock(&doc),
            _ => None,
        };
        if let Some(why) = why {
            return Some(format!("{}: {why}", f.rel));
        }
    }
    pip_packages.iter().find(|p| !is_registry_requirement(p)).map(|p| format!("pip_packages has {p:?}"))
}

fn pyproject(doc: &toml::Table) -> Option<String> {
    let uv = doc.get("tool").and_then(|t| t.get("uv")).and_then(|u| u.as_table());
    // uv installs the project itself when it is a package: `tool.uv.package`, else whether it
    // declares a build system.
    let package =
        uv.and_then(|u| u.get("package")).and_then(|p| p.as_bool()).unwrap_or_else(|| doc.contains_key("build-system"));
    if package {
        return Some("the project is a package (a [build-system]): uv builds and installs it".into());
    }
    if let Some(sources) = uv.and_then(|u| u.get("sources")).and_then(|s| s.as_table()) {
        for (dep, source) in sources {
            let entries = match source {
                toml::Value::Array(list) => list.iter().collect(),
                one => vec![one],
            };
            if entries.iter().any(|e| e.get("path").is_some() || e.get("workspace").is_some()) {
                return Some(format!("{dep} comes from a path or workspace source"));
            }
        }
    }
    if let Some(why) = uv.and_then(uv_settings) {
        return Some(why);
    }
    file_url(&toml::Value::Table(doc.clone()))
}

/// uv's settings (`[tool.uv]`, or a `uv.toml`): indexes and wheel directories must be remote.
fn uv_settings(settings: &toml::Table) -> Option<String> {
    fn walk(key: &str, v: &toml::Value) -> Option<String> {
        match v {
            toml::Value::String(s)
                if matches!(key, "find-links" | "index-url" | "extra-index-url" | "url")
                    && !(s.starts_with("https://") || s.starts_with("http://")) =>
            {
                Some(format!("{key} = {s:?} is not an http(s) URL"))
            }
            toml::Value::Array(list) => list.iter().find_map(|x| walk(key, x)),
            toml::Value::Table(t) => t.iter().find_map(|(k, x)| walk(k, x)),
            _ => None,
        }
    }
    settings.iter().find_map(|(k, v)| walk(k, v)).or_else(|| file_url(&toml::Value::Table(settings.clone())))
}

/// A lock whose packages come from the bundle (an editable, directory or path source; the
/// root of a project that is not a package is `virtual`).
fn lock(doc: &toml::Table) -> Option<String> {
    let packages = doc.get("package").and_then(|p| p.as_array())?;
    packages.iter().find_map(|p| {
        let source = p.get("source")?.as_table()?;
        ["editable", "directory", "path"].iter().find(|k| source.contains_key(**k)).map(|k| {
            let name = p.get("name").and_then(|n| n.as_str()).unwrap_or("a package");
            format!("{name} is locked from a local {k} source")
        })
    })
}

/// A `file:` URL anywhere (a requirement, an index).
fn file_url(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) if s.contains("file:") => Some(format!("{s:?} names a local file")),
        toml::Value::Array(list) => list.iter().find_map(file_url),
        toml::Value::Table(t) => t.values().find_map(file_url),
        _ => None,
    }
}

/// A requirement uv resolves from an index or a remote URL (`six`, `numpy>=2`,
/// `pkg @ https://…`), not an option (`-e .`, `-r file`) or a local path.
fn is_registry_requirement(p: &str) -> bool {
    let p = p.trim();
    !(p.starts_with(['-', '.', '/', '~']) || p.contains("file:") || (p.contains('/') && !p.contains("://")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(files: &[(&str, &str)], pip: &[&str]) -> Option<String> {
        let files: Vec<ProjectFile<'_>> =
            files.iter().map(|(rel, text)| ProjectFile { rel, content: text.as_bytes() }).collect();
        installs_from_bundle(&files, &pip.iter().map(|p| p.to_string()).collect::<Vec<_>>())
    }

    const APP: &str = "[project]\nname = \"app\"\nversion = \"1\"\ndependencies = [\"six\", \"numpy>=2\"]\n\
                       [dependency-groups]\ndev = [\"pytest\"]\n\
                       [tool.uv]\nindex-url = \"https://pypi.example/simple\"\n\
                       [tool.uv.sources]\nnumpy = { git = \"https://github.com/numpy/numpy\" }\n";

    #[test]
    fn registry_dependencies_alone_take_nothing_from_the_bundle() {
        assert_eq!(why(&[("pyproject.toml", APP)], &["six", "torch==2.5", "x @ https://h/x.whl"]), None);
        let lock = "version = 1\n[[package]]\nname = \"app\"\nversion = \"1\"\nsource = { virtual = \".\" }\n\
                    [[package]]\nname = \"six\"\nversion = \"1.16.0\"\nsource = { registry = \"https://pypi.org/simple\" }\n";
        assert_eq!(why(&[("pyproject.toml", APP), ("uv.lock", lock)], &[]), None);
        assert_eq!(why(&[("uv.toml", "[pip]\nextra-index-url = [\"https://x/simple\"]\n")], &[]), None);
        assert_eq!(why(&[], &[]), None);
    }

    /// Project files, pip_packages, and what the reason must mention.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);

    #[test]
    fn anything_installed_from_the_bundle_is_seen() {
        let cases: &[Case<'_>] = &[
            (
                &[("pyproject.toml", "[project]\nname = \"p\"\n[build-system]\nrequires = [\"flit_core\"]\n")],
                &[],
                "package",
            ),
            (&[("pyproject.toml", "[project]\nname = \"p\"\n[tool.uv]\npackage = true\n")], &[], "package"),
            (
                &[("pkgs/m/pyproject.toml", "[build-system]\nrequires = [\"hatchling\"]\n")],
                &[],
                "pkgs/m/pyproject.toml",
            ),
            (
                &[("pyproject.toml", "[tool.uv.sources]\ndep = { path = \"dep\", editable = false }\n")],
                &[],
                "dep comes",
            ),
            (&[("pyproject.toml", "[tool.uv.sources]\nm = { workspace = true }\n")], &[], "m comes"),
            (
                &[(
                    "pyproject.toml",
                    "[tool.uv.sources]\nm = [{ path = \"a\", marker = \"sys_platform == 'linux'\" }]\n",
                )],
                &[],
                "m comes",
            ),
            (&[("pyproject.toml", "[project]\ndependencies = [\"d @ file:///app/d\"]\n")], &[], "local file"),
            (&[("pyproject.toml", "[tool.uv]\nfind-links = [\"wheels\"]\n")], &[], "find-links"),
            (&[("pyproject.toml", "[[tool.uv.index]]\nname = \"l\"\nurl = \"./idx\"\n")], &[], "url"),
            (&[("uv.toml", "find-links = [\"./wheels\"]\n")], &[], "find-links"),
            (&[("uv.toml", "[pip]\nindex-url = \"/srv/index\"\n")], &[], "index-url"),
            (&[("uv.lock", "[[package]]\nname = \"d\"\nsource = { editable = \"d\" }\n")], &[], "editable"),
            (&[("pyproject.toml", "not = [toml")], &[], "not valid TOML"),
            (&[], &["-e", "."], "\"-e\""),
            (&[], &["./dist/x.whl"], "./dist"),
            (&[], &["wheels/x.whl"], "wheels/x.whl"),
            (&[], &["/app/x"], "/app/x"),
        ];
        for (files, pip, expected) in cases {
            let got = why(files, pip).unwrap_or_else(|| panic!("{files:?} {pip:?}: nothing from the bundle?"));
            assert!(got.contains(expected), "{files:?} {pip:?}: {got}");
        }
    }
}
