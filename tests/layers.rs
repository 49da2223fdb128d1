//! Which way arrows point (#15): every `crate::` and `super::` path in src/ checked against the
//! layer order written in docs/ARCHITECTURE.md ("Which way arrows point", its fenced `layers`
//! block), so the document and the code cannot disagree.
//!
//! Fails, naming file:line, for a path from one top-level module to another that is not
//! allowed (up, or sideways to the right on the same line), for a module the document places in
//! no layer, and for a cycle between top-level modules or
//! between sibling files of one module. Comments and string literals are not code, and
//! `#[cfg(test)]` modules are not the library's structure (a module's tests may set up with
//! what they need): both are skipped. No root, no build of the crate: it reads the sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Arrows that break the rules today, each with who removes it (none now). The test fails when
/// one of them is gone too, so the list only shrinks.
const KNOWN: &[(&str, &str, &str)] = &[];

/// Modules whose sibling files still use each other in a circle, each with who removes it. The
/// test fails when one of them has none left too.
const KNOWN_SIBLING_CYCLES: &[(&str, &str)] = &[];

#[derive(Debug)]
struct Rules {
    /// Top-level module → (layer index, position on its line, layer name).
    rank: BTreeMap<String, (usize, usize, String)>,
}

fn parse_rules(doc: &str) -> Rules {
    let start = doc.find("```layers\n").expect("docs/ARCHITECTURE.md has no ```layers block");
    let body = &doc[start + "```layers\n".len()..];
    let body = &body[..body.find("```").expect("the ```layers block is not closed")];
    let mut rank = BTreeMap::new();
    let mut layer = 0;
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, mods) = line.split_once(':').unwrap_or_else(|| panic!("layers block: no ':' in {line:?}"));
        let mods: Vec<String> = mods.split_whitespace().map(str::to_string).collect();
        for (pos, m) in mods.into_iter().enumerate() {
            let before = rank.insert(m.clone(), (layer, pos, head.trim().to_string()));
            assert!(before.is_none(), "layers block: {m} is in two layers");
        }
        layer += 1;
    }
    Rules { rank }
}

/// `text` with comments and the insides of string and char literals blanked (newlines kept,
/// so line numbers hold).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let blank = |out: &mut String, s: &[u8]| {
        for &c in s {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0, 0);
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j]);
            i += j;
        } else if let Some(hashes) = raw_string_start(b, i) {
            // r"..." or r#"..."#: ends at '"' followed by as many '#'.
            let open = rest.iter().position(|&c| c == b'"').unwrap_or(0) + 1;
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let end = rest[open..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| open + p + close.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): only the former is skipped.
            let len = if rest.get(1) == Some(&b'\\') {
                rest.get(3..).and_then(|r| r.iter().position(|&c| c == b'\'')).map_or(1, |p| p + 4)
            } else {
                match text[i + 1..].chars().next() {
                    Some(c) if rest.get(1 + c.len_utf8()) == Some(&b'\'') => c.len_utf8() + 2,
                    _ => 1,
                }
            };
            blank(&mut out, &rest[..len]);
            i += len;
        } else {
            let c = text[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The number of '#' of a raw string starting at `i` (`r"`, `r#"`, `br"`), if one does.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let mut j = i;
    if b.get(j) == Some(&b'b') {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    (b.get(j + hashes) == Some(&b'"')).then_some(hashes)
}

/// One path found in a file: the module path it names (as far as the names are modules), and
/// its line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Use {
    target: Vec<String>,
    line: usize,
}

fn ident_at(s: &[u8], mut i: usize) -> (String, usize) {
    let start = i;
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
        i += 1;
    }
    (String::from_utf8_lossy(&s[start..i]).into_owned(), i)
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The paths after a `prefix` (a module path) starting at `i` in `s`: `a::b::c` or a group
/// `{a::b, c::{d, e}, self}`, each as the list of its segments.
fn paths_at(s: &[u8], i: usize, prefix: &[String], out: &mut Vec<(Vec<String>, usize)>) -> usize {
    let i = skip_ws(s, i);
    if s.get(i) == Some(&b'{') {
        let mut j = i + 1;
        loop {
            j = skip_ws(s, j);
            match s.get(j) {
                None => return j,
                Some(b'}') => return j + 1,
                Some(b',') => j += 1,
                _ => {
                    let before = j;
                    j = paths_at(s, j, prefix, out);
                    if j == before {
                        j += 1;
                    }
                }
            }
        }
    }
    let (name, j) = ident_at(s, i);
    if name.is_empty() {
        return i;
    }
    let mut path = prefix.to_vec();
    if name != "self" {
        path.push(name);
    }
    if s[j..].starts_with(b"::") {
        return paths_at(s, j + 2, &path, out);
    }
    out.push((path, i));
    j
}

/// Every `crate::` and `super::` path of a file whose module path is `module` (`["cgroup",
/// "layout"]` for src/cgroup/layout.rs), resolved to absolute paths; inline `mod x { }` blocks
/// count for `super::`.
fn uses_of(code: &str, module: &[String]) -> Vec<Use> {
    let s = code.as_bytes();
    let line_of = |at: usize| code[..at].bytes().filter(|&c| c == b'\n').count() + 1;
    let mut found = Vec::new();
    // Inline modules open at a brace depth: (name, depth, whether it is `#[cfg(test)]`).
    let mut inline: Vec<(String, usize, bool)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let boundary = i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_' || s[i - 1] == b':');
        if c == b'{' {
            depth += 1;
            i += 1;
        } else if c == b'}' {
            depth = depth.saturating_sub(1);
            if inline.last().is_some_and(|(_, d, _)| *d == depth) {
                inline.pop();
            }
            i += 1;
        } else if boundary && s[i..].starts_with(b"mod ") {
            let (name, j) = ident_at(s, skip_ws(s, i + 4));
            let k = skip_ws(s, j);
            if s.get(k) == Some(&b'{') {
                inline.push((name, depth, code[..i].trim_end().ends_with("#[cfg(test)]")));
            }
            i = j.max(i + 1);
        } else if boundary && (s[i..].starts_with(b"crate::") || s[i..].starts_with(b"super::")) {
            let mut here: Vec<String> = module.to_vec();
            here.extend(inline.iter().map(|(n, _, _)| n.clone()));
            let in_test = inline.iter().any(|(_, _, test)| *test);
            let mut j = i;
            let base: Vec<String> = if s[j..].starts_with(b"crate::") {
                j += "crate::".len();
                Vec::new()
            } else {
                while s[j..].starts_with(b"super::") {
                    here.pop();
                    j += "super::".len();
                }
                here
            };
            let mut paths = Vec::new();
            let end = paths_at(s, j, &base, &mut paths);
            if !in_test {
                for (target, at) in paths {
                    found.push(Use { target, line: line_of(at) });
                }
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    found
}

/// The modules a file declares `#[cfg(test)] mod name;` (in a file of their own).
fn test_only_children(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("#[cfg(test)]") {
        let rest = code[at + "#[cfg(test)]".len()..].trim_start();
        let rest = rest.strip_prefix("pub(crate) ").or_else(|| rest.strip_prefix("pub ")).unwrap_or(rest);
        let Some(rest) = rest.strip_prefix("mod ") else { continue };
        let (name, after) = ident_at(rest.as_bytes(), 0);
        if rest[after..].trim_start().starts_with(';') {
            out.push(name);
        }
    }
    out
}

/// The module path of a source file: src/a/b.rs → [a, b]; src/a/mod.rs → [a].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("a file name");
    if last != "mod.rs" {
        parts.push(last.trim_end_matches(".rs").to_string());
    }
    parts
}

/// The longest prefix of `path` that names modules with a file of their own.
fn as_module(src: &Path, path: &[String]) -> Vec<String> {
    let mut dir = src.to_path_buf();
    let mut out = Vec::new();
    for seg in path {
        let file = dir.join(format!("{seg}.rs"));
        let sub = dir.join(seg);
        if file.is_file() || sub.join("mod.rs").is_file() {
            out.push(seg.clone());
            dir = sub;
        } else {
            break;
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("reading src").flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// An arrow between two modules of one parent, with where it is.
#[derive(Debug, Clone)]
struct Arrow {
    parent: Vec<String>,
    from: String,
    to: String,
    at: String,
}

fn arrows(root: &Path) -> Vec<Arrow> {
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let code: Vec<(Vec<String>, PathBuf, String)> = files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("reading a source file");
            (module_of(&src, &f), f, code_only(&text))
        })
        .collect();
    let mut tests_only: Vec<Vec<String>> = Vec::new();
    for (module, _, code) in &code {
        for child in test_only_children(code) {
            tests_only.push(module.iter().cloned().chain([child]).collect());
        }
    }
    let mut out = Vec::new();
    for (module, file, code) in &code {
        if module.is_empty()
            || *module == ["lib"]
            || *module == ["main"]
            || tests_only.iter().any(|t| module.starts_with(t))
        {
            continue;
        }
        for u in uses_of(code, module) {
            let target = as_module(&src, &u.target);
            let common = module.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if common < module.len() && common < target.len() {
                let at = format!("{}:{}", file.strip_prefix(root).unwrap_or(file).display(), u.line);
                out.push(Arrow {
                    parent: module[..common].to_vec(),
                    from: module[common].clone(),
                    to: target[common].clone(),
                    at,
                });
            }
        }
    }
    out
}

/// Cycles in the graph of `arrows` (all of one parent): each as the arrows around it.
fn cycles(arrows: &[&Arrow]) -> Vec<Vec<Arrow>> {
    let mut next: BTreeMap<&str, BTreeMap<&str, &Arrow>> = BTreeMap::new();
    for a in arrows {
        next.entry(&a.from).or_default().entry(&a.to).or_insert(a);
    }
    // Depth-first search from every node, reporting each cycle once (by its smallest node).
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut out = Vec::new();
    for &startnode in next.keys() {
        let mut stack: Vec<(&str, Vec<&Arrow>)> = vec![(startnode, Vec::new())];
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for (&to, &arrow) in next.get(node).into_iter().flatten() {
                let mut p = path.clone();
                p.push(arrow);
                if to == startnode {
                    let mut names: Vec<String> = p.iter().map(|a| a.from.clone()).collect();
                    names.sort();
                    if found.insert(names) {
                        out.push(p.into_iter().cloned().collect());
                    }
                } else if to > startnode && seen.insert(to) {
                    stack.push((to, p));
                }
            }
        }
    }
    out
}

fn top_level_modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .expect("reading src")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                Some(name)
            } else {
                name.strip_suffix(".rs").filter(|n| *n != "lib" && *n != "main").map(str::to_string)
            }
        })
        .collect()
}

/// What is wrong with the arrows of `root`'s sources under `rules`, one line each.
fn check(root: &Path, rules: &Rules) -> Vec<String> {
    let mut problems = Vec::new();
    for m in top_level_modules(&root.join("src")) {
        if !rules.rank.contains_key(&m) {
            problems.push(format!("src/{m}: in no layer of docs/ARCHITECTURE.md's ```layers block"));
        }
    }
    let all = arrows(root);
    let mut known_seen = BTreeSet::new();
    for a in all.iter().filter(|a| a.parent.is_empty()) {
        let known = KNOWN.iter().any(|(f, t, _)| *f == a.from && *t == a.to);
        if known {
            known_seen.insert((a.from.clone(), a.to.clone()));
            continue;
        }
        let (Some(from), Some(to)) = (rules.rank.get(&a.from), rules.rank.get(&a.to)) else { continue };
        if (to.0, to.1) > (from.0, from.1) {
            let how = if to.0 == from.0 { "sideways, to the right on its line" } else { "up" };
            problems.push(format!(
                "{}: {} → {} points {how} ({} is in layer \"{}\", {} in \"{}\")",
                a.at, a.from, a.to, a.from, from.2, a.to, to.2
            ));
        }
    }
    for (f, t, why) in KNOWN {
        if !known_seen.contains(&(f.to_string(), t.to_string())) {
            problems.push(format!("the known exception {f} → {t} ({why}) is gone: remove it from KNOWN"));
        }
    }
    let mut parents: BTreeMap<&Vec<String>, Vec<&Arrow>> = BTreeMap::new();
    for a in &all {
        parents.entry(&a.parent).or_default().push(a);
    }
    for (parent, arrows) in parents {
        let known = KNOWN_SIBLING_CYCLES.iter().find(|(m, _)| parent.len() == 1 && parent[0] == *m);
        let found = cycles(&arrows);
        if let Some((m, who)) = known {
            if found.is_empty() {
                problems.push(format!("src/{m} has no cycle left ({who}): remove it from KNOWN_SIBLING_CYCLES"));
            }
            continue;
        }
        for cycle in found {
            let within =
                if parent.is_empty() { "top-level modules".to_string() } else { format!("src/{}", parent.join("/")) };
            let steps: Vec<String> = cycle.iter().map(|a| format!("{} → {} ({})", a.from, a.to, a.at)).collect();
            problems.push(format!("a cycle between {within}: {}", steps.join(", ")));
        }
    }
    problems
}

#[test]
fn arrows_point_down_the_layers_of_docs_architecture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("reading docs/ARCHITECTURE.md");
    let problems = check(root, &parse_rules(&doc));
    assert!(
        problems.is_empty(),
        "arrows against docs/ARCHITECTURE.md (\"Which way arrows point\"):\n{}",
        problems.join("\n")
    );
}

/// The checker itself, on a small tree of its own: it finds what it must and nothing else.
#[test]
fn the_check_sees_up_arrows_sideways_arrows_and_sibling_cycles() {
    let dir = std::env::temp_dir().join(format!("iris-worker-layers-{}", std::process::id()));
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("src/lib.rs", "pub mod low; pub mod mid; pub mod high; pub mod side; pub mod util;");
    write("src/util.rs", "");
    write("src/low/mod.rs", "mod a; mod b;\n// crate::high in a comment\nconst S: &str = \"crate::high\";\n");
    write("src/low/a.rs", "use super::b::X;\n");
    write("src/low/b.rs", "pub struct X;\nfn f() { super::a::g() }\n");
    write("src/mid.rs", "use crate::{low::a, util};\nfn f<'a>(c: char) -> bool { c == '{' }\n");
    write(
        "src/high.rs",
        "use crate::mid;\nmod inner {\n    use super::super::side::Y;\n}\n#[cfg(test)]\nmod tests {\n    use crate::side;\n}\n#[cfg(test)]\nmod more;\n",
    );
    write("src/high/more.rs", "use crate::side::Z;\n");
    write("src/side.rs", "pub fn f() {\n    crate::high::g();\n}\n");
    let rules = parse_rules("```layers\n# lowest first\nbase: util low\nmiddle: mid\ntop: high side\n```\n");
    let problems = check(&dir, &rules);
    std::fs::remove_dir_all(&dir).unwrap();
    let has = |s: &str| problems.iter().any(|p| p.contains(s));
    assert!(has("src/high.rs:3: high → side points sideways"), "{problems:#?}");
    assert!(!has("side → high points"), "{problems:#?}");
    assert!(
        !has("src/high.rs:7") && !has("src/high.rs:10") && !has("src/high/more.rs"),
        "test modules count: {problems:#?}"
    );
    assert!(
        has("a cycle between top-level modules: high → side (src/high.rs:3), side → high (src/side.rs:2)"),
        "{problems:#?}"
    );
    assert!(has("a cycle between src/low: a → b (src/low/a.rs:1), b → a (src/low/b.rs:2)"), "{problems:#?}");
    // Not the comment, not the string, not the char '{', not util (left of low on its line).
    assert!(!has("low → high") && !has("low → util"), "{problems:#?}");
    let unexpected: Vec<_> = problems.iter().filter(|p| !p.contains("high → side") && !p.contains("a cycle")).collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
}
