//! The layers of `docs/architecture.md` hold: every `crate::` path in
//! `src/` (outside comments and test modules) points down, and no module
//! imports another that imports it back, however indirectly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module of `src/` -> the top-level modules it names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let first = rel.components().next().expect("a component");
            let top = first
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read file");
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let named = edges.entry(top.clone()).or_default();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let rest = &line[i + "crate::".len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        named.insert(name);
                    }
                }
            }
        }
    }
    edges
}

/// A cycle through `from`, if any.
fn cycle(
    edges: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let last = path.last()?.clone();
    for next in edges.get(&last).into_iter().flatten() {
        if let Some(i) = path.iter().position(|p| p == next) {
            let mut c = path[i..].to_vec();
            c.push(next.clone());
            return Some(c);
        }
        path.push(next.clone());
        if let Some(c) = cycle(edges, path) {
            return Some(c);
        }
        path.pop();
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let edges = imports();
    for top in edges.keys() {
        if let Some(c) = cycle(&edges, &mut vec![top.clone()]) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_ground_floor_and_the_sink_import_nothing_above_them() {
    let edges = imports();
    let model = edges.get("model").cloned().unwrap_or_default();
    assert!(model.is_empty(), "model imports {model:?}");
    let metrics = edges.get("metrics").cloned().unwrap_or_default();
    assert_eq!(
        metrics,
        BTreeSet::from(["model".to_string()]),
        "metrics imports only model"
    );
    for store in ["queue", "ledger", "executor"] {
        let named = edges.get(store).cloned().unwrap_or_default();
        for upper in [
            "cli", "worker", "http", "duties", "usage", "client", "apalis",
        ] {
            assert!(!named.contains(upper), "{store} imports {upper}");
        }
    }
    let queue = edges.get("queue").cloned().unwrap_or_default();
    assert!(
        !queue.contains("metrics"),
        "the queue returns events; it never records metrics"
    );
}
