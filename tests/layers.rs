//! The layering of `src/` (#12): no two concepts import each other, directly or through others.
//!
//! A unit is a top-level file (`src/proxy.rs` → `proxy`) or a folder with its same-named
//! `mod.rs` (`src/health/*` → `health`); inside a unit, files may name each other. Every way one
//! file names another counts: `use crate::…`, grouped `use crate::{a, b::c}`, and inline
//! `crate::x::y` paths, in test modules too. Comments are left out (doc links are not imports).
//! `lib.rs` and `main.rs` declare and start everything and are not units.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The unit a file belongs to, `None` for the crate root files.
fn unit_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The code of a file without its comments (line comments only: the crate has no block
/// comments) and without the contents of string literals.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// The units a file's code names through `crate::`.
fn named_units(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `edge_agent_crate::`: not this crate
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::x, b, c::{y, z}}`: the first segment of each top-level item.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_ascii_alphabetic() || c == '_') => {
                        found.insert(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// A cycle in `graph`, as a path that starts and ends at the same unit.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).expect("on the stack");
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(unit) = unit_of(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("a source file is readable");
        let deps = graph.entry(unit.clone()).or_default();
        for named in named_units(&code(&text)) {
            if named != unit {
                deps.insert(named);
            }
        }
    }
    graph
}

#[test]
fn no_two_units_of_src_import_each_other() {
    let graph = import_graph();
    assert!(graph.len() > 10, "found the units: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        let edges: Vec<String> = graph
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k} -> {}",
                    v.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        panic!(
            "import cycle: {}\nthe graph:\n  {}",
            cycle.join(" -> "),
            edges.join("\n  ")
        );
    }
}

/// The scanner itself: each form of naming counts, comments and strings do not, and a cycle
/// is found.
#[test]
fn the_scanner_sees_every_form_and_finds_a_cycle() {
    let text = "use crate::a::X;\nuse crate::{b, c::{D, E}};\nfn f() { crate::d::g(); }\n\
                // crate::e in a comment\nlet s = \"crate::f\";\n/// [`crate::g`]\n";
    let names = named_units(&code(text));
    assert_eq!(names, ["a", "b", "c", "d"].map(String::from).into());
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("x".into(), ["y".to_string()].into());
    g.insert("y".into(), ["z".to_string()].into());
    g.insert("z".into(), ["x".to_string()].into());
    assert_eq!(
        find_cycle(&g).unwrap(),
        ["x", "y", "z", "x"].map(String::from)
    );
    g.get_mut("z").unwrap().clear();
    assert!(find_cycle(&g).is_none());
}

/// Leaves that must stay leaves: the HTTP/1 parser (`h1/`, #15) names only `error` of this
/// crate, so the proxy core can be built on it without pulling anything in.
#[test]
fn the_h1_parser_is_a_leaf() {
    let graph = import_graph();
    let h1 = graph.get("h1").expect("src/h1/ is a unit");
    assert_eq!(
        h1.iter().map(String::as_str).collect::<Vec<_>>(),
        ["error"],
        "h1 may import only crate::error"
    );
}
