//! Element types, spelled as the safetensors format spells them.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The element type of a tensor, as named in a safetensors header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// Boolean, one byte per element (`"BOOL"`).
    Bool,
    /// Unsigned 8-bit integer (`"U8"`).
    U8,
    /// Signed 8-bit integer (`"I8"`).
    I8,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits (`"F8_E5M2"`).
    F8E5M2,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits (`"F8_E4M3"`).
    F8E4M3,
    /// 8-bit exponent-only scale format (`"F8_E8M0"`).
    F8E8M0,
    /// Signed 16-bit integer (`"I16"`).
    I16,
    /// Unsigned 16-bit integer (`"U16"`).
    U16,
    /// IEEE half precision (`"F16"`).
    F16,
    /// bfloat16 (`"BF16"`).
    BF16,
    /// Signed 32-bit integer (`"I32"`).
    I32,
    /// Unsigned 32-bit integer (`"U32"`).
    U32,
    /// IEEE single precision (`"F32"`).
    F32,
    /// Complex of two single-precision floats, 64 bits (`"C64"`).
    C64,
    /// IEEE double precision (`"F64"`).
    F64,
    /// Signed 64-bit integer (`"I64"`).
    I64,
    /// Unsigned 64-bit integer (`"U64"`).
    U64,
    /// 4-bit float, two elements per byte (`"F4"`).
    F4,
    /// 6-bit float, 2 exponent bits, 3 mantissa bits (`"F6_E2M3"`).
    F6E2M3,
    /// 6-bit float, 3 exponent bits, 2 mantissa bits (`"F6_E3M2"`).
    F6E3M2,
}

impl Dtype {
    /// Every dtype, in declaration order.
    pub const ALL: &'static [Dtype] = &[
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::F8E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
        Dtype::F4,
        Dtype::F6E2M3,
        Dtype::F6E3M2,
    ];

    /// The safetensors spelling, e.g. `"F8_E4M3"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::C64 => "C64",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
        }
    }

    /// Parses the safetensors spelling (exact, case-sensitive). `None` for anything else.
    pub fn parse(s: &str) -> Option<Dtype> {
        Dtype::ALL.iter().copied().find(|d| d.as_str() == s)
    }

    /// Bits per element: 8 for `BOOL`, 4 for `F4`, 6 for the `F6_*` types, 64 for `C64`.
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::C64 | Dtype::F64 | Dtype::I64 | Dtype::U64 => 64,
        }
    }

    /// Total bits of a tensor of this dtype and `shape`; `None` on overflow.
    ///
    /// The element count is the product of the dimensions taken left to right with overflow
    /// checks, as upstream safetensors computes it, so `[u64::MAX, 2, 0]` overflows (and is
    /// refused by upstream too) although it has no elements. An empty shape is a scalar.
    pub(crate) fn bit_len(self, shape: &[u64]) -> Option<u64> {
        shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?.checked_mul(self.bits())
    }

    /// Bytes of a tensor of this dtype and `shape`.
    ///
    /// `None` when the element count or bit count overflows a `u64`, or when the bit count
    /// is not a whole number of bytes (an odd number of `F4` elements, for instance). An
    /// empty shape is a scalar (one element); a zero dimension gives zero bytes (unless the
    /// product of the dimensions before it already overflowed, see upstream's rule).
    pub fn byte_len(self, shape: &[u64]) -> Option<u64> {
        let bits = self.bit_len(shape)?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a safetensors dtype.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}")]
pub struct ParseDtypeError(pub String);

impl FromStr for Dtype {
    type Err = ParseDtypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::parse(s).ok_or_else(|| ParseDtypeError(s.to_owned()))
    }
}

impl Serialize for Dtype {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DtypeVisitor;

        impl Visitor<'_> for DtypeVisitor {
            type Value = Dtype;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a safetensors dtype string such as \"F32\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dtype, E> {
                Dtype::parse(v).ok_or_else(|| E::custom(format_args!("unknown dtype {v:?}")))
            }
        }

        deserializer.deserialize_str(DtypeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelling_round_trips_and_is_unique() {
        assert_eq!(Dtype::ALL.len(), 20);
        for (i, d) in Dtype::ALL.iter().enumerate() {
            assert_eq!(Dtype::parse(d.as_str()), Some(*d));
            assert_eq!(d.as_str().parse::<Dtype>(), Ok(*d));
            assert_eq!(d.to_string(), d.as_str());
            for e in &Dtype::ALL[i + 1..] {
                assert_ne!(d.as_str(), e.as_str());
            }
        }
        assert_eq!(Dtype::parse("f32"), None);
        assert_eq!(Dtype::parse("F8E4M3"), None);
        assert_eq!("".parse::<Dtype>(), Err(ParseDtypeError(String::new())));
    }

    #[test]
    fn byte_len_of_each_dtype() {
        let expected: &[(Dtype, u64)] = &[
            (Dtype::Bool, 6),
            (Dtype::U8, 6),
            (Dtype::I8, 6),
            (Dtype::F8E5M2, 6),
            (Dtype::F8E4M3, 6),
            (Dtype::F8E8M0, 6),
            (Dtype::I16, 12),
            (Dtype::U16, 12),
            (Dtype::F16, 12),
            (Dtype::BF16, 12),
            (Dtype::I32, 24),
            (Dtype::U32, 24),
            (Dtype::F32, 24),
            (Dtype::C64, 48),
            (Dtype::F64, 48),
            (Dtype::I64, 48),
            (Dtype::U64, 48),
            (Dtype::F4, 3),
            (Dtype::F6E2M3, 9),
            (Dtype::F6E3M2, 9),
        ];
        assert_eq!(expected.len(), Dtype::ALL.len());
        for &(d, bytes) in expected {
            match d {
                // 6 x 6 bits = 36 bits, not a whole number of bytes.
                Dtype::F6E2M3 | Dtype::F6E3M2 => {
                    assert_eq!(d.byte_len(&[2, 3]), None, "{d}");
                    // 4 x 6 bits = 24 bits = 3 bytes; 12 elements = 9 bytes.
                    assert_eq!(d.byte_len(&[4]), Some(3), "{d}");
                    assert_eq!(d.byte_len(&[3, 4]), Some(bytes), "{d}");
                }
                _ => assert_eq!(d.byte_len(&[2, 3]), Some(bytes), "{d}"),
            }
        }
    }

    #[test]
    fn scalars_zero_dims_and_partial_bytes() {
        assert_eq!(Dtype::F32.byte_len(&[]), Some(4));
        assert_eq!(Dtype::Bool.byte_len(&[]), Some(1));
        assert_eq!(Dtype::F4.byte_len(&[]), None, "one F4 is half a byte");
        assert_eq!(Dtype::F4.byte_len(&[3]), None, "odd F4 count");
        assert_eq!(Dtype::F4.byte_len(&[3, 2]), Some(3));
        assert_eq!(Dtype::F32.byte_len(&[0]), Some(0));
        assert_eq!(Dtype::F32.byte_len(&[7, 0, 9]), Some(0));
        assert_eq!(Dtype::F4.byte_len(&[0]), Some(0));
    }

    #[test]
    fn overflow_is_none() {
        assert_eq!(Dtype::U8.byte_len(&[u64::MAX / 8]), Some(u64::MAX / 8));
        assert_eq!(Dtype::U8.byte_len(&[u64::MAX]), None, "the bit count overflows");
        assert_eq!(Dtype::U16.byte_len(&[u64::MAX]), None);
        assert_eq!(Dtype::U8.byte_len(&[u64::MAX, 2]), None);
        assert_eq!(Dtype::U8.byte_len(&[u64::MAX, 2, 0]), None, "upstream overflows first");
        assert_eq!(Dtype::U8.byte_len(&[0, u64::MAX, 2]), Some(0));
        assert_eq!(Dtype::F64.byte_len(&[1 << 58]), None, "2^64 bits");
        assert_eq!(Dtype::F64.byte_len(&[1 << 57]), Some(1 << 60));
    }

    #[test]
    fn serde_uses_the_safetensors_spelling() {
        let json = serde_json::to_string(&Dtype::F8E4M3).unwrap_or_default();
        assert_eq!(json, "\"F8_E4M3\"");
        let back: Result<Dtype, _> = serde_json::from_str("\"F6_E3M2\"");
        assert_eq!(back.ok(), Some(Dtype::F6E3M2));
        assert!(serde_json::from_str::<Dtype>("\"F128\"").is_err());
        assert!(serde_json::from_str::<Dtype>("3").is_err());
    }
}
