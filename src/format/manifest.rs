//! The checkpoint manifest, `manifest.json`: written last, it makes a directory a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::header::parse_crc;
use super::FormatError;

/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Value of the manifest's `format` field.
pub const FORMAT_NAME: &str = "uring-ckpt";

/// The manifest version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest manifest [`Manifest::parse`] accepts: 256 MiB.
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;

/// Longest shard file name accepted (the usual `NAME_MAX`).
const MAX_SHARD_NAME_LEN: usize = 255;

/// One shard file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// File name inside the checkpoint directory, e.g. `"model-00001-of-00002.safetensors"`.
    pub file: String,
    /// Length of the file in bytes.
    pub size: u64,
    /// Bytes before the data region: `8 + n`, the length of the header prefix.
    pub header_len: u64,
    /// CRC-32 (IEEE) of the header prefix; in JSON, 8 lowercase hex digits.
    #[serde(with = "hex_u32")]
    pub header_crc32: u32,
    /// Number of tensors in the shard.
    pub tensor_count: u64,
}

/// A small non-tensor file of a checkpoint (a pickled training state, say), committed with
/// the shards and checked by its size and CRC-32.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraFileInfo {
    /// File name inside the checkpoint directory (see [`check_extra_file_name`]).
    pub file: String,
    /// Length of the file in bytes.
    pub size: u64,
    /// CRC-32 (IEEE) of the whole file; in JSON, 8 lowercase hex digits.
    #[serde(with = "hex_u32")]
    pub crc32: u32,
}

/// The manifest of a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for manifests this build reads.
    pub version: u32,
    /// The shard files.
    pub shards: Vec<ShardInfo>,
    /// Tensor name to shard file (the sharded-safetensors `weight_map` convention).
    #[serde(deserialize_with = "strict_map")]
    pub weight_map: BTreeMap<String, String>,
    /// Sum of the tensors' byte sizes.
    pub total_size: u64,
    /// User metadata.
    #[serde(deserialize_with = "strict_map")]
    pub metadata: BTreeMap<String, String>,
    /// Non-tensor files of the checkpoint. Absent from the JSON when empty, so manifests
    /// written before this field existed still parse.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_files: Vec<ExtraFileInfo>,
}

impl Manifest {
    /// A manifest of the current format and version.
    pub fn new(
        shards: Vec<ShardInfo>,
        weight_map: BTreeMap<String, String>,
        total_size: u64,
        metadata: BTreeMap<String, String>,
    ) -> Manifest {
        Manifest {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            shards,
            weight_map,
            total_size,
            metadata,
            extra_files: Vec::new(),
        }
    }

    /// Pretty-printed JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        // Infallible: every map key is a String and no field's Serialize can fail.
        let mut out = serde_json::to_vec_pretty(self)
            .expect("a Manifest always serializes: string keys, infallible fields");
        out.push(b'\n');
        out
    }

    /// Strictly parses a manifest.
    ///
    /// Rejects: more than [`MAX_MANIFEST_LEN`] bytes; empty input; non-UTF-8; malformed JSON;
    /// `format` other than [`FORMAT_NAME`]; `version` other than [`FORMAT_VERSION`] (checked
    /// before the other fields, so a newer manifest gets a version error); unknown or
    /// duplicate fields and duplicate map keys; unsafe shard file names (see below);
    /// a shard listed twice; `header_len > size`; an empty tensor name; a `weight_map` value
    /// naming an unlisted shard; a `tensor_count` differing from the `weight_map` entries for
    /// that shard; a `total_size` larger than the shards' data regions together.
    ///
    /// A safe shard name is 1 to 255 bytes, has no `/`, `\`, NUL or other control character,
    /// does not start with `.` (so neither `.` nor `..`), and ends with `.safetensors`.
    /// Extra file names follow [`check_extra_file_name`] and must differ from each other.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, FormatError> {
        let len = bytes.len() as u64;
        if len > MAX_MANIFEST_LEN {
            return Err(FormatError::ManifestTooLarge { len, max: MAX_MANIFEST_LEN });
        }
        let text =
            std::str::from_utf8(bytes).map_err(|e| FormatError::NotUtf8 { valid_up_to: e.valid_up_to() })?;
        if text.trim().is_empty() {
            return Err(FormatError::BadManifest("empty manifest".to_owned()));
        }
        let json_err = |e: serde_json::Error| FormatError::Json(e.to_string());

        // Format and version first, ignoring the other fields, so that a manifest of a
        // newer version says so instead of failing on a field this build does not know.
        let probe: Probe = serde_json::from_str(text).map_err(json_err)?;
        match probe.format {
            Some(serde_json::Value::String(s)) if s == FORMAT_NAME => {}
            Some(serde_json::Value::String(s)) => return Err(FormatError::WrongFormat(s)),
            Some(other) => return Err(FormatError::WrongFormat(other.to_string())),
            None => return Err(FormatError::BadManifest("no \"format\" field".to_owned())),
        }
        match probe.version.as_ref().and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(found) => return Err(FormatError::UnsupportedVersion { found, supported: FORMAT_VERSION }),
            None => {
                return Err(FormatError::BadManifest(
                    "\"version\" is missing or not an unsigned integer".to_owned(),
                ))
            }
        }

        let manifest: Manifest = serde_json::from_str(text).map_err(json_err)?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let mut per_shard: HashMap<&str, u64> = HashMap::with_capacity(self.shards.len());
        let mut data_total = 0u64;
        for shard in &self.shards {
            check_shard_name(&shard.file)?;
            if per_shard.insert(&shard.file, 0).is_some() {
                return Err(FormatError::DuplicateShard(shard.file.clone()));
            }
            if shard.header_len > shard.size {
                return Err(FormatError::BadManifest(format!(
                    "shard {:?}: header_len {} exceeds size {}",
                    shard.file, shard.header_len, shard.size
                )));
            }
            data_total = data_total.saturating_add(shard.size - shard.header_len);
        }
        for (tensor, file) in &self.weight_map {
            if tensor.is_empty() {
                return Err(FormatError::EmptyName);
            }
            let Some(count) = per_shard.get_mut(file.as_str()) else {
                return Err(FormatError::UnknownShard { tensor: tensor.clone(), file: file.clone() });
            };
            *count += 1;
        }
        for shard in &self.shards {
            let actual = per_shard.get(shard.file.as_str()).copied().unwrap_or(0);
            if actual != shard.tensor_count {
                return Err(FormatError::TensorCountMismatch {
                    file: shard.file.clone(),
                    expected: shard.tensor_count,
                    actual,
                });
            }
        }
        let mut extra_names: HashMap<&str, ()> = HashMap::with_capacity(self.extra_files.len());
        for extra in &self.extra_files {
            check_extra_file_name(&extra.file)?;
            if extra_names.insert(&extra.file, ()).is_some() {
                return Err(FormatError::BadManifest(format!("extra file {:?} listed twice", extra.file)));
            }
        }
        if self.total_size > data_total {
            return Err(FormatError::BadManifest(format!(
                "total_size {} exceeds the {} data bytes of the shards",
                self.total_size, data_total
            )));
        }
        Ok(())
    }
}

/// Whether `name` is a plain file name that stays inside the directory: 1 to 255 bytes, no
/// `/`, `\`, NUL or other control character, not starting with `.`.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SHARD_NAME_LEN
        && !name.starts_with('.')
        && !name.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// Whether `name` is a plain `*.safetensors` file name that stays inside the directory: 1 to
/// 255 bytes, no `/`, `\`, NUL or other control character, not starting with `.`, ending
/// with `.safetensors`.
pub fn check_shard_name(name: &str) -> Result<(), FormatError> {
    if is_plain_file_name(name) && name.ends_with(".safetensors") {
        Ok(())
    } else {
        Err(FormatError::UnsafeShardName(name.to_owned()))
    }
}

/// Whether `name` is a safe name for an extra file: as for a shard (1 to 255 bytes, no `/`,
/// `\`, NUL or other control character, not starting with `.`), but not ending with
/// `.safetensors` and not [`MANIFEST_FILE`].
pub fn check_extra_file_name(name: &str) -> Result<(), FormatError> {
    if is_plain_file_name(name) && !name.ends_with(".safetensors") && name != MANIFEST_FILE {
        Ok(())
    } else {
        Err(FormatError::UnsafeShardName(name.to_owned()))
    }
}

/// The two fields read before the rest.
#[derive(Deserialize)]
struct Probe {
    format: Option<serde_json::Value>,
    version: Option<serde_json::Value>,
}

/// A string-to-string map that refuses duplicate keys (serde's maps keep the last silently).
fn strict_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;

    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of strings")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(de::Error::custom(format_args!("duplicate key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }

    d.deserialize_map(V)
}

/// A `u32` as exactly 8 hex digits (written lowercase).
mod hex_u32 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:08x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        struct V;

        impl Visitor<'_> for V {
            type Value = u32;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("8 hex digits")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<u32, E> {
                parse_crc(v).ok_or_else(|| E::custom(format_args!("{v:?} is not 8 hex digits")))
            }
        }

        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let shards = vec![
            ShardInfo {
                file: "model-00001-of-00002.safetensors".into(),
                size: 4096 + 100,
                header_len: 4096,
                header_crc32: 0x0a1b_2c3d,
                tensor_count: 2,
            },
            ShardInfo {
                file: "model-00002-of-00002.safetensors".into(),
                size: 4096,
                header_len: 4096,
                header_crc32: 0xffff_ffff,
                tensor_count: 1,
            },
        ];
        let weight_map = BTreeMap::from([
            ("a".to_owned(), "model-00001-of-00002.safetensors".to_owned()),
            ("b".to_owned(), "model-00001-of-00002.safetensors".to_owned()),
            ("c".to_owned(), "model-00002-of-00002.safetensors".to_owned()),
        ]);
        let metadata = BTreeMap::from([("step".to_owned(), "1000".to_owned())]);
        Manifest::new(shards, weight_map, 100, metadata)
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let json = m.to_json();
        assert_eq!(json.last(), Some(&b'\n'));
        let text = String::from_utf8_lossy(&json);
        assert!(text.contains("\"header_crc32\": \"0a1b2c3d\""), "{text}");
        assert!(text.contains("\"format\": \"uring-ckpt\""), "{text}");
        assert_eq!(Manifest::parse(&json), Ok(m));
    }

    #[test]
    fn shard_names() {
        for good in ["a.safetensors", "model-00001-of-00002.safetensors", "é.safetensors"] {
            assert_eq!(check_shard_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".safetensors",
            ".hidden.safetensors",
            "../x.safetensors",
            "/abs.safetensors",
            "a/b.safetensors",
            "a\\b.safetensors",
            "a\0.safetensors",
            "a\n.safetensors",
            "a.bin",
            "a.safetensors/",
        ] {
            assert_eq!(check_shard_name(bad), Err(FormatError::UnsafeShardName(bad.into())), "{bad:?}");
        }
        let long = format!("{}.safetensors", "x".repeat(250));
        assert!(check_shard_name(&long).is_err());
    }

    #[test]
    fn consistency_checks() {
        let mut m = sample();
        m.shards[0].tensor_count = 3;
        assert_eq!(
            Manifest::parse(&m.to_json()),
            Err(FormatError::TensorCountMismatch {
                file: "model-00001-of-00002.safetensors".into(),
                expected: 3,
                actual: 2
            })
        );
        let mut m = sample();
        m.shards[1].header_len = m.shards[1].size + 1;
        assert!(matches!(Manifest::parse(&m.to_json()), Err(FormatError::BadManifest(_))));
        let mut m = sample();
        m.total_size = 101;
        assert!(matches!(Manifest::parse(&m.to_json()), Err(FormatError::BadManifest(_))));
        let mut m = sample();
        m.weight_map.insert(String::new(), m.shards[0].file.clone());
        m.shards[0].tensor_count += 1;
        assert_eq!(Manifest::parse(&m.to_json()), Err(FormatError::EmptyName));
    }

    #[test]
    fn extra_files() {
        let mut m = sample();
        assert!(!String::from_utf8_lossy(&m.to_json()).contains("extra_files"));
        m.extra_files.push(ExtraFileInfo { file: "extras.pkl".into(), size: 10, crc32: 0xdead_beef });
        let json = m.to_json();
        assert!(String::from_utf8_lossy(&json).contains("\"crc32\": \"deadbeef\""));
        assert_eq!(Manifest::parse(&json), Ok(m.clone()));
        m.extra_files.push(m.extra_files[0].clone());
        assert!(matches!(Manifest::parse(&m.to_json()), Err(FormatError::BadManifest(_))));
        for good in ["extras.pkl", "a", "state.json"] {
            assert_eq!(check_extra_file_name(good), Ok(()), "{good}");
        }
        for bad in ["", ".", "..", ".x", "a/b", "../x", "a\\b", "a\0", "x.safetensors", MANIFEST_FILE] {
            assert!(check_extra_file_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn too_large_is_refused_before_parsing() {
        let big = vec![b' '; MAX_MANIFEST_LEN as usize + 1];
        assert_eq!(
            Manifest::parse(&big),
            Err(FormatError::ManifestTooLarge { len: MAX_MANIFEST_LEN + 1, max: MAX_MANIFEST_LEN })
        );
    }
}
