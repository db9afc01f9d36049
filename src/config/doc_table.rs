//! The reference tables, in the module documentation and in README.md, checked against the
//! field list and `Config::default()`: same keys in the same order, the derived environment
//! variable of each, and the default value.

use super::env::{env_name, OTHER_VARS};
use super::Config;

/// One row of a reference table: the cells of its key, environment and default columns.
#[derive(Debug)]
struct Row {
    key: String,
    env: String,
    default: String,
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|cell| cell.trim().to_owned()).collect()
}

/// The rows of the table whose header starts with `| TOML key |` in `text`.
fn table(text: &str) -> Vec<Row> {
    let mut lines = text.lines().skip_while(|l| !l.trim_start().starts_with("| TOML key |"));
    let header = cells(lines.next().expect("a table with a `TOML key` column"));
    let column =
        |name: &str| header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no {name:?} column"));
    let (key, env, default) = (column("TOML key"), column("environment variable"), column("default"));
    lines
        .skip(1) // |---|---|
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            let c = cells(l);
            Row { key: unquote(&c[key]), env: unquote(&c[env]), default: unquote(&c[default]) }
        })
        .collect()
}

/// A cell without its code span and string quotes: `` `"8MiB"` `` -> `8MiB`.
fn unquote(cell: &str) -> String {
    cell.trim_matches('`').trim_matches('"').to_owned()
}

/// The module documentation of `config` (the `//!` lines of mod.rs).
fn module_doc() -> String {
    include_str!("mod.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
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

/// Checks the field rows of `rows` and returns the other rows' variables.
fn check(name: &str, rows: &[Row]) -> Vec<String> {
    let (fields, others): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| !r.key.is_empty());
    let documented: Vec<(String, String, String)> =
        fields.iter().map(|r| (r.key.clone(), r.env.clone(), r.default.clone())).collect();
    assert_eq!(documented, expected(), "{name}: (key, variable, default) per field, in field order");
    others.iter().map(|r| r.env.clone()).collect()
}

#[test]
fn module_doc_table_matches_the_fields() {
    let others = check("config module docs", &table(&module_doc()));
    assert_eq!(others, OTHER_VARS, "config module docs: rows without a TOML key");
}

#[test]
fn readme_table_matches_the_fields() {
    let others = check("README.md", &table(include_str!("../../README.md")));
    assert!(others.iter().all(|v| OTHER_VARS.contains(&v.as_str())), "README.md: {others:?}");
}

#[test]
fn a_wrong_default_is_caught() {
    let doc = module_doc().replace(
        "| `queue_depth` | `URING_CKPT_QUEUE_DEPTH` | integer | `32` |",
        "| `queue_depth` | `URING_CKPT_QUEUE_DEPTH` | integer | `16` |",
    );
    let result = std::panic::catch_unwind(|| check("edited", &table(&doc)));
    assert!(result.is_err(), "a table with queue_depth = 16 should not pass");
}
