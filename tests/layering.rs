//! The source's layers: no two top-level modules of `src/` may depend on each other, directly
//! or through others (README, "Map of the source"). A module depends on another when any of
//! its files names it in a path from the crate root: `use crate::engine::Runtime;`,
//! `use crate::{table, topic::Topic};`, `crate::metrics::install()`, or a name `lib.rs`
//! re-exports from it (`crate::App` is `app`'s). Comments do not count.
//!
//! A cycle fails the test, named module by module with a file that makes each step, unless
//! each of its steps is listed in [`JUSTIFIED`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Dependencies allowed to close a cycle, as `(from, to)`, each explained in the README's map.
/// None so far.
const JUSTIFIED: &[(&str, &str)] = &[];

/// Who depends on whom: for each module, the modules it names and one file that does.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn no_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read src/lib.rs");
    let roots = Roots::of_lib(&lib);
    assert!(
        roots.modules.len() > 10,
        "expected rill's modules in src/lib.rs, found {:?}",
        roots.modules
    );
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut sources = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src").to_path_buf();
        let Some(module) = top_module(&relative) else {
            continue; // lib.rs
        };
        let text = std::fs::read_to_string(&file).expect("read a source file");
        sources.push((module, relative.display().to_string(), text));
    }
    let graph = graph(&roots, &sources);
    assert!(
        graph.values().map(BTreeMap::len).sum::<usize>() > 20,
        "expected the modules to depend on each other: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph, JUSTIFIED) {
        panic!("{}", describe(&cycle, &graph));
    }
}

/// The check fails when modules depend on each other, directly or around a longer loop.
#[test]
fn a_cycle_is_reported() {
    let roots = Roots::of_lib(
        "mod transport;\nmod engine;\npub mod table;\nmod app;\npub use app::{App, Worker};\n",
    );
    let sources = |extra: &str| {
        vec![
            (
                "engine".to_owned(),
                "engine/mod.rs".to_owned(),
                "use crate::transport::Message;\n".to_owned(),
            ),
            (
                "table".to_owned(),
                "table/mod.rs".to_owned(),
                "use crate::{engine::Runtime, transport};\n// crate::app::App in a comment\n"
                    .to_owned(),
            ),
            (
                "app".to_owned(),
                "app/mod.rs".to_owned(),
                "fn f() { crate::table::g() }\n".to_owned(),
            ),
            (
                "transport".to_owned(),
                "transport/kafka.rs".to_owned(),
                extra.to_owned(),
            ),
        ]
    };
    let clean = graph(&roots, &sources("use crate::error::TransportError;\n"));
    assert_eq!(find_cycle(&clean, &[]), None, "{clean:?}");

    // The transport reaching up to the app (through a re-export), which reaches down to it.
    let tangled = graph(&roots, &sources("fn f(app: &crate::App) {}\n"));
    let cycle = find_cycle(&tangled, &[]).expect("a cycle");
    let message = describe(&cycle, &tangled);
    for module in ["transport", "app", "table", "engine"] {
        assert!(message.contains(module), "{message}");
    }
    assert!(message.contains("transport/kafka.rs"), "{message}");
    // Justified, the step that closes it is no longer a cycle.
    assert_eq!(find_cycle(&tangled, &[("transport", "app")]), None);

    // Grouped imports name every module in the group.
    let grouped = graph(
        &roots,
        &[(
            "transport".to_owned(),
            "transport/mod.rs".to_owned(),
            "use crate::{\n    engine::{self, Runtime},\n    table,\n};\n".to_owned(),
        )],
    );
    let named: Vec<&String> = grouped["transport"].keys().collect();
    assert_eq!(named, ["engine", "table"]);
}

/// The crate root's modules, and the names it re-exports from them.
struct Roots {
    modules: BTreeSet<String>,
    reexports: BTreeMap<String, String>,
}

impl Roots {
    fn of_lib(lib: &str) -> Self {
        let code = without_comments(lib);
        let mut modules = BTreeSet::new();
        let mut reexports = BTreeMap::new();
        for statement in code.split(';') {
            let words: Vec<&str> = statement.split_whitespace().collect();
            // `mod x`, `pub mod x`, `pub(crate) mod x`, possibly after attributes.
            if let Some(i) = words.iter().position(|w| *w == "mod") {
                if let Some(name) = words.get(i + 1) {
                    if i + 2 == words.len() && is_ident(name) {
                        modules.insert((*name).to_owned());
                    }
                }
            }
        }
        for statement in code.split(';') {
            let Some(start) = statement.find("pub use ") else {
                continue;
            };
            let path = statement[start + "pub use ".len()..].trim();
            let Some((module, rest)) = path.split_once("::") else {
                continue;
            };
            if !modules.contains(module) {
                continue;
            }
            for name in rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|n| is_ident(n) && *n != "self")
            {
                reexports.insert(name.to_owned(), module.to_owned());
            }
        }
        Self { modules, reexports }
    }

    /// The module a name right after `crate::` stands for, if it is one of the crate's.
    fn module_of<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if self.modules.contains(name) {
            Some(name)
        } else {
            self.reexports.get(name).map(String::as_str)
        }
    }
}

/// The dependency graph of `sources`: (module, file, text).
fn graph(roots: &Roots, sources: &[(String, String, String)]) -> Graph {
    let mut graph = Graph::new();
    for (module, file, text) in sources {
        let entry = graph.entry(module.clone()).or_default();
        for name in crate_names(&without_comments(text)) {
            if let Some(to) = roots.module_of(&name) {
                if to != module {
                    entry.entry(to.to_owned()).or_insert_with(|| file.clone());
                }
            }
        }
    }
    graph
}

/// The first segment of every path from the crate root in `code`: `crate::a::b` gives `a`,
/// `crate::{a::b, c}` gives `a` and `c`.
fn crate_names(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` in macros, or a longer identifier
        }
        let rest_trimmed = rest.trim_start();
        if let Some(group) = rest_trimmed.strip_prefix('{') {
            // The items of the group at its outer level.
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && depth == 0 && !c.is_whitespace() => {
                        item_start = false;
                        names.push(ident_at(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            names.push(ident_at(rest_trimmed));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

fn ident_at(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn is_ident(word: &str) -> bool {
    !word.is_empty() && word.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// `code` without its line comments (doc comments too: an intra-doc link is no dependency).
fn without_comments(code: &str) -> String {
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A cycle of modules, `[a, b, ..., a]`, not counting the `justified` steps.
fn find_cycle(graph: &Graph, justified: &[(&str, &str)]) -> Option<Vec<String>> {
    fn visit(
        module: &str,
        graph: &Graph,
        justified: &[(&str, &str)],
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|m| m == module) {
            let mut cycle = path[i..].to_vec();
            cycle.push(module.to_owned());
            return Some(cycle);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_owned());
        for to in graph.get(module).into_iter().flat_map(BTreeMap::keys) {
            if justified.contains(&(module, to.as_str())) {
                continue;
            }
            if let Some(cycle) = visit(to, graph, justified, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(module.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = visit(module, graph, justified, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

fn describe(cycle: &[String], graph: &Graph) -> String {
    let mut out = format!(
        "the modules {} depend on each other; each layer may use only the ones below it \
         (README, \"Map of the source\"):\n",
        cycle.join(" -> ")
    );
    for step in cycle.windows(2) {
        let file = &graph[&step[0]][&step[1]];
        out.push_str(&format!("  {} -> {} (src/{file})\n", step[0], step[1]));
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read a source folder")
        .map(|e| e.expect("a folder entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `engine/commit.rs` and `engine.rs` are `engine`'s;
/// `lib.rs` is the root's.
fn top_module(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_owned())
}
