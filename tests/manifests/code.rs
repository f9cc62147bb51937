//! The Kubernetes API calls session-router makes, read from its source, so
//! that the Role can be checked against the code rather than against a list
//! someone has to remember to update.
//!
//! Every `kube::Api<T>` value the code holds is found (fields, bindings,
//! parameters), then every method called on it and every `watcher(...)` fed
//! with it; a method maps to an RBAC verb, `T` to its API group and resource
//! through its own `kube::Resource` impl. A method or a type this module does
//! not know fails the test instead of being skipped, and so does Kubernetes
//! API use outside [`KUBE_DIRS`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use session_router::allocator::agones::types::{GameServer, GameServerAllocation};

/// (API group, resource, verb).
pub type Permission = (String, String, String);

/// Where the code that calls Kubernetes lives: the Agones backends, and the
/// `shared` kind's EndpointSlice watch.
pub const KUBE_DIRS: [&str; 2] = ["src/allocator/agones", "src/allocator/shared"];

/// Every permission the code needs, with the `file: call` lines that need it.
pub fn api_calls() -> BTreeMap<Permission, Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut calls: BTreeMap<Permission, Vec<String>> = BTreeMap::new();
    for file in rust_files(&root.join("src")) {
        let relative = file.strip_prefix(root).unwrap().display().to_string();
        let code = strip_tests(&strip_comments(&std::fs::read_to_string(&file).unwrap()));
        let uses_kube = code.contains("kube::") || code.contains("Api<") || code.contains("watcher(");
        if !KUBE_DIRS.iter().any(|dir| relative.starts_with(dir)) {
            assert!(
                !uses_kube,
                "{relative} uses the Kubernetes API outside {KUBE_DIRS:?}: teach tests/manifests/code.rs to read it"
            );
            continue;
        }
        for (receiver, type_name) in api_values(&code) {
            let (group, resource) = resource_of(&type_name, &relative);
            for (call, verbs) in calls_on(&code, &receiver, &relative) {
                for verb in verbs {
                    calls
                        .entry((group.clone(), resource.clone(), verb.to_string()))
                        .or_default()
                        .push(format!("{relative}: {call}"));
                }
            }
        }
    }
    calls
}

/// The permissions some call outside `files` needs: what a deployment that
/// never runs `files` (the allocation transport, the shared kind's watch)
/// must be granted.
pub fn needed_except(all: &BTreeMap<Permission, Vec<String>>, files: &[&str]) -> BTreeSet<Permission> {
    all.iter()
        .filter(|(_, evidence)| {
            evidence
                .iter()
                .any(|e| !files.iter().any(|file| e.starts_with(&format!("{file}:"))))
        })
        .map(|(p, _)| p.clone())
        .collect()
}

/// The calls made by `file` alone (e.g. the allocation transport).
pub fn calls_in(all: &BTreeMap<Permission, Vec<String>>, file: &str) -> BTreeSet<Permission> {
    all.iter()
        .filter(|(_, evidence)| evidence.iter().any(|e| e.starts_with(&format!("{file}:"))))
        .map(|(p, _)| p.clone())
        .collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The API group and resource of a `kube::Resource` type the code uses.
fn resource_of(type_name: &str, file: &str) -> (String, String) {
    match type_name {
        "GameServer" => (GameServer::group(&()).into(), GameServer::plural(&()).into()),
        "GameServerAllocation" => (
            GameServerAllocation::group(&()).into(),
            GameServerAllocation::plural(&()).into(),
        ),
        "Lease" => (Lease::group(&()).into(), <Lease as Resource>::plural(&()).into()),
        "EndpointSlice" => (EndpointSlice::group(&()).into(), EndpointSlice::plural(&()).into()),
        other => panic!("{file}: Api<{other}> is new to tests/manifests/code.rs: add its resource there"),
    }
}

/// The RBAC verbs of a `kube::Api` method; `None` for methods that make no
/// API call.
fn verbs_of(method: &str, file: &str) -> Option<&'static [&'static str]> {
    Some(match method {
        "get" | "get_opt" | "get_metadata" | "get_metadata_opt" => &["get"],
        "list" | "list_metadata" => &["list"],
        "watch" | "watch_metadata" => &["watch"],
        "create" => &["create"],
        "patch" | "patch_metadata" => &["patch"],
        "replace" => &["update"],
        "delete" => &["delete"],
        "delete_collection" => &["deletecollection"],
        "clone" | "resource_url" | "into_client" => return None,
        other => panic!("{file}: Api::{other} is new to tests/manifests/code.rs: map it to its RBAC verb(s) there"),
    })
}

/// `(receiver, type)` for every `name: Api<Type>` (field, binding or
/// parameter, possibly behind `&` or `Box<`) in `code`. A bare `Api<Type>`
/// with no name (an enum payload) only asserts the type is known.
fn api_values(code: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("Api<") {
        let before = &code[..at];
        if before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `SomethingApi<`
        }
        let type_name: String = code[at + 4..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let mut head = before.trim_end();
        loop {
            let trimmed = head
                .strip_suffix('&')
                .or_else(|| head.strip_suffix("Box<"))
                .or_else(|| head.strip_suffix("Arc<"))
                .or_else(|| head.strip_suffix("mut"))
                .map(str::trim_end);
            match trimmed {
                Some(t) => head = t,
                None => break,
            }
        }
        let Some(head) = head.strip_suffix(':').filter(|h| !h.ends_with(':')) else {
            continue;
        };
        let receiver: String = head
            .trim_end()
            .chars()
            .rev()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if !receiver.is_empty() {
            out.push((receiver, type_name));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The API calls on `receiver` in `code`: `receiver.method(` (across line
/// breaks) and `watcher(receiver` (a list and a watch).
fn calls_on(code: &str, receiver: &str, file: &str) -> Vec<(String, &'static [&'static str])> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (at, _) in code.match_indices(receiver) {
        let starts_word = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let end = at + receiver.len();
        let ends_word = end >= bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
        if !starts_word || !ends_word {
            continue;
        }
        let rest = code[end..].trim_start();
        if let Some(after_dot) = rest.strip_prefix('.') {
            let method: String = after_dot
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let is_call = after_dot.trim_start()[method.len()..].trim_start().starts_with('(');
            if is_call {
                if let Some(verbs) = verbs_of(&method, file) {
                    out.push((format!("{receiver}.{method}(…)"), verbs));
                }
            }
        }
        let lead = code[..at].trim_end();
        let lead = lead.strip_suffix("self.").unwrap_or(lead).trim_end();
        for watch_fn in ["watcher(", "metadata_watcher("] {
            if lead.ends_with(watch_fn) {
                out.push((format!("{watch_fn}{receiver}, …)"), &["list", "watch"][..]));
            }
        }
    }
    out
}

/// The code with comments removed and string and char literals emptied
/// (`""`, `' '`): neither can hold a call.
pub fn strip_comments(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let prev_ident = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c == 'r' && !prev_ident && matches!(next, Some('#') | Some('"')) {
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            let mut k = j + 1;
            while k < chars.len() && !(chars[k] == '"' && (0..hashes).all(|h| chars.get(k + 1 + h) == Some(&'#'))) {
                k += 1;
            }
            out.push_str("\"\"");
            i = (k + 1 + hashes).min(chars.len());
        } else if c == '"' {
            let mut k = i + 1;
            while k < chars.len() && chars[k] != '"' {
                k += if chars[k] == '\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            i = (k + 1).min(chars.len());
        } else if c == '\'' && (chars.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            let mut k = i + 1;
            while k < chars.len() && chars[k] != '\'' {
                k += if chars[k] == '\\' { 2 } else { 1 };
            }
            out.push_str("' '");
            i = (k + 1).min(chars.len());
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The code without `#[cfg(test)]` items: what ships is what needs RBAC.
fn strip_tests(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let Some(open) = out[at..].find('{').map(|o| at + o) else {
            break;
        };
        let mut depth = 0;
        let mut end = out.len();
        for (i, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(at..end, "");
    }
    out
}

#[test]
fn the_source_reader_finds_calls_across_lines_and_ignores_comments() {
    let code = r#"
        struct A { gameservers: Api<GameServer> }
        fn f(api: &Api<GameServerAllocation>) {
            // self.gameservers.delete(name) in a comment is not a call
            let s = "self.gameservers.replace( in a string is not a call either";
            self.gameservers
                .list(&params);
            api.create(&pp, &req);
            let w = watcher(self.gameservers.clone(), c);
        }
    "#;
    let code = strip_comments(code);
    let values = api_values(&code);
    assert_eq!(
        values,
        vec![
            ("api".to_string(), "GameServerAllocation".to_string()),
            ("gameservers".to_string(), "GameServer".to_string())
        ]
    );
    let calls: Vec<String> = calls_on(&code, "gameservers", "t")
        .into_iter()
        .map(|(c, v)| format!("{c} {v:?}"))
        .collect();
    assert_eq!(
        calls,
        vec![
            "gameservers.list(…) [\"list\"]".to_string(),
            "watcher(gameservers, …) [\"list\", \"watch\"]".to_string()
        ],
        "the string's replace( is not a call: {calls:?}"
    );
    assert_eq!(calls_on(&code, "api", "t").len(), 1);
}
