//! Unit tests of layout, encoding and parsing.

use std::collections::BTreeMap;

use super::parse::parse_crc;
use super::*;
use crate::format::{Dtype, FormatError};

fn spec(name: &str, dtype: Dtype, shape: &[u64]) -> TensorSpec {
    TensorSpec { name: name.to_owned(), dtype, shape: shape.to_vec() }
}

#[test]
fn layout_packs_in_order() {
    let layout = ShardLayout::new(vec![
        spec("a", Dtype::F32, &[2, 3]),
        spec("empty", Dtype::F16, &[0, 5]),
        spec("b", Dtype::U8, &[]),
    ]);
    let Ok(layout) = layout else { panic!("{layout:?}") };
    let offsets: Vec<_> = layout.tensors.iter().map(|t| t.data_offsets).collect();
    assert_eq!(offsets, vec![(0, 24), (24, 24), (24, 25)]);
    assert_eq!(layout.data_len, 25);
    assert!(layout.tensors[1].is_empty());
    assert_eq!(layout.tensors[0].len(), 24);
}

#[test]
fn layout_rejects_bad_specs() {
    let dup = ShardLayout::new(vec![spec("a", Dtype::U8, &[1]), spec("a", Dtype::U8, &[1])]);
    assert_eq!(dup, Err(FormatError::DuplicateTensor("a".into())));
    assert_eq!(ShardLayout::new(vec![spec("", Dtype::U8, &[1])]), Err(FormatError::EmptyName));
    assert_eq!(
        ShardLayout::new(vec![spec("__metadata__", Dtype::U8, &[1])]),
        Err(FormatError::ReservedTensorName("__metadata__".into()))
    );
    assert_eq!(
        ShardLayout::new(vec![spec("x", Dtype::F32, &[u64::MAX])]),
        Err(FormatError::ShapeOverflow { tensor: "x".into() })
    );
    assert!(matches!(
        ShardLayout::new(vec![spec("x", Dtype::F4, &[3])]),
        Err(FormatError::PartialByte { .. })
    ));
    // Each fits (the bit count of a U8 tensor caps it at u64::MAX / 8), nine do not.
    let specs = (0..9).map(|i| spec(&format!("t{i}"), Dtype::U8, &[u64::MAX / 8])).collect();
    assert_eq!(ShardLayout::new(specs), Err(FormatError::ShapeOverflow { tensor: "t8".into() }));
}

#[test]
fn encode_small_header_exactly() {
    let Ok(layout) = ShardLayout::new(vec![spec("w\"\\\n", Dtype::BF16, &[2])]) else { panic!() };
    let meta = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
    let Ok(prefix) = encode_header(&layout, Some(&[0xdead_beef]), &meta, 1) else { panic!() };
    assert_eq!(prefix.len(), 4096);
    let json = r#"{"__metadata__":{"k":"v","crc32:w\"\\\n":"deadbeef"},"w\"\\\n":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
    assert_eq!(&prefix[..8], &4088u64.to_le_bytes());
    assert_eq!(&prefix[8..8 + json.len()], json.as_bytes());
    assert!(prefix[8 + json.len()..].iter().all(|&b| b == b' '));
    let value: Result<serde_json::Value, _> = serde_json::from_slice(&prefix[8..]);
    assert!(value.is_ok());
}

#[test]
fn encode_rejects_bad_input() {
    let Ok(layout) = ShardLayout::new(vec![spec("a", Dtype::U8, &[3])]) else { panic!() };
    let none = BTreeMap::new();
    assert_eq!(encode_header(&layout, None, &none, 0), Err(FormatError::BadAlign(0)));
    assert_eq!(encode_header(&layout, None, &none, 3000), Err(FormatError::BadAlign(3000)));
    assert_eq!(
        encode_header(&layout, Some(&[]), &none, 1),
        Err(FormatError::CrcCount { expected: 1, actual: 0 })
    );
    let reserved = BTreeMap::from([("crc32:a".to_owned(), "00000000".to_owned())]);
    assert_eq!(
        encode_header(&layout, None, &reserved, 1),
        Err(FormatError::ReservedMetadataKey("crc32:a".into()))
    );
    let mut holey = layout.clone();
    holey.tensors[0].data_offsets = (1, 4);
    holey.data_len = 4;
    assert!(matches!(encode_header(&holey, None, &none, 1), Err(FormatError::NotContiguous { .. })));
    let mut wrong_len = layout;
    wrong_len.data_len = 7;
    assert_eq!(
        encode_header(&wrong_len, None, &none, 1),
        Err(FormatError::FileLength { expected: 3, actual: 7 })
    );
}

#[test]
fn a_phase_moves_the_data_region_past_the_aligned_base() {
    let Ok(layout) = ShardLayout::new(vec![spec("w", Dtype::F32, &[4])]) else { panic!() };
    let none = BTreeMap::new();
    let Ok(plain) = encode_header(&layout, Some(&[7]), &none, 512) else { panic!() };
    for phase in [0, 8, 64, 4088] {
        let Ok(prefix) = encode_header_with_phase(&layout, Some(&[7]), &none, 512, phase) else { panic!() };
        assert_eq!(prefix.len() as u64, 4096 + phase);
        assert_eq!(&prefix[..8], &(4088 + phase).to_le_bytes());
        assert_eq!(&prefix[8..4096], &plain[8..], "same JSON, same padding up to the base");
        assert!(prefix[4096..].iter().all(|&b| b == b' '));
        let file = [prefix.as_slice(), &[1; 16]].concat();
        let parsed = parse_header(&file, file.len() as u64);
        let Ok(parsed) = parsed else { panic!("{parsed:?}") };
        assert_eq!(parsed.data_start, 4096 + phase);
        assert_eq!(parsed.crcs, vec![Some(7)]);
    }
    // With a larger file-system alignment the base is a multiple of it.
    let Ok(prefix) = encode_header_with_phase(&layout, None, &none, 1 << 16, 64) else { panic!() };
    assert_eq!(prefix.len(), (1 << 16) + 64);
    for bad in [1, 4, 4096, 5000] {
        assert_eq!(encode_header_with_phase(&layout, None, &none, 1, bad), Err(FormatError::BadPhase(bad)));
    }
}

#[test]
fn large_alignment_and_empty_shard() {
    let Ok(layout) = ShardLayout::new(Vec::new()) else { panic!() };
    let none = BTreeMap::new();
    let Ok(prefix) = encode_header(&layout, None, &none, 1 << 16) else { panic!() };
    assert_eq!(prefix.len(), 1 << 16);
    let parsed = parse_header(&prefix, prefix.len() as u64);
    let Ok(parsed) = parsed else { panic!("{parsed:?}") };
    assert!(parsed.tensors.is_empty());
    assert_eq!(parsed.data_start, 1 << 16);
    assert_eq!(parsed.data_len, 0);
}

#[test]
fn prefix_len_limits() {
    assert_eq!(header_prefix_len(&2u64.to_le_bytes()), Ok(10));
    assert_eq!(header_prefix_len(&1u64.to_le_bytes()), Err(FormatError::HeaderTooShort { len: 1 }));
    assert_eq!(
        header_prefix_len(&(MAX_HEADER_LEN + 1).to_le_bytes()),
        Err(FormatError::HeaderTooLarge { len: MAX_HEADER_LEN + 1, max: MAX_HEADER_LEN })
    );
    assert_eq!(header_prefix_len(&[0; 7]), Err(FormatError::PrefixTooShort { len: 7, need: 8 }));
}

#[test]
fn crc_digits() {
    assert_eq!(parse_crc("0a1B2c3d"), Some(0x0a1b_2c3d));
    assert_eq!(parse_crc("+a1b2c3d"), None);
    assert_eq!(parse_crc("0a1b2c3"), None);
    assert_eq!(parse_crc("0a1b2c3d0"), None);
    assert_eq!(parse_crc("xyzxyzxy"), None);
}
