//! Human-friendly units in the config: byte sizes (`128MiB`) and durations (`60s`), read by
//! the service's config and by each sink's own section (leaf parsers: their errors are the
//! message after the key path).

use std::time::Duration;

/// Parses `1048576`, `64KiB`, `128MiB`, `1GiB`, `10MB`, `1GB` into bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '_' || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. `128MiB`, `1GiB` or `1048576`"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}`; use B, KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    Ok((num * mult as f64) as u64)
}

/// Parses `500ms`, `60s`, `5m`, `1h` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. `500ms`, `60s` or `5m`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_bytes("1_000").unwrap(), 1000);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
    }
}
