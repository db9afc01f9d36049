//! [`SimulatedFaults`]: the `[simulate]` table, and its `URING_CKPT_SIMULATE` list form.

use serde::{Deserialize, Serialize};

use super::enums::one_of;

/// Faults the engines simulate so that every fallback path can be tested on any machine.
///
/// In TOML this is the `[simulate]` table; in the environment, `URING_CKPT_SIMULATE` is a
/// comma-separated list of `uring-eperm`, `direct-einval` and `register-enomem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatedFaults {
    /// `io_uring_setup` fails with `EPERM`, as in containers whose seccomp profile blocks it
    /// (`uring-eperm`). Default `false`.
    pub uring_setup_eperm: bool,
    /// Opening with `O_DIRECT` fails with `EINVAL`, as on tmpfs (`direct-einval`).
    /// Default `false`.
    pub direct_io_einval: bool,
    /// Registering buffers fails with `ENOMEM`, as when `RLIMIT_MEMLOCK` is too low
    /// (`register-enomem`). Default `false`.
    pub register_enomem: bool,
}

/// The switch of one fault in a [`SimulatedFaults`].
pub(super) type Field = fn(&mut SimulatedFaults) -> &mut bool;

/// The name of each fault in the `URING_CKPT_SIMULATE` list, and its field.
pub(super) const LIST_NAMES: [(&str, Field); 3] = [
    ("uring-eperm", |f| &mut f.uring_setup_eperm),
    ("direct-einval", |f| &mut f.direct_io_einval),
    ("register-enomem", |f| &mut f.register_enomem),
];

impl SimulatedFaults {
    /// Parses the `URING_CKPT_SIMULATE` list: comma-separated `uring-eperm`,
    /// `direct-einval`, `register-enomem`, in any case; empty means no faults.
    pub(super) fn parse_list(s: &str) -> Result<Self, String> {
        let mut faults = SimulatedFaults::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let lower = item.to_ascii_lowercase();
            let Some((_, field)) = LIST_NAMES.iter().find(|(name, _)| *name == lower) else {
                let names: Vec<&str> = LIST_NAMES.iter().map(|(name, _)| *name).collect();
                return Err(format!("unknown fault {item:?}; expected {}", one_of(&names)));
            };
            *field(&mut faults) = true;
        }
        Ok(faults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_sets_each_field_once_named() {
        let all =
            SimulatedFaults::parse_list(" Uring-EPERM,direct-einval,, register-enomem ").expect("parses");
        assert_eq!(
            all,
            SimulatedFaults { uring_setup_eperm: true, direct_io_einval: true, register_enomem: true }
        );
        assert_eq!(SimulatedFaults::parse_list(""), Ok(SimulatedFaults::default()));
        assert_eq!(
            SimulatedFaults::parse_list("disk-on-fire"),
            Err("unknown fault \"disk-on-fire\"; expected uring-eperm, direct-einval or register-enomem"
                .to_owned())
        );
    }
}
