//! `URING_CKPT_*` environment variables: each field's variable is named after it
//! (`chunk_size` -> `URING_CKPT_CHUNK_SIZE`) and parsed by its type's [`EnvValue`].

use super::{Config, SimulatedFaults, Size};
use crate::error::{Error, Result};

/// Prefix shared by every environment variable this module reads.
pub(super) const ENV_PREFIX: &str = "URING_CKPT_";

/// The TOML file [`Config::load`] reads when given no path.
pub(super) const CONFIG_VAR: &str = "URING_CKPT_CONFIG";

/// The CLI's log filter; allowed here and not read.
const LOG_VAR: &str = "URING_CKPT_LOG";

/// The variables with the prefix that name no field, which [`Config::with_env_from`] skips.
pub(super) const OTHER_VARS: [&str; 2] = [CONFIG_VAR, LOG_VAR];

/// The environment variable of a field: `chunk_size` -> `URING_CKPT_CHUNK_SIZE`.
pub(super) fn env_name(field: &str) -> String {
    format!("{ENV_PREFIX}{}", field.to_ascii_uppercase())
}

/// Every environment variable [`Config::with_env_from`] understands: one per field, then
/// [`OTHER_VARS`].
pub(super) fn env_vars() -> Vec<String> {
    Config::FIELDS.iter().map(|f| env_name(f)).chain(OTHER_VARS.map(str::to_owned)).collect()
}

/// A value read from the text of an environment variable into a field of type `T`.
pub(crate) trait EnvValue<T = Self> {
    /// Parses `s`; the error says what was expected (the caller names the variable).
    fn parse_env(s: &str) -> std::result::Result<T, String>;
}

impl EnvValue for u32 {
    fn parse_env(s: &str) -> std::result::Result<u32, String> {
        s.trim().parse::<u32>().map_err(|e| format!("expected a non-negative integer: {e}"))
    }
}

impl EnvValue for bool {
    /// `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`, in any case.
    fn parse_env(s: &str) -> std::result::Result<bool, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err("expected a boolean (1/0, true/false, yes/no, on/off)".to_owned()),
        }
    }
}

impl EnvValue<u64> for Size {
    fn parse_env(s: &str) -> std::result::Result<u64, String> {
        super::size::parse_size_msg(s)
    }
}

impl EnvValue for SimulatedFaults {
    fn parse_env(s: &str) -> std::result::Result<SimulatedFaults, String> {
        SimulatedFaults::parse_list(s)
    }
}

impl Config {
    /// Applies `URING_CKPT_*` overrides from the process environment, then validates.
    /// See [`with_env_from`](Config::with_env_from).
    pub fn with_env(self) -> Result<Config> {
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if !key.starts_with(ENV_PREFIX) {
                continue;
            }
            let value = value
                .into_string()
                .map_err(|v| Error::Config(format!("{key}={v:?}: value is not valid UTF-8")))?;
            vars.push((key.to_owned(), value));
        }
        self.with_env_from(vars)
    }

    /// Applies `URING_CKPT_*` overrides from `vars`, then validates.
    ///
    /// Variables without the `URING_CKPT_` prefix are ignored, as are `URING_CKPT_CONFIG` and
    /// `URING_CKPT_LOG`; any other unknown `URING_CKPT_*` variable is an error, as is a value
    /// that does not parse. Errors name the variable and its value.
    pub fn with_env_from<I, K, V>(mut self, vars: I) -> Result<Config>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (key, value) in vars {
            let (key, value) = (key.as_ref(), value.as_ref());
            if !key.starts_with(ENV_PREFIX) || OTHER_VARS.contains(&key) {
                continue;
            }
            self.apply_env(key, value).map_err(|msg| Error::Config(format!("{key}={value:?}: {msg}")))?;
        }
        self.validate()?;
        Ok(self)
    }

    fn apply_env(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let field = Config::FIELDS.iter().find(|field| env_name(field) == key);
        match field.and_then(|field| self.set_from_env(field, value)) {
            Some(result) => result,
            None => Err(format!("unknown environment variable {key}; known: {}", env_vars().join(", "))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_fields() {
        assert_eq!(env_name("chunk_size"), "URING_CKPT_CHUNK_SIZE");
        let vars = env_vars();
        assert_eq!(vars.len(), Config::FIELDS.len() + OTHER_VARS.len());
        assert_eq!(vars[0], "URING_CKPT_ENGINE");
        assert!(vars.iter().all(|v| v.starts_with(ENV_PREFIX) && *v == v.to_ascii_uppercase()));
        assert!(CONFIG_VAR.starts_with(ENV_PREFIX) && LOG_VAR.starts_with(ENV_PREFIX));
    }

    #[test]
    fn every_field_has_an_env_parser() {
        let mut c = Config::default();
        for field in Config::FIELDS {
            assert!(c.set_from_env(field, "").is_some(), "{field}");
        }
        assert!(c.set_from_env("no_such_field", "1").is_none());
    }

    #[test]
    fn unknown_lists_every_known_variable() {
        let msg = Config::default().apply_env("URING_CKPT_NOPE", "1").expect_err("unknown");
        assert!(msg.starts_with("unknown environment variable URING_CKPT_NOPE; known: "), "{msg}");
        for var in env_vars() {
            assert!(msg.contains(&var), "{msg} lacks {var}");
        }
    }
}
