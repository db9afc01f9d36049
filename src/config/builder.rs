//! [`ConfigBuilder`]: a [`Config`] from the defaults, one field at a time. Its setters, one
//! per field, are generated from the field list in the module root.

use super::Config;
use crate::error::Result;

/// Builds a [`Config`] from the defaults, one field at a time; [`build`](ConfigBuilder::build)
/// validates.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    pub(super) config: Config,
}

impl ConfigBuilder {
    /// Validates and returns the configuration.
    pub fn build(self) -> Result<Config> {
        self.config.validate()?;
        Ok(self.config)
    }
}
