//! Parsing of human-friendly sizes and durations at the CLI boundary.

use std::time::Duration;

/// "512M", "1G", "1.5GiB", "64k", "4096" (bytes). Powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a number with an optional unit (k, M, G, T), e.g. 512M"
        ));
    }
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: {num:?} is not a number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {u:?} (use k, M, G or T)"
            ))
        }
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 / 2.0 {
        return Err(format!("invalid size {s:?}: out of range"));
    }
    Ok(v as u64)
}

/// "30s", "5m", "1h", "1500ms", "2.5s", "10" (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid duration {s:?}: expected a number with an optional unit (ms, s, m, h), e.g. 30s"));
    }
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: {num:?} is not a number"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {u:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 366.0 * 86400.0 {
        return Err(format!(
            "invalid duration {s:?}: must be more than 0 and at most a year"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A CPU list in the kernel's syntax: "0", "0-3", "0,2,4-5".
pub fn parse_cpus(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split(',').all(|part| {
            let mut it = part.splitn(2, '-');
            let a = it.next().map(|x| x.parse::<u32>().is_ok()).unwrap_or(false);
            let b = it.next().map(|x| x.parse::<u32>().is_ok()).unwrap_or(true);
            a && b
        });
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid CPU list {s:?}: expected e.g. 0, 0-3 or 0,2"
        ))
    }
}

pub fn parse_cores(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.01..=4096.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "invalid CPU quota {s:?}: expected a number of cores such as 0.5 or 2"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        for bad in ["", "M", "12Q", "-1M", "1..2G", "0", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "0", "5 parsecs", "-3s", "1y"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cpus() {
        assert!(parse_cpus("0").is_ok());
        assert!(parse_cpus("0-1,3").is_ok());
        for bad in ["", "a", "0-", "1,,2"] {
            assert!(parse_cpus(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_cores("0.5").is_ok());
        assert!(parse_cores("0").is_err());
    }
}
