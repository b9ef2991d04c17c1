//! The README's Rust snippets compile in a crate outside rill, as a user would write them.
//!
//! Each ```` ```rust ```` block of README.md becomes the body of a function of a new crate
//! that depends on rill (by path, without its default features) and serde, and nothing else:
//! no clap, no futures, no tokio. A fragment that refers to names it does not define gets
//! them from an HTML comment just above it (`<!-- readme-context: ... -->`, invisible when
//! the README is rendered), put at the start of the same function. The crate is checked with
//! `cargo check --offline`, in a target directory of its own under rill's (the running
//! `cargo test` holds rill's), so the first run builds the dependencies (a minute or two) and
//! later runs only the snippets.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Rust block of the README, with the context given for it.
#[derive(Debug)]
struct Snippet {
    /// Line of the opening fence.
    line: usize,
    context: String,
    code: String,
}

/// The README's ```` ```rust ```` blocks, in order.
fn snippets(readme: &str) -> Vec<Snippet> {
    let mut out = Vec::new();
    let mut context: Option<String> = None;
    let mut lines = readme.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("<!-- readme-context:") {
            let mut text = String::new();
            let mut rest = rest.to_owned();
            loop {
                if let Some(before) = rest.strip_suffix("-->") {
                    text.push_str(before);
                    break;
                }
                text.push_str(&rest);
                text.push('\n');
                match lines.next() {
                    Some((_, next)) => rest = next.to_owned(),
                    None => panic!("README.md:{}: unterminated readme-context", n + 1),
                }
            }
            context = Some(text);
        } else if trimmed == "```rust" {
            let mut code = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                code.push_str(l);
                code.push('\n');
            }
            out.push(Snippet {
                line: n + 1,
                context: context.take().unwrap_or_default(),
                code,
            });
        } else if !trimmed.is_empty() {
            // A context belongs to the block right after it.
            context = None;
        }
    }
    out
}

fn crate_source(snippets: &[Snippet]) -> String {
    let mut src = String::from(
        "//! The Rust snippets of rill's README.md, one function each.\n\
         #![allow(unused, unreachable_code, dead_code, clippy::all)]\n\n\
         fn main() {}\n",
    );
    for (i, s) in snippets.iter().enumerate() {
        let _ = write!(
            src,
            "\n/// README.md line {}.\nfn readme_line_{}() {{\n{}\n{}}}\n",
            s.line, s.line, s.context, s.code
        );
        let _ = i;
    }
    src
}

fn manifest(rill: &Path) -> String {
    format!(
        "[package]\n\
         name = \"readme-snippets\"\n\
         version = \"0.0.0\"\n\
         edition = \"2021\"\n\
         publish = false\n\n\
         [dependencies]\n\
         rill = {{ path = {rill:?}, default-features = false }}\n\
         serde = {{ version = \"1\", features = [\"derive\"] }}\n\n\
         # Not part of rill's workspace, or any other.\n\
         [workspace]\n",
        rill = rill.display().to_string()
    )
}

#[test]
fn the_readmes_rust_snippets_compile_in_a_crate_outside_rill() {
    let rill = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(rill.join("README.md")).expect("read README.md");
    let snippets = snippets(&readme);
    assert!(
        snippets.len() >= 3,
        "expected the README's Rust snippets, found {}",
        snippets.len()
    );
    assert!(
        snippets.iter().any(|s| s.code.contains("clap::Args")),
        "the command example is among the snippets checked"
    );

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| rill.join("target"));
    let dir = target.join("readme-snippets");
    std::fs::create_dir_all(dir.join("src")).expect("create the snippets crate");
    std::fs::write(dir.join("Cargo.toml"), manifest(&rill)).expect("write Cargo.toml");
    // rill's lock file, so the check resolves offline to the versions rill is built with.
    if let Ok(lock) = std::fs::read(rill.join("Cargo.lock")) {
        std::fs::write(dir.join("Cargo.lock"), lock).expect("write Cargo.lock");
    }
    let source = crate_source(&snippets);
    std::fs::write(dir.join("src/main.rs"), &source).expect("write src/main.rs");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["check", "--offline", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo check");
    assert!(
        output.status.success(),
        "a README snippet does not compile outside rill (the crate is {}; each function is \
         named after the README line of its snippet):\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn snippets_are_found_with_their_context() {
    let readme = "intro\n\n<!-- readme-context:\nlet a = 1;\n-->\n```rust\nlet b = a;\n```\n\
                  text\n```rust\nfn f() {}\n```\n```python\nx = 1\n```\n";
    let found = snippets(readme);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].context.trim(), "let a = 1;");
    assert_eq!(found[0].code, "let b = a;\n");
    assert_eq!(found[0].line, 6);
    assert_eq!(found[1].context, "");
    assert_eq!(found[1].code, "fn f() {}\n");
}
