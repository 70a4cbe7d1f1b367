//! `uxenctl merge --auto`: background re-merging's knobs, the driver's
//! module parameters `merge_interval_ms` and `merge_batch`, written under
//! `/sys/module/uxen/parameters/`.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where the driver's parameters live.
pub const PARAMS_DIR: &str = "/sys/module/uxen/parameters";

/// The interval `--auto` sets when none is given and merging was off.
pub const DEFAULT_INTERVAL_MS: u32 = 100;
/// Limits the driver enforces too (`merge_params.c`).
pub const INTERVAL_MAX_MS: u32 = 3_600_000;
pub const BATCH_MAX: u32 = 65_536;

/// What `--auto` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Auto {
    Off,
    On { interval_ms: Option<u32>, batch: Option<u32> },
}

/// Reads `--auto [on|off] [--interval MS] [--batch N]`; every bad value is
/// refused with a message before anything is written.
pub fn parse(auto: &str, interval: Option<&str>, batch: Option<&str>) -> Result<Auto> {
    let num = |what: &str, s: &str, lo: u32, hi: u32| -> Result<u32> {
        let v: u32 = s.trim().parse().map_err(|_| anyhow!("--{what}: `{s}` is not a number"))?;
        if v < lo || v > hi {
            bail!("--{what}: {v} is out of range ({lo} to {hi})");
        }
        Ok(v)
    };
    match auto {
        "off" => {
            if interval.is_some() || batch.is_some() {
                bail!("--auto off takes no --interval or --batch");
            }
            Ok(Auto::Off)
        }
        "on" => Ok(Auto::On {
            interval_ms: interval.map(|s| num("interval", s, 1, INTERVAL_MAX_MS)).transpose()?,
            batch: batch.map(|s| num("batch", s, 1, BATCH_MAX)).transpose()?,
        }),
        other => bail!("--auto takes `off` or nothing, not `{other}`"),
    }
}

fn read(dir: &Path, name: &str) -> Result<u32> {
    let p = dir.join(name);
    let s = std::fs::read_to_string(&p).with_context(|| format!("cannot read {} (is uxen.ko loaded?)", p.display()))?;
    s.trim().parse().map_err(|_| anyhow!("{}: unexpected contents `{}`", p.display(), s.trim()))
}

fn write(dir: &Path, name: &str, v: u32) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, format!("{v}\n")).with_context(|| format!("cannot write {} (is uxen.ko loaded, and are you root?)", p.display()))
}

/// The knobs as they stand: (interval in ms, 0 = off; batch).
pub fn current(dir: &Path) -> Result<(u32, u32)> {
    Ok((read(dir, "merge_interval_ms")?, read(dir, "merge_batch")?))
}

/// Applies `a`; returns the knobs as they then stand.
pub fn apply(dir: &Path, a: &Auto) -> Result<(u32, u32)> {
    match *a {
        Auto::Off => write(dir, "merge_interval_ms", 0)?,
        Auto::On { interval_ms, batch } => {
            // The batch first: the thread wakes at the interval's write.
            if let Some(b) = batch {
                write(dir, "merge_batch", b)?;
            }
            let now = read(dir, "merge_interval_ms")?;
            let i = interval_ms.unwrap_or(if now == 0 { DEFAULT_INTERVAL_MS } else { now });
            write(dir, "merge_interval_ms", i)?;
        }
    }
    current(dir)
}

pub fn params_dir() -> PathBuf {
    std::env::var_os("UXEN_PARAMS_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(PARAMS_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_bad_values() {
        assert_eq!(parse("off", None, None).unwrap(), Auto::Off);
        assert_eq!(parse("on", None, None).unwrap(), Auto::On { interval_ms: None, batch: None });
        assert_eq!(parse("on", Some("250"), Some("64")).unwrap(), Auto::On { interval_ms: Some(250), batch: Some(64) });
        for (i, b) in [(None, Some("0")), (None, Some("x")), (Some("0"), None), (Some("-5"), None), (None, Some("65537")), (Some("9999999"), None)] {
            assert!(parse("on", i, b).is_err(), "{i:?} {b:?}");
        }
        assert!(parse("off", Some("10"), None).is_err());
        assert!(parse("maybe", None, None).is_err());
    }

    #[test]
    fn applies_to_the_parameter_files() {
        let d = std::env::temp_dir().join(format!("uxen-auto-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("merge_interval_ms"), "0\n").unwrap();
        std::fs::write(d.join("merge_batch"), "32\n").unwrap();
        assert_eq!(apply(&d, &Auto::On { interval_ms: None, batch: None }).unwrap(), (DEFAULT_INTERVAL_MS, 32));
        assert_eq!(apply(&d, &Auto::On { interval_ms: None, batch: Some(7) }).unwrap(), (DEFAULT_INTERVAL_MS, 7));
        assert_eq!(apply(&d, &Auto::On { interval_ms: Some(20), batch: None }).unwrap(), (20, 7));
        assert_eq!(apply(&d, &Auto::Off).unwrap(), (0, 7));
        std::fs::remove_dir_all(&d).unwrap();
        assert!(apply(&d, &Auto::Off).is_err());
    }
}
