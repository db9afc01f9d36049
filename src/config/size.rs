//! Sizes in bytes that read and write as `"8MiB"`: the [`Size`] type, [`parse_size`],
//! [`format_size`], and the serde adapter that lets a plain `u64` field of
//! [`Config`](super::Config) use them.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

pub(crate) const KIB: u64 = 1 << 10;
pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;

/// A size in bytes that parses from and prints as a human-readable string.
///
/// Parsing accepts what [`parse_size`] accepts (`"4096"`, `"8MiB"`, `"1.5 GiB"`, `"512k"`);
/// printing gives what [`format_size`] gives (`"8MiB"`), which parses back to the same
/// number. In serde formats a `Size` is written as that string and read from a string or an
/// integer number of bytes.
///
/// ```
/// use uring_ckpt::config::Size;
/// let size: Size = "1.5GiB".parse()?;
/// assert_eq!(size, Size::mib(1536));
/// assert_eq!(size.to_string(), "1.5GiB");
/// assert_eq!(u64::from(size), 3 << 29);
/// # Ok::<(), uring_ckpt::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(pub u64);

impl Size {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Size {
        Size(n * KIB)
    }

    /// `n` MiB.
    pub const fn mib(n: u64) -> Size {
        Size(n * MIB)
    }

    /// `n` GiB.
    pub const fn gib(n: u64) -> Size {
        Size(n * GIB)
    }

    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl From<u64> for Size {
    fn from(bytes: u64) -> Size {
        Size(bytes)
    }
}

impl From<Size> for u64 {
    fn from(size: Size) -> u64 {
        size.0
    }
}

impl FromStr for Size {
    type Err = Error;

    /// See [`parse_size`].
    fn from_str(s: &str) -> Result<Size> {
        parse_size(s).map(Size)
    }
}

impl fmt::Display for Size {
    /// See [`format_size`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(self.0))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Size, D::Error> {
        d.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = Size;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size in bytes (integer) or a string such as \"8MiB\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Size, E> {
        Ok(Size(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Size, E> {
        u64::try_from(v).map(Size).map_err(|_| E::custom(format!("size {v} is negative")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Size, E> {
        parse_size_msg(v).map(Size).map_err(E::custom)
    }
}

/// `#[serde(with = "size::as_size")]` for a `u64` field holding bytes: written and read as a
/// [`Size`].
pub(super) mod as_size {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Size;

    pub(in crate::config) fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        Size(*bytes).serialize(s)
    }

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        Size::deserialize(d).map(u64::from)
    }
}

/// Parses a size: an integer number of bytes (`"4096"`) or a number with a unit, with or
/// without a space (`"8MiB"`, `"8 MiB"`, `"1.5GiB"`, `"512k"`).
///
/// Units, case-insensitive: `B` (or none); `k`, `KiB`, `M`, `MiB`, `G`, `GiB`, `T`, `TiB`,
/// `P`, `PiB`, `E`, `EiB` are powers of 1024; `KB`, `MB`, `GB`, `TB`, `PB`, `EB` are powers
/// of 1000. A fraction is allowed if the result is a whole number of bytes. Negative, empty,
/// malformed and overflowing (> `u64::MAX`) sizes are errors.
///
/// ```
/// use uring_ckpt::config::parse_size;
/// assert_eq!(parse_size("8MiB")?, 8 << 20);
/// assert_eq!(parse_size("8MB")?, 8_000_000);
/// assert_eq!(parse_size("1.5 GiB")?, 3 << 29);
/// assert!(parse_size("99999999999TiB").is_err());
/// # Ok::<(), uring_ckpt::Error>(())
/// ```
pub fn parse_size(s: &str) -> Result<u64> {
    parse_size_msg(s).map_err(Error::Config)
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    let m = match unit.to_ascii_lowercase().as_str() {
        "" | "b" | "byte" | "bytes" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "e" | "ei" | "eib" => 1 << 60,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        "eb" => 1_000_000_000_000_000_000,
        _ => return None,
    };
    Some(m)
}

/// [`parse_size`] with the bare message as the error, for callers that add context.
pub(super) fn parse_size_msg(s: &str) -> std::result::Result<u64, String> {
    let bad = |why: &str| format!("size {s:?} {why}");
    let t = s.trim();
    if t.is_empty() {
        return Err("size is empty".to_owned());
    }
    if t.starts_with('-') {
        return Err(bad("is negative"));
    }
    let num_end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    let unit = unit.trim_start();
    let mult = unit_multiplier(unit).ok_or_else(|| {
        bad(&format!(
            "has an unknown unit {unit:?} (expected B, k/KiB, M/MiB, G/GiB, T/TiB, KB, MB, GB, \
             TB, ...)"
        ))
    })?;
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    if frac_part.contains('.') {
        return Err(bad("has more than one decimal point"));
    }
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(bad("has no number"));
    }
    let too_large = || bad("is too large (more than u64::MAX bytes)");
    let mut int: u128 = 0;
    for d in int_part.bytes() {
        int = int.checked_mul(10).and_then(|v| v.checked_add(u128::from(d - b'0'))).ok_or_else(too_large)?;
    }
    let frac_digits = frac_part.trim_end_matches('0');
    if frac_digits.len() > 19 {
        return Err(bad("has too many decimal places"));
    }
    let mut frac: u128 = 0;
    for d in frac_digits.bytes() {
        frac = frac * 10 + u128::from(d - b'0');
    }
    let denom = 10u128.pow(frac_digits.len() as u32);
    // frac < 10^19 < 2^64 and mult <= 2^60, so the product fits in a u128.
    let frac_bytes = frac * u128::from(mult);
    if frac_bytes % denom != 0 {
        return Err(bad("is not a whole number of bytes"));
    }
    let total = int
        .checked_mul(u128::from(mult))
        .and_then(|v| v.checked_add(frac_bytes / denom))
        .ok_or_else(too_large)?;
    u64::try_from(total).map_err(|_| too_large())
}

/// Formats a size with the largest binary unit that renders it exactly with at most three
/// decimals: `"8MiB"`, `"1.5GiB"`, `"4KiB"`; otherwise in bytes (`"4097B"`).
/// [`parse_size`] reads the result back to the same number.
///
/// ```
/// use uring_ckpt::config::format_size;
/// assert_eq!(format_size(8 << 20), "8MiB");
/// assert_eq!(format_size(3 << 29), "1.5GiB");
/// assert_eq!(format_size(4097), "4097B");
/// ```
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] =
        [("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes < unit {
            continue;
        }
        let whole = bytes >> shift;
        let rem = u128::from(bytes & (unit - 1));
        if rem == 0 {
            return format!("{whole}{name}");
        }
        // rem / unit as a decimal with at most three digits, if it is exact.
        let scaled = rem * 1000;
        if scaled % u128::from(unit) == 0 {
            let frac = format!("{:03}", scaled / u128::from(unit));
            return format!("{whole}.{}{name}", frac.trim_end_matches('0'));
        }
    }
    format!("{bytes}B")
}

/// `1234 (1.5KiB)`-style rendering of a size for error messages: the bytes, and the
/// human-readable form when it differs.
pub(super) fn show_size(bytes: u64) -> String {
    let human = format_size(bytes);
    if human == format!("{bytes}B") {
        bytes.to_string()
    } else {
        format!("{bytes} ({human})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_fractions_and_units() {
        assert_eq!(parse_size_msg("0.5k"), Ok(512));
        assert_eq!(parse_size_msg(".5k"), Ok(512));
        assert_eq!(parse_size_msg("2."), Ok(2));
        assert_eq!(parse_size_msg("1.50000MiB"), Ok(3 << 19));
        assert_eq!(
            parse_size_msg("16EiB"),
            Err("size \"16EiB\" is too large (more than u64::MAX bytes)".to_owned())
        );
        assert_eq!(
            parse_size_msg("15.999EiB").map(|_| ()),
            Err("size \"15.999EiB\" is not a whole number of bytes".to_owned())
        );
        assert!(parse_size_msg("0.1k").is_err());
        assert!(parse_size_msg("1..2k").is_err());
        assert!(parse_size_msg("1.2.3").is_err());
        assert!(parse_size_msg(".").is_err());
        assert!(parse_size_msg("k").is_err());
    }

    #[test]
    fn format_size_picks_exact_units() {
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1023), "1023B");
        assert_eq!(format_size(1024), "1KiB");
        assert_eq!(format_size(1536), "1.5KiB");
        assert_eq!(format_size(GIB + 256 * MIB), "1.25GiB");
        assert_eq!(format_size(GIB + 4096), "1048580KiB");
        assert_eq!(format_size(u64::MAX), format!("{}B", u64::MAX));
        assert_eq!(format_size(1 << 63), "8EiB");
    }

    #[test]
    fn size_serde_reads_integers_and_strings_and_writes_strings() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Doc {
            a: Size,
            #[serde(with = "as_size")]
            b: u64,
        }
        let doc: Doc = toml::from_str("a = 4096\nb = \"8MiB\"").expect("parses");
        assert_eq!(doc, Doc { a: Size::kib(4), b: 8 * MIB });
        assert_eq!(toml::to_string(&doc).expect("serializes"), "a = \"4KiB\"\nb = \"8MiB\"\n");
        let err = toml::from_str::<Doc>("a = -1\nb = 0").expect_err("negative");
        assert!(err.to_string().contains("size -1 is negative"), "{err}");
        assert_eq!(show_size(1536), "1536 (1.5KiB)");
        assert_eq!(show_size(1000), "1000");
    }
}
