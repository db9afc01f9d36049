//! The reference tables, in the module documentation and in README.md, checked against the
//! declarations: the same keys in field order, the derived environment variable of each, the
//! default of `Config::default()`, the limits of the `Config` constants, and the names of
//! each keyword setting.

use super::env::{env_name, OTHER_VARS};
use super::faults::LIST_NAMES;
use super::{format_size, AsyncMode, Config, EngineKind, FsyncPolicy, LockMode};

/// One row of a reference table: the cells of the columns checked here.
#[derive(Debug)]
struct Row {
    key: String,
    env: String,
    default: String,
    /// The cell that lists a keyword setting's names: the type cell (where the table has a
    /// type column) if it holds code, else the allowed cell.
    names: String,
    allowed: String,
}

/// A reference table: what it is called, and the text it is in.
struct Table {
    name: &'static str,
    text: String,
}

fn module_table() -> Table {
    // The `//!` lines of mod.rs.
    let text = include_str!("mod.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    Table { name: "config module docs", text }
}

fn readme_table() -> Table {
    Table { name: "README.md", text: include_str!("../../README.md").to_owned() }
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|cell| cell.trim().to_owned()).collect()
}

/// A cell without its code span and string quotes: `` `"8MiB"` `` -> `8MiB`.
fn unquote(cell: &str) -> String {
    cell.trim_matches('`').trim_matches('"').to_owned()
}

impl Table {
    /// The rows of the table whose header starts with `| TOML key |`.
    fn rows(&self) -> Vec<Row> {
        let mut lines = self.text.lines().skip_while(|l| !l.trim_start().starts_with("| TOML key |"));
        let header = cells(lines.next().unwrap_or_else(|| panic!("{}: no `| TOML key |` table", self.name)));
        let column = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .unwrap_or_else(|| panic!("{}: no {name:?} column", self.name))
        };
        let (key, env, default) = (column("TOML key"), column("environment variable"), column("default"));
        let ty = header.iter().position(|h| h == "type");
        let allowed = column("allowed");
        lines
            .skip(1) // |---|---|
            .take_while(|l| l.trim_start().starts_with('|'))
            .map(|l| {
                let c = cells(l);
                Row {
                    key: unquote(&c[key]),
                    env: unquote(&c[env]),
                    default: unquote(&c[default]),
                    names: ty
                        .map(|t| c[t].clone())
                        .filter(|t| t.contains('`'))
                        .unwrap_or_else(|| c[allowed].clone()),
                    allowed: c[allowed].replace('`', ""),
                }
            })
            .collect()
    }

    /// Checks the field rows and returns the variables of the other rows.
    fn check(&self) -> Vec<String> {
        let rows = self.rows();
        let (fields, others): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| !r.key.is_empty());
        let documented: Vec<(String, String, String)> =
            fields.iter().map(|r| (r.key.clone(), r.env.clone(), r.default.clone())).collect();
        assert_eq!(
            documented,
            expected(),
            "{}: (key, variable, default) per field, in field order",
            self.name
        );
        for (field, want) in limits() {
            let row = fields.iter().find(|r| r.key == field).expect("every field has a row");
            assert_eq!(row.allowed, want, "{}: allowed values of {field}", self.name);
        }
        for (field, want) in names() {
            let row = fields.iter().find(|r| r.key == field).expect("every field has a row");
            let listed: Vec<String> = row.names.split(',').map(|n| unquote(n.trim())).collect();
            assert_eq!(listed, want, "{}: names of {field}", self.name);
        }
        others.iter().map(|r| r.env.clone()).collect()
    }
}

/// What a table should say of each field: key (`[name]` for a table), variable, default.
fn expected() -> Vec<(String, String, String)> {
    let defaults = toml::Value::try_from(Config::default()).expect("serializes");
    let defaults = defaults.as_table().expect("a table");
    Config::FIELDS
        .iter()
        .map(|&field| {
            let (key, default) = match &defaults[field] {
                toml::Value::String(s) => (field.to_owned(), s.clone()),
                toml::Value::Table(t) => {
                    // A table of switches that are all off is documented as "none".
                    assert!(t.values().all(|v| v.as_bool() == Some(false)), "{field}: {t}");
                    (format!("[{field}]"), "none".to_owned())
                }
                other => (field.to_owned(), other.to_string()),
            };
            (key, env_name(field), default)
        })
        .collect()
}

/// The "allowed" cell of each limited field, written from the constants `validate` checks.
fn limits() -> Vec<(&'static str, String)> {
    let count = |r: std::ops::RangeInclusive<u32>| format!("{}..={}", r.start(), r.end());
    let chunk = Config::CHUNK_SIZE_RANGE;
    vec![
        ("queue_depth", count(Config::QUEUE_DEPTH_RANGE)),
        (
            "chunk_size",
            format!(
                "{}..={}, multiple of {}",
                format_size(*chunk.start()),
                format_size(*chunk.end()),
                Config::CHUNK_ALIGN
            ),
        ),
        (
            "staging_pool_size",
            format!(
                "{} × chunk_size..={}",
                Config::MIN_STAGING_BUFFERS,
                format_size(Config::MAX_STAGING_POOL_SIZE)
            ),
        ),
        ("max_shard_size", format!(">= {}", format_size(Config::MIN_SHARD_SIZE))),
        ("io_threads", count(Config::IO_THREADS_RANGE)),
        ("max_saves_in_flight", count(Config::MAX_SAVES_IN_FLIGHT_RANGE)),
        ("background_nice", count(Config::BACKGROUND_NICE_RANGE)),
        ("background_threads", count(Config::BACKGROUND_THREADS_RANGE)),
    ]
}

/// The names each keyword setting accepts, from its declaration.
fn names() -> Vec<(&'static str, Vec<String>)> {
    let owned = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
    vec![
        ("engine", owned(EngineKind::NAMES)),
        ("fsync", owned(FsyncPolicy::NAMES)),
        ("async_mode", owned(AsyncMode::NAMES)),
        ("lock", owned(LockMode::NAMES)),
        ("[simulate]", LIST_NAMES.iter().map(|(n, _)| (*n).to_owned()).collect()),
    ]
}

#[test]
fn module_doc_table_matches_the_declarations() {
    let others = module_table().check();
    assert_eq!(others, OTHER_VARS, "config module docs: rows without a TOML key");
}

#[test]
fn readme_table_matches_the_declarations() {
    let others = readme_table().check();
    assert!(others.iter().all(|v| OTHER_VARS.contains(&v.as_str())), "README.md: {others:?}");
}

#[test]
fn every_field_is_checked_and_a_wrong_cell_is_caught() {
    assert_eq!(module_table().rows().len(), Config::FIELDS.len() + OTHER_VARS.len());
    for (from, to) in [
        ("| integer | `32` | 1..=4096 |", "| integer | `16` | 1..=4096 |"),
        ("| integer | `32` | 1..=4096 |", "| integer | `32` | 1..=1024 |"),
        ("`URING_CKPT_SQPOLL`", "`URING_CKPT_SQ_POLL`"),
        ("`\"stream\"`, `\"snapshot\"`", "`\"stream\"`"),
    ] {
        let mut table = module_table();
        assert!(table.text.contains(from), "{from}");
        table.text = table.text.replace(from, to);
        let result = std::panic::catch_unwind(|| table.check());
        assert!(result.is_err(), "a table with {to:?} should not pass");
    }
}
