//! The header JSON as found, before any check: top-level keys in file order with
//! duplicates kept, `__metadata__` values that may not be strings, tensor entries with
//! exactly `dtype`, `shape` and `data_offsets`.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::METADATA_KEY;

/// The header's top-level object, keys in file order, duplicates kept for the caller to see.
pub(super) struct RawHeader {
    pub(super) entries: Vec<(String, RawValue)>,
}

pub(super) enum RawValue {
    Meta(RawMeta),
    Tensor(RawTensor),
}

/// `__metadata__` as found: key/value pairs in order (`None` for a non-string value), or
/// something other than an object.
pub(super) enum RawMeta {
    Pairs(Vec<(String, Option<String>)>),
    NotObject,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTensor {
    pub(super) dtype: String,
    pub(super) shape: Vec<u64>,
    pub(super) data_offsets: (u64, u64),
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;

        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RawHeader;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a safetensors header object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = if key == METADATA_KEY {
                        RawValue::Meta(map.next_value::<RawMeta>()?)
                    } else {
                        RawValue::Tensor(map.next_value::<RawTensor>()?)
                    };
                    entries.push((key, value));
                }
                Ok(RawHeader { entries })
            }
        }

        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// A metadata value: a string, or `None` for any other JSON value (skipped over).
struct MaybeString(Option<String>);

impl<'de> Deserialize<'de> for MaybeString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;

        impl<'de> Visitor<'de> for V {
            type Value = MaybeString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaybeString, E> {
                Ok(MaybeString(Some(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<MaybeString, E> {
                Ok(MaybeString(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MaybeString, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MaybeString, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
        }

        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawMeta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;

        impl<'de> Visitor<'de> for V {
            type Value = RawMeta;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMeta, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, MaybeString(v))) = map.next_entry::<String, MaybeString>()? {
                    pairs.push((k, v));
                }
                Ok(RawMeta::Pairs(pairs))
            }
            // `null` is what upstream accepts for "no metadata".
            fn visit_unit<E: de::Error>(self) -> Result<RawMeta, E> {
                Ok(RawMeta::Pairs(Vec::new()))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawMeta, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawMeta::NotObject)
            }
        }

        deserializer.deserialize_any(V)
    }
}
