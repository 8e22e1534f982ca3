//! Human-friendly durations ("1m30s", "500ms", 2.5) and byte sizes ("32MiB", "10k", 1048576).
//!
//! The seed config is Go-flavoured (`timeout: 3s`), so durations follow Go's `time.ParseDuration`
//! units; a bare number means seconds because that is what people write in YAML.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Fraction digits beyond this are dropped: keeps `10^digits` far from u128 overflow
/// while staying finer than a nanosecond or a byte for any sane input.
const MAX_FRACTION_DIGITS: usize = 18;

/// Splits a leading unsigned decimal number ("12", "1.5", ".5") off `s`.
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// `number * unit`, exact for the integer part; `None` if malformed or overflowing.
fn scale(number: &str, unit: u128) -> Option<u128> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac = &frac[..frac.len().min(MAX_FRACTION_DIGITS)];
    let frac_value = if frac.is_empty() {
        0
    } else {
        let digits: u128 = frac.parse().ok()?;
        digits.checked_mul(unit)? / 10u128.pow(frac.len() as u32)
    };
    int.checked_mul(unit)?.checked_add(frac_value)
}

fn duration_unit(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => NANOS_PER_SEC,
        "m" => 60 * NANOS_PER_SEC,
        "h" => 3600 * NANOS_PER_SEC,
        // Not in Go; retention periods are written in days.
        "d" => 86_400 * NANOS_PER_SEC,
        _ => return None,
    })
}

/// Parses "3s", "500ms", "1m30s", "250us", "1.5h" or a bare number of seconds ("10", "0.5").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid duration {text:?}: expected e.g. \"30s\", \"500ms\", \"1m30s\" or a number of seconds"
        )
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(invalid());
    }
    let (number, rest) = split_number(s);
    let nanos = if rest.is_empty() {
        scale(number, NANOS_PER_SEC).ok_or_else(invalid)?
    } else {
        let mut total: u128 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let (number, after) = split_number(rest);
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            let unit = duration_unit(unit).ok_or_else(invalid)?;
            let part = scale(number, unit).ok_or_else(invalid)?;
            total = total.checked_add(part).ok_or_else(invalid)?;
            rest = after;
        }
        total
    };
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| invalid())?;
    Ok(Duration::new(secs, (nanos % NANOS_PER_SEC) as u32))
}

fn size_unit(unit: &str) -> Option<u128> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return None,
    })
}

/// Parses "32MiB", "512KiB", "1MB", "10k" or a bare number of bytes.
/// KiB/MiB/GiB and k/m/g are binary, KB/MB/GB decimal.
pub(super) fn parse_size(text: &str) -> Result<usize, String> {
    let invalid = || {
        format!(
            "invalid size {text:?}: expected bytes or e.g. \"512KiB\", \"32MiB\", \"1MB\", \"10k\""
        )
    };
    let (number, unit) = split_number(text.trim());
    let unit = size_unit(unit.trim_start()).ok_or_else(invalid)?;
    let bytes = scale(number, unit).ok_or_else(invalid)?;
    usize::try_from(bytes).map_err(|_| invalid())
}

/// A duration field as written in the config file.
#[derive(Debug, Clone, Copy)]
pub(super) struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration like \"30s\", \"500ms\", \"1m30s\" or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(DurationValue(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                let secs = u64::try_from(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))?;
                Ok(DurationValue(Duration::from_secs(secs)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Duration::try_from_secs_f64(v)
                    .map(DurationValue)
                    .map_err(|_| E::invalid_value(de::Unexpected::Float(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_duration(v).map(DurationValue).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A byte-size field as written in the config file.
#[derive(Debug, Clone, Copy)]
pub(super) struct SizeValue(pub usize);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes or like \"512KiB\", \"32MiB\", \"1MB\", \"10k\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                usize::try_from(v)
                    .map(SizeValue)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                usize::try_from(v)
                    .map(SizeValue)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_size(v).map(SizeValue).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("3s"), Ok(ms(3000)));
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("1m"), Ok(ms(60_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("10"), Ok(ms(10_000)));
        assert_eq!(parse_duration(" 0.25 "), Ok(ms(250)));
        for bad in ["", "s", "3x", "1.2.3s", "-1s", "3 s", "1m30", "ms500"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("10k"), Ok(10 << 10));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "MiB", "12 parsecs", "-1", "99999999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
