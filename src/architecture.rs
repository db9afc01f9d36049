//! Test only: the layer order stated in ARCHITECTURE.md holds for every module of the
//! library (a module names only modules on earlier lines of that list).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers of ARCHITECTURE.md's ```` ```layers ```` block, bottom first: module name to
/// its line.
fn layers() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
        .expect("read ARCHITECTURE.md");
    let block = text
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("ARCHITECTURE.md has a ```layers block");
    block
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .enumerate()
        .map(|(i, name)| (name.to_owned(), i))
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("list src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules that `source` names through `crate::`, outside comments and
/// `#[cfg(test)]` sections.
fn crate_references(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let line = line.trim_start();
        if line.starts_with("#[cfg(test)]") {
            break; // tests may reach anywhere; they come last in a file
        }
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            if let Some(group) = tail.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name = item.trim().split("::").next().unwrap_or("").trim();
                    if !name.is_empty() {
                        found.insert(name.to_owned());
                    }
                }
            } else {
                let name: String = tail.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                found.insert(name);
            }
            rest = tail;
        }
    }
    found
}

/// Files of modules declared under `#[cfg(test)]` (`#[cfg(test)] mod x;` next to them): test
/// code, which may reach anywhere.
fn test_only_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("read source");
        let dir = if file.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs" || n == "main.rs") {
            file.parent().expect("parent").to_path_buf()
        } else {
            file.with_extension("")
        };
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            if pair[0] == "#[cfg(test)]" {
                let decl = pair[1].trim_start_matches("pub(crate) ").trim_start_matches("pub ");
                if let Some(name) = decl.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                    out.insert(dir.join(format!("{name}.rs")));
                    out.insert(dir.join(name).join("mod.rs"));
                }
            }
        }
    }
    out
}

#[test]
fn layers_follow_architecture_md() {
    let layers = layers();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let tests = test_only_files(&files);
    let mut problems = Vec::new();
    for file in files.iter().filter(|f| !tests.contains(*f)) {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_owned();
        if matches!(module.as_str(), "lib" | "main" | "cli" | "architecture") {
            continue; // the facade, the binary and this test
        }
        let Some(&own) = layers.get(&module) else {
            problems.push(format!("{}: module {module} is not in ARCHITECTURE.md's layers", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for used in crate_references(&text) {
            if used == module {
                continue;
            }
            match layers.get(&used) {
                Some(&layer) if layer < own => {}
                Some(_) => {
                    problems.push(format!("{}: {module} uses {used}, which is not below it", rel.display()))
                }
                None => problems.push(format!(
                    "{}: {module} uses crate::{used}, which is no module of the layer list (import it from \
                     its own module, not through lib.rs)",
                    rel.display()
                )),
            }
        }
    }
    assert!(problems.is_empty(), "layer violations:\n{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_references() {
    let refs = crate_references(
        "use crate::io::{Dir, Writer};\nuse crate::{error, format::Dtype};\n// crate::ignored\nlet x = crate::save::save(a);\n#[cfg(test)]\nuse crate::tests_only;",
    );
    let expected: BTreeSet<String> =
        ["io", "error", "format", "save"].iter().map(|s| s.to_string()).collect();
    assert_eq!(refs, expected);
}
