//! `Config`: the crate's [`uring_ckpt::Config`] built from keyword arguments (Python values
//! turned into a TOML table with the TOML keys), from a file, or from another one.

use std::path::PathBuf;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};

use crate::errors::OrRaise;

/// A checkpoint configuration (see the crate's `config` module for every key). Build one from
/// keyword arguments with the TOML keys: `Config(engine="uring", chunk_size="8MiB")`.
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) inner: uring_ckpt::Config,
}

/// A TOML value from a Python bool, int, float, str or dict.
fn toml_value(value: &Bound<'_, PyAny>) -> PyResult<toml::Value> {
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(toml::Value::Boolean(b.is_true()));
    }
    if let Ok(i) = value.extract::<i64>() {
        return Ok(toml::Value::Integer(i));
    }
    if let Ok(f) = value.extract::<f64>() {
        return Ok(toml::Value::Float(f));
    }
    if let Ok(s) = value.extract::<String>() {
        return Ok(toml::Value::String(s));
    }
    if let Ok(d) = value.cast::<PyDict>() {
        return Ok(toml::Value::Table(toml_table(d)?));
    }
    Err(PyTypeError::new_err(format!("config value {value} is not a bool, int, float, str or dict")))
}

fn toml_table(dict: &Bound<'_, PyDict>) -> PyResult<toml::Table> {
    let mut table = toml::Table::new();
    for (k, v) in dict.iter() {
        table.insert(k.extract::<String>()?, toml_value(&v)?);
    }
    Ok(table)
}

impl Config {
    /// The configuration with the keys of `table` set and the defaults elsewhere, validated.
    fn from_table(py: Python<'_>, table: &toml::Table) -> PyResult<Self> {
        let inner = uring_ckpt::Config::from_toml_str(&table.to_string()).or_raise(py)?;
        Ok(Config { inner })
    }
}

#[pymethods]
impl Config {
    /// Defaults, with the given keys (TOML names) set. Environment variables are not read.
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let table = match kwargs {
            Some(d) => toml_table(d)?,
            None => toml::Table::new(),
        };
        Config::from_table(py, &table)
    }

    /// The TOML file at `path`, then the `URING_CKPT_*` environment on top; with no path, the
    /// file named by `URING_CKPT_CONFIG` if set (the same rules as the CLI).
    #[staticmethod]
    #[pyo3(signature = (path=None))]
    fn load(py: Python<'_>, path: Option<PathBuf>) -> PyResult<Self> {
        let inner = uring_ckpt::Config::load(path.as_deref()).or_raise(py)?;
        Ok(Config { inner })
    }

    /// A copy with the given keys changed.
    #[pyo3(signature = (**kwargs))]
    fn replace(&self, py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut table: toml::Table = toml::from_str(&self.inner.to_toml_string())
            .map_err(|e| PyValueError::new_err(format!("config does not round-trip through TOML: {e}")))?;
        if let Some(d) = kwargs {
            for (k, v) in toml_table(d)? {
                table.insert(k, v);
            }
        }
        Config::from_table(py, &table)
    }

    /// The configuration as TOML (every key).
    fn to_toml(&self) -> String {
        self.inner.to_toml_string()
    }

    /// The configuration in TOML text (what `to_toml` gives): its keys set, the defaults
    /// elsewhere, validated. Environment variables are not read.
    #[classmethod]
    fn from_toml(_cls: &Bound<'_, pyo3::types::PyType>, py: Python<'_>, text: &str) -> PyResult<Self> {
        let inner = uring_ckpt::Config::from_toml_str(text).or_raise(py)?;
        Ok(Config { inner })
    }

    /// Pickles as its TOML: `Config.from_toml(config.to_toml())`, so that objects holding a
    /// config (the DCP storage writer and reader) travel to other processes.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let from_toml = slf.get_type().getattr("from_toml")?;
        Ok((from_toml, (slf.get().inner.to_toml_string(),)))
    }

    /// Whether a save may replace an existing checkpoint (atomically).
    #[getter]
    fn replace_existing(&self) -> bool {
        self.inner.replace_existing
    }

    /// Bytes per write and per staging buffer (`chunk_size`).
    #[getter]
    fn chunk_size(&self) -> u64 {
        self.inner.chunk_size
    }

    /// Total bytes of the staging ring (`staging_pool_size`).
    #[getter]
    fn staging_pool_size(&self) -> u64 {
        self.inner.staging_pool_size
    }

    /// The nice value of background work (asynchronous saves once staged, reservations,
    /// the Lightning plugin's removals).
    #[getter]
    fn background_nice(&self) -> u32 {
        self.inner.background_nice
    }

    fn __repr__(&self) -> String {
        let body = self.inner.to_toml_string();
        let fields: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
        format!("Config({})", fields.join(", "))
    }
}
