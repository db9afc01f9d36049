//! Property tests: header and manifest round trips, and parsers that never panic.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use uring_ckpt::format::{
    encode_header, encode_header_with_phase, header_prefix_len, parse_header, Dtype, Manifest, ShardInfo,
    ShardLayout, TensorSpec, CRC_KEY_PREFIX, DATA_ALIGN, PHASE_ALIGN,
};

/// Names with unicode, quotes, backslashes, control characters, colons and dots.
fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.:/ \"\\\\\u{1}\n\té漢🦀-]{1,12}"
}

/// A tensor spec, its shape fixed up so that sub-byte dtypes fill whole bytes.
fn tensor() -> impl Strategy<Value = (String, Dtype, Vec<u64>, u32)> {
    (
        name(),
        prop::sample::select(Dtype::ALL),
        prop::collection::vec(prop_oneof![3 => 0u64..6, 1 => 0u64..1000], 0..4),
        any::<u32>(),
    )
        .prop_map(|(name, dtype, mut shape, crc)| {
            if dtype.byte_len(&shape).is_none() {
                shape.push(8);
            }
            (name, dtype, shape, crc)
        })
}

fn tensors() -> impl Strategy<Value = Vec<(String, Dtype, Vec<u64>, u32)>> {
    prop::collection::vec(tensor(), 0..12).prop_map(|mut v| {
        let mut seen = HashSet::new();
        v.retain(|(name, ..)| name != "__metadata__" && seen.insert(name.clone()));
        v
    })
}

fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(name(), "\\PC{0,20}", 0..6).prop_map(|mut m| {
        m.retain(|k, _| !k.starts_with(CRC_KEY_PREFIX));
        m
    })
}

fn align() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![1u64, 512, 4096, 8192])
}

/// Data-region phases: none (half the cases), torch's 64, and any other allowed one.
fn phase() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0u64),
        1 => Just(64u64),
        1 => (0..DATA_ALIGN / PHASE_ALIGN).prop_map(|k| k * PHASE_ALIGN),
    ]
}

/// A valid header with no padding, for mutation tests that should hit the JSON.
fn compact(prefix: &[u8]) -> Vec<u8> {
    let end = prefix.iter().rposition(|&b| b != b' ').map_or(8, |i| i + 1).max(8);
    let json = &prefix[8..end];
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json);
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(prop::sample::Index, u8),
    Remove(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    /// Replace one byte by a JSON-significant one.
    Punct(prop::sample::Index, prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Remove),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>()).prop_map(|(i, j)| Mutation::Punct(i, j)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    const PUNCT: &[u8] = b"{}[]\":,0123456789-e. \\";
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Set(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Mutation::Remove(i) => {
            let i = i.index(bytes.len());
            bytes.remove(i);
        }
        Mutation::Insert(i, b) => {
            let i = i.index(bytes.len() + 1);
            bytes.insert(i, *b);
        }
        Mutation::Truncate(i) => {
            let i = i.index(bytes.len());
            bytes.truncate(i);
        }
        Mutation::Punct(i, j) => {
            let i = i.index(bytes.len());
            bytes[i] = PUNCT[j.index(PUNCT.len())];
        }
    }
}

fn layout_of(ts: &[(String, Dtype, Vec<u64>, u32)]) -> ShardLayout {
    let specs = ts
        .iter()
        .map(|(name, dtype, shape, _)| TensorSpec { name: name.clone(), dtype: *dtype, shape: shape.clone() })
        .collect();
    match ShardLayout::new(specs) {
        Ok(layout) => layout,
        Err(e) => panic!("generated specs must pack: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn header_round_trip(ts in tensors(), meta in metadata(), align in align(), phase in phase()) {
        let layout = layout_of(&ts);
        let crcs: Vec<u32> = ts.iter().map(|t| t.3).collect();
        let prefix = encode_header_with_phase(&layout, Some(&crcs), &meta, align, phase);
        prop_assert!(prefix.is_ok(), "{:?}", prefix);
        let prefix = prefix.unwrap_or_default();
        let placeholder = encode_header_with_phase(&layout, None, &meta, align, phase).unwrap_or_default();
        if phase == 0 {
            prop_assert_eq!(&encode_header(&layout, Some(&crcs), &meta, align).unwrap_or_default(), &prefix);
        }

        let len = prefix.len() as u64;
        let base = len - phase;
        prop_assert_eq!(base % DATA_ALIGN, 0);
        prop_assert_eq!(base % align, 0);
        prop_assert_eq!(placeholder.len(), prefix.len());
        // From the aligned base on, the prefix is spaces whatever the CRCs are.
        prop_assert!(prefix[base as usize..].iter().all(|&b| b == b' '));
        prop_assert_eq!(&prefix[base as usize..], &placeholder[base as usize..]);
        // The smallest such base: one unit less would not hold the JSON.
        let json_end = 8 + prefix[8..].iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1) as u64;
        prop_assert!(base - json_end < align.max(DATA_ALIGN));
        prop_assert_eq!(header_prefix_len(&prefix[..8]), Ok(len));
        prop_assert_eq!(prefix[8], b'{');

        let file_len = len + layout.data_len;
        let parsed = parse_header(&prefix, file_len);
        prop_assert!(parsed.is_ok(), "{:?}", parsed);
        let parsed = parsed.unwrap_or_else(|_| unreachable!());
        prop_assert_eq!(&parsed.tensors, &layout.tensors);
        prop_assert_eq!(&parsed.crcs, &crcs.iter().map(|&c| Some(c)).collect::<Vec<_>>());
        prop_assert_eq!(&parsed.metadata, &meta);
        prop_assert_eq!(parsed.data_start, len);
        prop_assert_eq!(parsed.data_len, layout.data_len);

        let parsed0 = parse_header(&placeholder, file_len);
        prop_assert!(parsed0.is_ok(), "{:?}", parsed0);
        let parsed0 = parsed0.unwrap_or_else(|_| unreachable!());
        prop_assert!(parsed0.crcs.iter().all(|&c| c == Some(0)));
        prop_assert_eq!(&parsed0.tensors, &layout.tensors);

        // The compact form (no padding) is also valid safetensors and parses the same.
        let small = compact(&prefix);
        let parsed_small = parse_header(&small, small.len() as u64 + layout.data_len);
        prop_assert!(parsed_small.is_ok(), "{:?}", parsed_small);
        prop_assert_eq!(parsed_small.unwrap_or_else(|_| unreachable!()).tensors, layout.tensors);

        // A JSON reader sees the same header.
        let value: serde_json::Value = serde_json::from_slice(&prefix[8..]).unwrap_or_default();
        prop_assert_eq!(value.as_object().map(|o| o.len()), Some(ts.len() + 1));
    }

    #[test]
    fn wrong_file_length_is_refused(ts in tensors(), delta in 1u64..10_000, longer in any::<bool>()) {
        let layout = layout_of(&ts);
        let prefix = encode_header(&layout, None, &BTreeMap::new(), 1).unwrap_or_default();
        let good = prefix.len() as u64 + layout.data_len;
        let bad = if longer { good + delta } else { good.saturating_sub(delta) };
        prop_assert!(parse_header(&prefix, bad).is_err());
    }

}

proptest! {
    // The parsers must not panic whatever they are fed: more cases, each cheap.
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn parse_header_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        file_len in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
    ) {
        let file_len = file_len.unwrap_or(bytes.len() as u64);
        let _ = parse_header(&bytes, file_len);
        // Also with a plausible length field in front.
        let mut framed = (bytes.len() as u64).to_le_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        let _ = parse_header(&framed, framed.len() as u64);
        let _ = parse_header(&framed, file_len);
    }

    #[test]
    fn parse_header_never_panics_on_mutated_headers(
        ts in tensors(),
        meta in metadata(),
        mutations in prop::collection::vec(mutation(), 0..4),
        fix_len in prop_oneof![3 => Just(true), 1 => Just(false)],
        extra in prop_oneof![3 => Just(0u64), 1 => 0u64..64],
    ) {
        let layout = layout_of(&ts);
        let crcs: Vec<u32> = ts.iter().map(|t| t.3).collect();
        let prefix = encode_header(&layout, Some(&crcs), &meta, 1).unwrap_or_default();
        let mut bytes = compact(&prefix);
        // Mutate the JSON (keeping the length field) or the whole thing.
        let mut json = bytes.split_off(8);
        for m in &mutations {
            apply(&mut json, m);
        }
        if fix_len {
            bytes = (json.len() as u64).to_le_bytes().to_vec();
        }
        bytes.extend_from_slice(&json);
        let file_len = bytes.len() as u64 + layout.data_len + extra;
        if let Ok(parsed) = parse_header(&bytes, file_len) {
            // Whatever passed is self-consistent.
            prop_assert_eq!(parsed.data_start + parsed.data_len, file_len);
            prop_assert_eq!(parsed.crcs.len(), parsed.tensors.len());
            let mut end = 0;
            for t in &parsed.tensors {
                prop_assert_eq!(t.data_offsets.0, end);
                prop_assert_eq!(t.dtype.byte_len(&t.shape), Some(t.len()));
                end = t.data_offsets.1;
            }
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn manifest_round_trip(m in manifest()) {
        let json = m.to_json();
        prop_assert_eq!(json.last(), Some(&b'\n'));
        prop_assert_eq!(Manifest::parse(&json), Ok(m));
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn manifest_parse_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let _ = Manifest::parse(&bytes);
    }

    #[test]
    fn manifest_parse_never_panics_on_mutated_manifests(
        m in manifest(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = m.to_json();
        for mu in &mutations {
            apply(&mut bytes, mu);
        }
        if let Ok(parsed) = Manifest::parse(&bytes) {
            // Whatever passed still round-trips.
            prop_assert_eq!(Manifest::parse(&parsed.to_json()), Ok(parsed));
        }
    }
}

/// A consistent manifest: unique safe shard names, every tensor mapped to a listed shard.
fn manifest() -> impl Strategy<Value = Manifest> {
    let shard_names = prop::collection::btree_set("[a-z0-9_-]{1,16}\\.safetensors", 0..5);
    (shard_names, metadata()).prop_flat_map(|(names, meta)| {
        let names: Vec<String> = names.into_iter().collect();
        let n = names.len();
        let shards = prop::collection::vec((0u64..1 << 40, 10u64..1 << 20, any::<u32>()), n);
        let tensors = if n == 0 {
            prop::collection::btree_map(name(), Just(0usize), 0..1).boxed()
        } else {
            prop::collection::btree_map(name(), 0..n, 0..20).boxed()
        };
        (Just(names), shards, tensors, Just(meta), any::<prop::sample::Index>()).prop_map(
            |(names, shards, tensors, meta, frac)| {
                let mut counts = vec![0u64; names.len()];
                let mut weight_map = BTreeMap::new();
                for (tensor, shard) in tensors {
                    counts[shard] += 1;
                    weight_map.insert(tensor, names[shard].clone());
                }
                let infos: Vec<ShardInfo> = names
                    .iter()
                    .zip(shards)
                    .zip(&counts)
                    .map(|((file, (data, header_len, crc)), &count)| ShardInfo {
                        file: file.clone(),
                        size: header_len + data,
                        header_len,
                        header_crc32: crc,
                        tensor_count: count,
                    })
                    .collect();
                let data: u64 = infos.iter().map(|s| s.size - s.header_len).sum();
                let total_size = if data == 0 { 0 } else { frac.index(data as usize + 1) as u64 };
                Manifest::new(infos, weight_map, total_size, meta)
            },
        )
    })
}
