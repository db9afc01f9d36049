//! The index of a sharded safetensors checkpoint as Hugging Face writes it,
//! `model.safetensors.index.json`: `{"metadata": {"total_size": N, ...}, "weight_map":
//! {tensor: file}}`. Someone else wrote it, so it is parsed as strictly as a manifest where
//! it matters (the weight map) and leniently where it does not (other keys are ignored).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::manifest::check_shard_name;
use super::FormatError;

/// File name of the index Hugging Face writes beside the shards of a sharded checkpoint.
pub const HF_INDEX_FILE: &str = "model.safetensors.index.json";

/// How the name of any sharded-safetensors index ends (`diffusion_pytorch_model` and other
/// prefixes exist beside `model`).
pub const INDEX_SUFFIX: &str = ".safetensors.index.json";

/// Largest index [`parse_index`] accepts: 100 MiB (a million tensors with long names fit).
pub const MAX_INDEX_LEN: u64 = 100 << 20;

/// A parsed `*.safetensors.index.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsIndex {
    /// `metadata.total_size`, when the index states it: the sum of the tensors' byte sizes.
    pub total_size: Option<u64>,
    /// Tensor name to shard file.
    pub weight_map: BTreeMap<String, String>,
}

impl SafetensorsIndex {
    /// The shard files the weight map names, each once, sorted by name.
    pub fn files(&self) -> Vec<&str> {
        let mut files: Vec<&str> = self.weight_map.values().map(String::as_str).collect();
        files.sort_unstable();
        files.dedup();
        files
    }
}

/// Strictly parses an index.
///
/// Rejects: more than [`MAX_INDEX_LEN`] bytes; non-UTF-8; anything but a JSON object; a
/// `weight_map` that is missing, empty, not an object of strings, or has a key twice; an
/// empty tensor name; a file name that is not a plain `*.safetensors` name in the same
/// directory (1 to 255 bytes, no `/`, `\`, NUL or other control character, not starting
/// with `.`: so no `..`, no absolute path, no hidden temporary file); a `metadata` that is
/// neither absent, `null` nor an object; a `metadata.total_size` that is not a non-negative
/// whole number. Other keys, at the top level and in `metadata`, are ignored.
pub fn parse_index(bytes: &[u8]) -> Result<SafetensorsIndex, FormatError> {
    let len = bytes.len() as u64;
    if len > MAX_INDEX_LEN {
        return Err(FormatError::BadIndex(format!("{len} bytes, more than the maximum of {MAX_INDEX_LEN}")));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|e| FormatError::NotUtf8 { valid_up_to: e.valid_up_to() })?;
    if !text.trim_start().starts_with('{') {
        return Err(FormatError::NotJsonObject);
    }
    let raw: RawIndex = serde_json::from_str(text).map_err(|e| FormatError::Json(e.to_string()))?;
    let Some(weight_map) = raw.weight_map else {
        return Err(FormatError::BadIndex("no \"weight_map\"".to_owned()));
    };
    let weight_map = weight_map.0;
    if weight_map.is_empty() {
        return Err(FormatError::BadIndex("the weight_map is empty".to_owned()));
    }
    for (tensor, file) in &weight_map {
        if tensor.is_empty() {
            return Err(FormatError::EmptyName);
        }
        check_shard_name(file)?;
    }
    let total_size = match raw.metadata.and_then(|m| m.total_size) {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => Some(whole_number(&value).ok_or_else(|| {
            FormatError::BadIndex(format!("metadata.total_size {value} is not a non-negative whole number"))
        })?),
    };
    Ok(SafetensorsIndex { total_size, weight_map })
}

/// The index Hugging Face tooling reads beside the shards of a flat checkpoint:
/// `{"metadata": {"total_size": N}, "weight_map": {tensor: file}}`, pretty-printed with a
/// trailing newline. `total_size` is the sum of the tensors' byte sizes. [`parse_index`]
/// reads it back (it refuses an empty weight map, so write none for a checkpoint without
/// tensors).
pub fn encode_index(weight_map: &BTreeMap<String, String>, total_size: u64) -> Vec<u8> {
    let value = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    // Infallible: string keys and plain values only.
    let mut out = serde_json::to_vec_pretty(&value).expect("an index always serializes");
    out.push(b'\n');
    out
}

/// `value` as a `u64` when it is a non-negative whole number (some writers store
/// `total_size` as a float such as `1.5e9`).
fn whole_number(value: &serde_json::Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    // Below 2^53 every whole float is exact.
    (f >= 0.0 && f.fract() == 0.0 && f < 9_007_199_254_740_992.0).then_some(f as u64)
}

/// The index as found; unknown keys ignored, the known ones at most once.
#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<RawMetadata>,
    #[serde(default)]
    weight_map: Option<StrictMap>,
}

#[derive(Deserialize)]
struct RawMetadata {
    #[serde(default)]
    total_size: Option<serde_json::Value>,
}

/// A string-to-string map that refuses duplicate keys (serde's maps keep the last silently).
struct StrictMap(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for StrictMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;

        impl<'de> Visitor<'de> for V {
            type Value = StrictMap;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format_args!("duplicate key {k:?}")));
                    }
                    out.insert(k, v);
                }
                Ok(StrictMap(out))
            }
        }

        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SafetensorsIndex, FormatError> {
        parse_index(text.as_bytes())
    }

    #[test]
    fn hugging_face_layout() {
        let index = parse(
            r#"{"metadata": {"total_size": 24, "total_parameters": 6},
                "weight_map": {"a": "model-00002-of-00002.safetensors",
                               "b": "model-00001-of-00002.safetensors",
                               "c": "model-00002-of-00002.safetensors"}}"#,
        )
        .expect("parses");
        assert_eq!(index.total_size, Some(24));
        assert_eq!(index.files(), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        assert_eq!(index.weight_map["a"], "model-00002-of-00002.safetensors");
        let index = parse(r#"{"weight_map": {"a": "x.safetensors"}, "extra": [1]}"#).expect("no metadata");
        assert_eq!(index.total_size, None);
        let index = parse(r#"{"metadata": {"total_size": 1.5e3}, "weight_map": {"a": "x.safetensors"}}"#);
        assert_eq!(index.expect("float size").total_size, Some(1500));
    }

    #[test]
    fn encoded_indexes_parse_back() {
        let map = BTreeMap::from([
            ("a.weight".to_owned(), "shard-r00000-00000.safetensors".to_owned()),
            ("b".to_owned(), "shard-r00000-00001.safetensors".to_owned()),
        ]);
        let index = parse_index(&encode_index(&map, 1234)).expect("parses");
        assert_eq!(index.total_size, Some(1234));
        assert_eq!(index.weight_map, map);
    }

    #[test]
    fn unsafe_file_names_are_refused() {
        for bad in
            ["../x.safetensors", "a/b.safetensors", "/abs.safetensors", ".tmp.safetensors", "x.bin", ""]
        {
            let text = format!(r#"{{"weight_map": {{"t": {}}}}}"#, serde_json::Value::from(bad));
            assert_eq!(parse(&text), Err(FormatError::UnsafeShardName(bad.to_owned())), "{bad:?}");
        }
        let long = format!(r#"{{"weight_map": {{"t": "{}.safetensors"}}}}"#, "x".repeat(250));
        assert!(matches!(parse(&long), Err(FormatError::UnsafeShardName(_))));
    }

    #[test]
    fn malformed_indexes_are_refused() {
        let bad_index = |r: Result<SafetensorsIndex, FormatError>| matches!(r, Err(FormatError::BadIndex(_)));
        assert!(bad_index(parse(r#"{"metadata": {}}"#)));
        assert!(bad_index(parse(r#"{"weight_map": {}}"#)));
        assert!(bad_index(parse(
            r#"{"metadata": {"total_size": -1}, "weight_map": {"a": "x.safetensors"}}"#
        )));
        assert!(bad_index(parse(
            r#"{"metadata": {"total_size": "9"}, "weight_map": {"a": "x.safetensors"}}"#
        )));
        assert!(
            matches!(parse(r#"{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}"#), Err(FormatError::Json(m)) if m.contains("duplicate key"))
        );
        assert!(matches!(parse(r#"{"weight_map": {"a": 1}}"#), Err(FormatError::Json(_))));
        assert!(matches!(
            parse(r#"{"weight_map": {"a": "x.safetensors"}, "weight_map": {}}"#),
            Err(FormatError::Json(_))
        ));
        assert_eq!(parse(r#"{"weight_map": {"": "x.safetensors"}}"#), Err(FormatError::EmptyName));
        assert_eq!(parse("[1]"), Err(FormatError::NotJsonObject));
        assert!(matches!(parse_index(b"{\xff}"), Err(FormatError::NotUtf8 { valid_up_to: 1 })));
        let big = vec![b' '; MAX_INDEX_LEN as usize + 1];
        assert!(bad_index(parse_index(&big)));
    }
}
