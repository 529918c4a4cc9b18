//! Parsing what agents offer and tasks ask for, as written on the command
//! line: `cpus=4,mem=8GiB,disk=20GiB,ports=8000-8010` and attributes
//! `rack=r1,zone=z1`, and constraints `zone==z1` / `rack!=r2`.

use dprim::tasks::{Constraint, Resources};
use dprim::{Error, Result};
use std::collections::BTreeMap;

const RESOURCE_HELP: &str = "write resources like cpus=4,mem=8GiB,disk=20GiB,ports=8000-8010";

/// Parses a byte size: a number with an optional unit B, KB, MB, GB, TB
/// (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().map_err(|_| {
        Error::invalid(format!("`{text}` is not a size; write e.g. 512MiB or 8GiB"))
    })?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(Error::invalid(format!(
            "unknown size unit `{other}` in `{text}`; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )))
        }
    };
    let bytes = n * scale;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(Error::invalid(format!("size `{text}` is out of range")));
    }
    Ok(bytes.round() as u64)
}

fn parse_ports(text: &str) -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            Error::invalid(format!(
                "`{part}` is not a port or port range (e.g. 8080 or 8000-8010)"
            ))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u16, u16) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(bad());
                }
                ports.extend(a..=b);
            }
            None => ports.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(ports)
}

/// Parses `cpus=4,mem=8GiB,disk=20GiB,ports=8000-8010;9000`.
///
/// # Behavior
/// Unknown names, repeated names, negative or non-numeric amounts and
/// unparseable sizes are `InvalidArgument` naming the offending part.
pub fn parse_resources(text: &str) -> Result<Resources> {
    let mut r = Resources::default();
    let mut seen = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').ok_or_else(|| {
            Error::invalid(format!("`{part}` is not name=value; {RESOURCE_HELP}"))
        })?;
        let name = name.trim();
        if seen.contains(&name) {
            return Err(Error::invalid(format!("resource `{name}` is given twice")));
        }
        seen.push(name);
        match name {
            "cpus" => {
                let cpus: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| Error::invalid(format!("cpus must be a number, got `{value}`")))?;
                if !cpus.is_finite() || cpus < 0.0 {
                    return Err(Error::invalid(format!(
                        "cpus must be zero or more, got `{value}`"
                    )));
                }
                r.cpus = cpus;
            }
            "mem" => r.mem_bytes = parse_bytes(value)?,
            "disk" => r.disk_bytes = parse_bytes(value)?,
            "ports" => r.ports = parse_ports(value)?,
            other => {
                return Err(Error::invalid(format!(
                    "unknown resource `{other}`; known: cpus, mem, disk, ports"
                )))
            }
        }
    }
    Ok(r)
}

/// Parses `rack=r1,zone=z1`.
pub fn parse_attributes(text: &str) -> Result<BTreeMap<String, String>> {
    let mut attrs = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            Error::invalid(format!(
                "attribute `{part}` is not name=value (e.g. zone=z1)"
            ))
        })?;
        if attrs
            .insert(k.trim().to_string(), v.trim().to_string())
            .is_some()
        {
            return Err(Error::invalid(format!(
                "attribute `{}` is given twice",
                k.trim()
            )));
        }
    }
    Ok(attrs)
}

/// Parses one constraint: `zone==z1` or `rack!=r2`.
pub fn parse_constraint(text: &str) -> Result<Constraint> {
    if let Some((k, v)) = text.split_once("!=") {
        return Ok(Constraint::NotEquals(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = text.split_once("==") {
        return Ok(Constraint::Equals(k.trim().into(), v.trim().into()));
    }
    Err(Error::invalid(format!(
        "constraint `{text}` is neither attr==value nor attr!=value"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resources() {
        let r = parse_resources("cpus=4, mem=8GiB,disk=20GB,ports=8000-8002;9000").unwrap();
        assert_eq!(r.cpus, 4.0);
        assert_eq!(r.mem_bytes, 8 * 1024 * 1024 * 1024);
        assert_eq!(r.disk_bytes, 20_000_000_000);
        assert_eq!(r.ports, vec![8000, 8001, 8002, 9000]);
        assert_eq!(
            parse_resources("mem=0.5GiB").unwrap().mem_bytes,
            512 * 1024 * 1024
        );
    }

    #[test]
    fn rejects_bad_resources_by_name() {
        for (text, needle) in [
            ("cpus=-1", "zero or more"),
            ("cpus=lots", "must be a number"),
            ("mem=8XB", "unknown size unit `XB`"),
            ("gpus=1", "unknown resource `gpus`"),
            ("cpus", "not name=value"),
            ("cpus=1,cpus=2", "given twice"),
            ("ports=9-1", "port range"),
        ] {
            let e = parse_resources(text).unwrap_err();
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn parses_attributes_and_constraints() {
        let a = parse_attributes("rack=r1,zone=z1").unwrap();
        assert_eq!(a["zone"], "z1");
        assert_eq!(
            parse_constraint("zone==z1").unwrap(),
            Constraint::Equals("zone".into(), "z1".into())
        );
        assert_eq!(
            parse_constraint("rack!=r2").unwrap(),
            Constraint::NotEquals("rack".into(), "r2".into())
        );
        assert!(parse_constraint("zone=z1").is_err());
    }
}
