//! The shape of the source tree, checked: no crate's modules import each other in a circle, and
//! no source file outside the tests grows past what a reader takes in at once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The one test of the core that reads files: the source tree it checks.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a non-test source file may be, in lines.
const MAX_LINES: usize = 1_000;

fn crates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `path` holds tests only: a `tests.rs`, or a file under a `tests` directory of the
/// source tree (the directories above the crates do not count).
fn is_test_file(path: &Path) -> bool {
    let path = path.strip_prefix(crates()).unwrap_or(path);
    path.file_name().is_some_and(|n| n == "tests.rs")
        || path.components().any(|c| c.as_os_str() == "tests")
}

/// `text` without its comments and its `#[cfg(test)]` module (which may import anything).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level module a file of `src` belongs to (`engine` for `src/engine/apply.rs`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The modules `code` names through `crate::` (`crate::spec::X`, `crate::{spec, guard}`), and
/// the items it names at the crate root, which `reexports` maps to their modules.
fn uses(
    code: &str,
    modules: &BTreeSet<String>,
    reexports: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let names: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect()
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            vec![rest[..end].to_string()]
        };
        for name in names {
            if modules.contains(&name) {
                found.insert(name);
            } else if let Some(module) = reexports.get(&name) {
                found.insert(module.clone());
            }
        }
    }
    found
}

/// A cycle in `edges`, if there is one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_modules_that_import_each_other_in_a_circle() {
    for entry in std::fs::read_dir(crates()).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        sources(&src, &mut files);
        files.retain(|f| !is_test_file(f));
        let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
        // Names the crate root re-exports (`pub use engine::{Engine, ...}`), by module.
        let mut reexports = BTreeMap::new();
        for root in ["lib.rs", "main.rs"] {
            let Ok(text) = std::fs::read_to_string(src.join(root)) else {
                continue;
            };
            for stmt in code_of(&text).split(';') {
                let Some(path) = stmt.trim().strip_prefix("pub use ") else {
                    continue;
                };
                let Some((module, items)) = path.split_once("::") else {
                    continue;
                };
                if !modules.contains(module) {
                    continue;
                }
                for item in items.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                    if !item.is_empty() && item != "self" {
                        reexports.insert(item.to_string(), module.to_string());
                    }
                }
            }
        }
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let Some(module) = module_of(&src, file) else {
                continue;
            };
            let code = code_of(&std::fs::read_to_string(file).unwrap());
            let mut used = uses(&code, &modules, &reexports);
            used.remove(&module);
            edges.entry(module).or_default().extend(used);
        }
        if let Some(found) = cycle(&edges) {
            panic!(
                "{}: modules import each other in a circle: {}",
                src.display(),
                found.join(" -> ")
            );
        }
    }
}

#[test]
fn no_source_file_outside_the_tests_passes_the_line_limit() {
    let mut files = Vec::new();
    sources(&crates(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|f| !is_test_file(f))
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}
