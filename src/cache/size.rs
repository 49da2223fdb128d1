//! The amounts operators give the cache flags: bytes (`50G`, `512M`, `1048576`) or a share of
//! a filesystem (`30%`), and ages (`7d`, `12h`, `30m`, `90s`).

use std::fmt;
use std::time::Duration;

/// Errors of reading an amount or an age.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size like 50G, 512M, 1048576 or 30%")]
    BadSize(String),
    #[error("{0:?} is not a percentage between 0 and 100")]
    BadPercent(String),
    #[error("{0:?} is not an age like 7d, 12h, 30m or 90s")]
    BadAge(String),
}

/// An amount of a filesystem: bytes, or a share of its size (or of its inodes, for inode
/// thresholds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Bytes(u64),
    Percent(f64),
}

impl Amount {
    /// Parses `50G`, `512M`, `64K`, `1T`, plain bytes, or `30%` (a share of the filesystem).
    pub fn parse(s: &str) -> Result<Amount, SizeError> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| SizeError::BadPercent(s.to_string()))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(SizeError::BadPercent(s.to_string()));
            }
            return Ok(Amount::Percent(v));
        }
        let (num, shift) = match t.chars().last() {
            Some('K' | 'k') => (&t[..t.len() - 1], 10),
            Some('M' | 'm') => (&t[..t.len() - 1], 20),
            Some('G' | 'g') => (&t[..t.len() - 1], 30),
            Some('T' | 't') => (&t[..t.len() - 1], 40),
            _ => (t, 0),
        };
        let n: u64 = num.trim().parse().map_err(|_| SizeError::BadSize(s.to_string()))?;
        n.checked_mul(1u64 << shift).map(Amount::Bytes).ok_or_else(|| SizeError::BadSize(s.to_string()))
    }

    /// The amount for a filesystem of `total` bytes (or inodes).
    pub fn of(self, total: u64) -> u64 {
        match self {
            Amount::Bytes(b) => b,
            Amount::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Bytes(b) => f.write_str(&human_bytes(*b)),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Bytes for people: `812 B`, `38 MiB`, `4.2 GiB`, `120 GiB`.
pub fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let v = b as f64;
    if v >= 10.0 * GIB {
        format!("{:.0} GiB", v / GIB)
    } else if v >= GIB {
        format!("{:.1} GiB", v / GIB)
    } else if v >= MIB {
        format!("{:.0} MiB", v / MIB)
    } else if b >= 1024 {
        format!("{:.0} KiB", v / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Parses an age: `7d`, `12h`, `30m`, `90s` (or plain seconds).
pub fn parse_age(s: &str) -> Result<Duration, SizeError> {
    let t = s.trim();
    let (num, unit) = match t.chars().last() {
        Some('d') => (&t[..t.len() - 1], 86_400),
        Some('h') => (&t[..t.len() - 1], 3_600),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('s') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| SizeError::BadAge(s.to_string()))?;
    n.checked_mul(unit).map(Duration::from_secs).ok_or_else(|| SizeError::BadAge(s.to_string()))
}

/// An age for people: `40s`, `12m`, `5h`, `3d`.
pub fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bytes_or_shares() {
        assert_eq!(Amount::parse("50G").unwrap(), Amount::Bytes(50 << 30));
        assert_eq!(Amount::parse("512m").unwrap(), Amount::Bytes(512 << 20));
        assert_eq!(Amount::parse("1048576").unwrap(), Amount::Bytes(1 << 20));
        assert_eq!(Amount::parse(" 30% ").unwrap(), Amount::Percent(30.0));
        assert_eq!(Amount::parse("30%").unwrap().of(1000), 300);
        assert_eq!(Amount::parse("2.5%").unwrap().of(1000), 25);
        assert_eq!(Amount::parse("1K").unwrap().of(7), 1024, "bytes do not depend on the filesystem");
        for bad in ["", "G", "12X", "-1", "101%", "x%", "99999999999T"] {
            assert!(Amount::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ages_and_sizes_read_well() {
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_age("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("30m").unwrap(), Duration::from_secs(1800));
        assert!(parse_age("soon").is_err());
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(38 << 20), "38 MiB");
        assert_eq!(human_bytes((4 << 30) + (1 << 29)), "4.5 GiB");
        assert_eq!(human_bytes(120 << 30), "120 GiB");
        assert_eq!(human_age(Duration::from_secs(3 * 86_400)), "3d");
        assert_eq!(human_age(Duration::from_secs(40)), "40s");
    }
}
