//! The layout as a test: the request path reads top to bottom, so each layer
//! of `src/` imports only the layers below it, and no two files import each
//! other, however indirectly:
//!
//! `lib → app → proxy → session → allocator → auth → net → telemetry →
//! {config, metrics, body} → util` (`demo`, the stand-in pods, sits on top).
//!
//! Read from the source itself: every `crate::` and `super::` path of a file
//! (in `use` lines and in code), resolved to the file of the module it names.
//! Not counted: comments; a module naming its own children (declaring and
//! re-exporting them is structure, not use); the test-only code at a file's
//! end (from its first `#[cfg(test)]`), which may use anything. Only the
//! standard library is used, so this file also builds on its own against
//! another tree: `CARGO_MANIFEST_DIR=<tree> rustc --test tests/layout.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first. A module may import only modules on a later line.
const LAYERS: &[&[&str]] = &[
    &["demo"],
    &["lib"],
    &["app"],
    &["proxy"],
    &["session"],
    &["allocator"],
    &["auth"],
    &["net"],
    &["telemetry"],
    &["config", "metrics", "body"],
    &["util"],
];

/// A file of `src/` and the module path it holds (`[]` for `lib.rs`).
struct File {
    path: String,
    module: Vec<String>,
    code: String,
}

fn src_files() -> Vec<File> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    collect(&root, &mut paths);
    paths
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "main.rs"))
        .map(|p| {
            let relative = p.strip_prefix(&root).unwrap().with_extension("");
            let mut module: Vec<String> = relative.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|m| m == "mod" || m == "lib") {
                module.pop();
            }
            let text = std::fs::read_to_string(&p).unwrap();
            File {
                path: format!("src/{}", p.strip_prefix(&root).unwrap().display()),
                module,
                code: code_of(&text),
            }
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code without comments and without its test-only end.
fn code_of(text: &str) -> String {
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path the code names from `crate`, `super` or `self`, absolute,
/// with `use` groups (`a::{b, c::d}`) spread out.
fn named_paths(file: &File) -> Vec<Vec<String>> {
    let code = &file.code;
    let mut paths = Vec::new();
    let mut at = 0;
    while let Some(found) = ["crate::", "super::", "self::"]
        .iter()
        .filter_map(|start| code[at..].find(start).map(|i| at + i))
        .min()
    {
        let before = code[..found].chars().next_back();
        let end = path_end(code, found);
        at = end.max(found + 1);
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        for relative in spread(&code[found..end]) {
            if let Some(path) = absolute(&file.module, &relative) {
                paths.push(path);
            }
        }
    }
    paths
}

/// Where a path starting at `from` ends: after its last segment, or after
/// its `{…}` group.
fn path_end(code: &str, from: usize) -> usize {
    let bytes = code.as_bytes();
    let mut i = from;
    let mut depth = 0usize;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'{' => depth += 1,
            b'}' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ if depth > 0 => {}
            b':' => {}
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'*' => {}
            _ => return i,
        }
        i += 1;
    }
    i
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`, each split into
/// segments (`self` inside a group names the group's own path).
fn spread(tree: &str) -> Vec<Vec<String>> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![segments(&tree)];
    };
    let prefix = segments(tree[..open].trim_end_matches("::"));
    let inner = &tree[open + 1..tree.len() - 1];
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    let mut parts = Vec::new();
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    for part in parts.into_iter().filter(|p| !p.is_empty()) {
        for rest in spread(part) {
            let mut path = prefix.clone();
            path.extend(rest.into_iter().filter(|s| s != "self"));
            out.push(path);
        }
    }
    out
}

fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(|s| s.split(" as ").next().unwrap_or(s).to_string())
        .filter(|s| !s.is_empty() && s != "*")
        .collect()
}

/// The path from the crate root, for a path written in `module`.
fn absolute(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut segments = path.iter().peekable();
    let mut base: Vec<String> = match segments.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segments.next();
            Vec::new()
        }
        Some("self") => {
            segments.next();
            module.to_vec()
        }
        Some("super") => {
            // In `a/b.rs` and `a/b/mod.rs` alike (module `a::b`), `super` is `a`.
            let mut base = module.to_vec();
            while segments.peek().is_some_and(|s| *s == "super") {
                segments.next();
                base.pop()?;
            }
            base
        }
        _ => return None,
    };
    base.extend(segments.cloned());
    Some(base)
}

/// Each file and the files it imports, by path.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let files = src_files();
    let by_module: BTreeMap<Vec<String>, String> = files.iter().map(|f| (f.module.clone(), f.path.clone())).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let mut targets = BTreeSet::new();
        for path in named_paths(file) {
            // The longest prefix that is a module of its own file.
            let Some(target) = (0..=path.len()).rev().find_map(|n| by_module.get(&path[..n])) else {
                continue;
            };
            let target_module = &files.iter().find(|f| &f.path == target).unwrap().module;
            let own_child = target_module.starts_with(&file.module);
            if !own_child {
                targets.insert(target.clone());
            }
        }
        graph.insert(file.path.clone(), targets);
    }
    graph
}

/// `src/app/routes.rs` → `app`; `src/lib.rs` → `lib`.
fn top_module(path: &str) -> String {
    let rest = path.trim_start_matches("src/");
    let first = rest.split('/').next().unwrap();
    first.trim_end_matches(".rs").to_string()
}

/// Every circle of `graph`, each as the names along it, first repeated last.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut seen_in_circle = BTreeSet::new();
    for start in graph.keys() {
        // The shortest way back to `start`, breadth first.
        let mut previous: BTreeMap<&String, &String> = BTreeMap::new();
        let mut frontier = vec![start];
        let mut closing = None;
        'search: while !frontier.is_empty() {
            let mut next = Vec::new();
            for node in frontier {
                for target in graph.get(node).into_iter().flatten() {
                    if target == start {
                        closing = Some(node);
                        break 'search;
                    }
                    if !previous.contains_key(target) {
                        previous.insert(target, node);
                        next.push(target);
                    }
                }
            }
            frontier = next;
        }
        if let Some(mut node) = closing {
            let mut circle = vec![start.clone()];
            while node != start {
                circle.push(node.clone());
                node = previous[node];
            }
            circle.reverse();
            circle.insert(0, start.clone());
            let members: BTreeSet<String> = circle.iter().cloned().collect();
            if seen_in_circle.insert(members) {
                found.push(circle);
            }
        }
    }
    found
}

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("the module {module} is in no layer of LAYERS: give it its place"))
}

/// Every import from a file of the `from` module to one of the `to` modules.
fn reaches(from: &str, to: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (file, targets) in imports() {
        if top_module(&file) != from {
            continue;
        }
        for target in targets {
            if to.contains(&top_module(&target).as_str()) {
                found.push(format!("{file} -> {target}"));
            }
        }
    }
    found
}

#[test]
fn no_two_files_of_src_import_each_other_however_indirectly() {
    let circles = circles(&imports());
    assert!(
        circles.is_empty(),
        "import circles between files:\n{}",
        circles.iter().map(|c| c.join(" -> ")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn no_two_top_level_modules_import_each_other_however_indirectly() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, targets) in imports() {
        let from = top_module(&file);
        let entry = graph.entry(from.clone()).or_default();
        entry.extend(targets.iter().map(|t| top_module(t)).filter(|t| *t != from));
    }
    let circles = circles(&graph);
    assert!(
        circles.is_empty(),
        "import circles between modules:\n{}",
        circles.iter().map(|c| c.join(" -> ")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let mut upward = Vec::new();
    for (file, targets) in imports() {
        let from = top_module(&file);
        for target in targets {
            let to = top_module(&target);
            if to != from && layer_of(&to) <= layer_of(&from) {
                upward.push(format!("{file} -> {target}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not go down the layers:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_proxy_reaches_the_backends_only_through_the_allocator_trait() {
    let found: Vec<String> = imports()
        .into_iter()
        .filter(|(file, _)| top_module(file) == "proxy")
        .flat_map(|(file, targets)| targets.into_iter().map(move |t| format!("{file} -> {t}")))
        .filter(|edge| edge.contains("-> src/allocator/") && !edge.ends_with("-> src/allocator/mod.rs"))
        .collect();
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn auth_reaches_neither_the_sessions_nor_the_proxy_nor_the_allocator() {
    let found = reaches("auth", &["session", "proxy", "allocator"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_allocator_reaches_neither_the_proxy_nor_the_pages() {
    let found = reaches("allocator", &["proxy", "app", "pages"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn config_and_metrics_reach_nothing_of_ours_but_util() {
    for module in ["config", "metrics"] {
        let found: Vec<String> = imports()
            .into_iter()
            .filter(|(file, _)| top_module(file) == module)
            .flat_map(|(file, targets)| targets.into_iter().map(move |t| (file.clone(), t)))
            .filter(|(_, target)| top_module(target) != module && top_module(target) != "util")
            .map(|(file, target)| format!("{file} -> {target}"))
            .collect();
        assert!(found.is_empty(), "{found:#?}");
    }
}

#[test]
fn the_accept_loop_knows_no_handler_and_no_router_error() {
    let found = reaches("net", &["app", "proxy", "session", "allocator", "auth"]);
    assert!(found.is_empty(), "{found:#?}");
}
