//! Calendar arithmetic and RFC 3339 text: the proleptic Gregorian date of a day count and back,
//! RFC 3339 UTC formatting for usage records, and parsing of the timestamps that config files
//! and key providers carry (`expires_at`).
//!
//! Pure functions only: it must not read the clock (callers pass the instant) nor know time
//! zones beyond a numeric UTC offset.

use std::time::{SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01: the inverse of [`days_from_civil`]
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, UTC, formatted in place: one per usage record, no allocation.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339 {
    /// A u64 of seconds is at most a 12-digit year: 32 bytes always fit.
    buf: [u8; 32],
    len: usize,
}

impl Rfc3339 {
    /// `t` in UTC; an instant before the epoch is shown as the epoch.
    pub fn new(t: SystemTime) -> Rfc3339 {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (y, m, d) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        // Digits by hand: `write!` costs more than serializing all the other fields of a record.
        let mut out = Rfc3339 {
            buf: [0; 32],
            len: 0,
        };
        out.digits(y as u64, 4);
        out.push(b'-');
        out.digits(m.into(), 2);
        out.push(b'-');
        out.digits(d.into(), 2);
        out.push(b'T');
        out.digits(rem / 3600, 2);
        out.push(b':');
        out.digits(rem % 3600 / 60, 2);
        out.push(b':');
        out.digits(rem % 60, 2);
        out.push(b'.');
        out.digits(since.subsec_millis().into(), 3);
        out.push(b'Z');
        out
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("ASCII")
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// `n` in decimal, zero-padded to at least `width` digits (`{n:0width$}`).
    fn digits(&mut self, mut n: u64, width: usize) {
        let mut tmp = [b'0'; 20];
        let mut at = tmp.len();
        loop {
            at -= 1;
            tmp[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &b in &tmp[at.min(tmp.len() - width)..] {
            self.push(b);
        }
    }
}

/// Unix seconds from a JSON number or a string holding unix seconds or an RFC 3339 time.
pub fn parse_unix_seconds(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .or_else(|| parse_rfc3339(s.trim())),
        _ => None,
    }
}

/// Unix seconds of `YYYY-MM-DD[T ]HH:MM:SS[.frac](Z|±HH:MM)`, or of a bare date (midnight UTC).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
    {
        return None;
    }
    let days = days_from_civil(y, m as u32, d as u32);
    if b.len() == 10 {
        return u64::try_from(days * 86400).ok();
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' '))
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
    {
        return None;
    }
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    // "Z", or ±HH:MM, ±HHMM, ±HH (PostgreSQL's `timestamptz::text` writes "+00").
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.starts_with('+') || rest.starts_with('-') => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let digits: String = rest[1..].chars().filter(|c| *c != ':').collect();
            if !matches!(digits.len(), 2 | 4) || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let h: i64 = digits[..2].parse().ok()?;
            let m: i64 = digits
                .get(2..)
                .filter(|m| !m.is_empty())
                .map_or(Some(0), |m| m.parse().ok())?;
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss - offset).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        assert_eq!(
            civil_from_days(days_from_civil(2000, 2, 28) + 1),
            (2000, 2, 29)
        );
        assert_eq!(
            civil_from_days(days_from_civil(2024, 2, 28) + 1),
            (2024, 2, 29)
        );
        // 2100 is divisible by 100 but not by 400: no 29 February.
        assert_eq!(
            civil_from_days(days_from_civil(2100, 2, 28) + 1),
            (2100, 3, 1)
        );
        assert_eq!(
            civil_from_days(days_from_civil(2026, 1, 31) + 1),
            (2026, 2, 1)
        );
        assert_eq!(
            civil_from_days(days_from_civil(2026, 4, 30) + 1),
            (2026, 5, 1)
        );
        assert_eq!(
            civil_from_days(days_from_civil(2026, 12, 31) + 1),
            (2027, 1, 1)
        );
    }

    #[test]
    fn day_counts_round_trip() {
        // 1900-01-01 to beyond 2400, covering every kind of century and leap year.
        for days in -25_567..=160_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn rfc3339_known_instants() {
        let rfc3339 = |t| Rfc3339::new(t).as_str().to_owned();
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_768_386_600_123);
        assert_eq!(rfc3339(t), "2026-01-14T10:30:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        let end_of_year = UNIX_EPOCH + Duration::from_secs(4_133_980_799);
        assert_eq!(rfc3339(end_of_year), "2100-12-31T23:59:59.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn formatting_and_parsing_agree() {
        for secs in [0, 951_782_400, 1_768_386_600, 4_107_456_000, 4_133_980_799] {
            let text = Rfc3339::new(UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(
                parse_rfc3339(text.as_str()),
                Some(secs),
                "{}",
                text.as_str()
            );
        }
    }

    #[test]
    fn parses_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-01-14T10:30:00Z"), Some(1768386600));
        assert_eq!(
            parse_rfc3339("2026-01-14T12:30:00.5+02:00"),
            Some(1768386600)
        );
        assert_eq!(parse_rfc3339("2026-01-14"), Some(1768348800));
        assert_eq!(
            parse_rfc3339("2026-01-14 10:30:00.123+00"),
            Some(1768386600)
        );
        assert_eq!(parse_rfc3339("2026-01-14T11:30:00+0100"), Some(1768386600));
        assert_eq!(parse_rfc3339("2026-13-14"), None);
        assert_eq!(parse_rfc3339("2026-01-14T10:30:00"), None);
        assert_eq!(parse_unix_seconds(&serde_json::json!(17)), Some(17));
        assert_eq!(parse_unix_seconds(&serde_json::json!("17")), Some(17));
        assert_eq!(parse_unix_seconds(&serde_json::json!(true)), None);
    }
}
