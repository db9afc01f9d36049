//! The two macros that let the configuration be declared once: [`config_enum!`] for a
//! keyword enum (one table of names gives `as_str`, parsing, `Display`, `FromStr`, serde and
//! the environment parser) and [`config_struct!`] for [`Config`](super::Config) itself (one
//! field list gives the struct, `Default`, the builder setters, the field names and the
//! environment setter).

/// Declares a keyword enum from one table: `Variant = "name" | "alias", ...`.
///
/// Generates the enum (`Debug, Clone, Copy, PartialEq, Eq, Hash, Default`), `NAMES` (the
/// canonical names), `as_str`, a lenient `parse` (trimmed, any case, aliases) used by
/// `FromStr` and the environment, `Display`, and serde as the exact lowercase name (aliases
/// accepted; the same error as serde's derive for an unknown name). `$what` names the
/// setting in error messages: "unknown {what} ...".
macro_rules! config_enum {
    (
        $(#[$attr:meta])*
        pub enum $name:ident($what:literal) {
            $(
                $(#[$vattr:meta])*
                $variant:ident = $text:literal $(| $alias:literal)*,
            )+
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $(
                $(#[$vattr])*
                $variant,
            )+
        }

        impl $name {
            /// The canonical names, as written in TOML, in environment variables and in logs.
            pub(crate) const NAMES: &'static [&'static str] = &[$($text),+];

            /// The lowercase name used in TOML, in environment variables and in logs.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The value of an exact (lowercase) name or alias.
            fn from_name(s: &str) -> Option<Self> {
                match s {
                    $($text $(| $alias)* => Some($name::$variant),)+
                    _ => None,
                }
            }

            /// Parses a name or alias, trimmed, in any case.
            pub(crate) fn parse(s: &str) -> std::result::Result<Self, String> {
                Self::from_name(&s.trim().to_ascii_lowercase()).ok_or_else(|| {
                    format!(
                        "unknown {} {s:?}; expected {}",
                        $what,
                        $crate::config::enums::one_of(Self::NAMES)
                    )
                })
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::error::Error;

            /// Parses a name (or an alias) in any case.
            fn from_str(s: &str) -> $crate::error::Result<Self> {
                $name::parse(s).map_err($crate::error::Error::Config)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                struct NameVisitor;

                impl serde::de::Visitor<'_> for NameVisitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        write!(f, "one of {}", $crate::config::enums::one_of($name::NAMES))
                    }

                    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<$name, E> {
                        $name::from_name(v).ok_or_else(|| E::unknown_variant(v, $name::NAMES))
                    }
                }

                d.deserialize_str(NameVisitor)
            }
        }

        impl $crate::config::env::EnvValue for $name {
            fn parse_env(s: &str) -> std::result::Result<Self, String> {
                $name::parse(s)
            }
        }
    };
}

/// Declares [`Config`](super::Config) from one field list.
///
/// Each field is `/// docs` (and any attributes), `name: Type = default,`; a size in bytes is
/// `name: u64 as Size = default,`, which reads and writes it as a [`Size`](super::Size) in
/// TOML (`"8MiB"`) and in the environment. Generates the struct (serde derive, unknown keys
/// rejected, missing keys defaulted), `Default`, `Config::FIELDS`, `Config::set_from_env`
/// (the parser of each field's environment variable) and a `#[must_use]` setter per field on
/// [`ConfigBuilder`](super::ConfigBuilder).
macro_rules! config_struct {
    // Entry: the struct's attributes, then the fields, normalised one at a time below.
    (
        $(#[$attr:meta])*
        pub struct Config { $($fields:tt)* }
    ) => {
        config_struct!(@field [$(#[$attr])*] [] $($fields)*);
    };
    // A size: a `u64` written as a `Size`.
    (
        @field [$($sattr:tt)*] [$($done:tt)*]
        $(#[$fattr:meta])* $field:ident: u64 as Size = $default:expr, $($rest:tt)*
    ) => {
        config_struct!(
            @field [$($sattr)*]
            [$($done)* {
                [$(#[$fattr])* #[serde(with = "size::as_size")]] $field: u64 as $crate::config::Size = $default
            }]
            $($rest)*
        );
    };
    // Any other field: written in its own type.
    (
        @field [$($sattr:tt)*] [$($done:tt)*]
        $(#[$fattr:meta])* $field:ident: $ty:ty = $default:expr, $($rest:tt)*
    ) => {
        config_struct!(
            @field [$($sattr)*] [$($done)* { [$(#[$fattr])*] $field: $ty as $ty = $default }] $($rest)*
        );
    };
    // Every field normalised: generate.
    (
        @field [$(#[$attr:meta])*]
        [$({ [$(#[$fattr:meta])*] $field:ident: $ty:ty as $repr:ty = $default:expr })+]
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $(
                $(#[$fattr])*
                pub $field: $ty,
            )+
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $($field: $default,)+ }
            }
        }

        impl Config {
            /// The field names, which are the TOML keys, in declaration order.
            pub(crate) const FIELDS: &'static [&'static str] = &[$(stringify!($field)),+];

            /// Sets the field named `field` from the text of its environment variable;
            /// `None` if there is no such field.
            pub(crate) fn set_from_env(
                &mut self,
                field: &str,
                value: &str,
            ) -> Option<std::result::Result<(), String>> {
                use $crate::config::env::EnvValue;
                $(
                    if field == stringify!($field) {
                        return Some(<$repr as EnvValue<$ty>>::parse_env(value).map(|v| self.$field = v));
                    }
                )+
                None
            }
        }

        impl $crate::config::ConfigBuilder {
            $(
                #[doc = concat!(
                    "Sets [`Config::", stringify!($field), "`] (see it for the default and the \
                     allowed values)."
                )]
                #[must_use]
                pub fn $field(mut self, value: $ty) -> Self {
                    self.config.$field = value;
                    self
                }
            )+
        }
    };
}
