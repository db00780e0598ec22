//! The thermal guard: GPU and CPU temperatures in, "cool the background
//! classes" / "restore them" out, with hysteresis and a hold, plus reading
//! the CPU temperature from sysfs.
//!
//! [`ThermalGuard::observe`] answers [`ThermalAction::Cool`] once when any
//! reading is over its configured maximum, and [`ThermalAction::Restore`]
//! once when, after that, every reading is below `max − hysteresis` and at
//! least `hold` has passed since the Cool. A missing reading (`None`) never
//! causes a Cool and never blocks a Restore: a sensor that disappears must
//! not keep the machine throttled.

use std::{fs, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

/// The thermal guard's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThermalConfig {
    /// Cool when the GPU is hotter than this, °C; `None`: GPU not watched.
    pub gpu_max_c: Option<f64>,
    /// Cool when the CPU is hotter than this, °C; `None`: CPU not watched.
    pub cpu_max_c: Option<f64>,
    /// Restore only below `max − hysteresis_c`.
    pub hysteresis_c: f64,
    /// Restore no sooner than this after the Cool.
    pub hold: Duration,
}

/// What the thermal guard asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThermalAction {
    /// Throttle the background classes.
    Cool { reason: String },
    /// Undo the Cool.
    Restore { reason: String },
}

/// Watches temperatures; see the module docs.
#[derive(Debug, Clone)]
pub struct ThermalGuard {
    config: ThermalConfig,
    cooling_since: Option<Duration>,
}

impl ThermalGuard {
    pub fn new(config: ThermalConfig) -> Self {
        Self {
            config,
            cooling_since: None,
        }
    }

    /// When the current Cool began; `None` when not cooling.
    pub fn cooling_since(&self) -> Option<Duration> {
        self.cooling_since
    }

    /// Take the readings at `now` (°C; `None` = unknown).
    pub fn observe(
        &mut self,
        now: Duration,
        gpu_c: Option<f64>,
        cpu_c: Option<f64>,
    ) -> Option<ThermalAction> {
        let sensors = [
            ("GPU", gpu_c, self.config.gpu_max_c),
            ("CPU", cpu_c, self.config.cpu_max_c),
        ];
        match self.cooling_since {
            None => {
                let hot: Vec<String> = sensors
                    .iter()
                    .filter_map(|&(name, reading, max)| {
                        let (reading, max) = (reading?, max?);
                        (reading > max)
                            .then(|| format!("{name} at {reading:.0}°C is over {max:.0}°C"))
                    })
                    .collect();
                if hot.is_empty() {
                    return None;
                }
                self.cooling_since = Some(now);
                Some(ThermalAction::Cool {
                    reason: format!("{}; cooling down the background classes", hot.join(", ")),
                })
            }
            Some(since) => {
                let hysteresis = self.config.hysteresis_c;
                let cool = sensors
                    .iter()
                    .all(|&(_, reading, max)| match (reading, max) {
                        (Some(reading), Some(max)) => reading < max - hysteresis,
                        _ => true,
                    });
                let held = now.saturating_sub(since);
                if !cool || held < self.config.hold {
                    return None;
                }
                self.cooling_since = None;
                let readings: Vec<String> = sensors
                    .iter()
                    .filter_map(|&(name, reading, max)| {
                        let (reading, max) = (reading?, max?);
                        Some(format!(
                            "{name} at {reading:.0}°C (below {:.0}°C)",
                            max - hysteresis
                        ))
                    })
                    .collect();
                let readings = if readings.is_empty() {
                    "no watched temperature is readable".to_owned()
                } else {
                    readings.join(", ")
                };
                Some(ThermalAction::Restore {
                    reason: format!(
                        "{readings} after {}s of cooling; restoring the background classes",
                        held.as_secs()
                    ),
                })
            }
        }
    }
}

/// The hottest CPU-side temperature under `sysfs_root` (normally `/sys`), °C:
/// the largest of `class/thermal/thermal_zone*/temp` and
/// `class/hwmon/hwmon*/temp*_input` (both in millidegrees). Readings that
/// cannot be real (below −40 °C or above 150 °C, as disconnected sensors
/// report) are skipped. `None` when nothing readable is there.
pub fn cpu_temperature(sysfs_root: &Path) -> Option<f64> {
    let mut hottest: Option<f64> = None;
    let mut take = |path: &Path| {
        let Ok(text) = fs::read_to_string(path) else {
            return;
        };
        let Ok(milli) = text.trim().parse::<i64>() else {
            return;
        };
        let celsius = milli as f64 / 1000.0;
        if (-40.0..=150.0).contains(&celsius) {
            hottest = Some(hottest.map_or(celsius, |h: f64| h.max(celsius)));
        }
    };
    for entry in read_dir_prefixed(&sysfs_root.join("class/thermal"), "thermal_zone") {
        take(&entry.join("temp"));
    }
    for hwmon in read_dir_prefixed(&sysfs_root.join("class/hwmon"), "hwmon") {
        for file in read_dir_prefixed(&hwmon, "temp") {
            if file
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("_input"))
            {
                take(&file);
            }
        }
    }
    hottest
}

/// The entries of `dir` whose names start with `prefix`, sorted; none when
/// `dir` cannot be read.
fn read_dir_prefixed(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thermal() -> ThermalGuard {
        ThermalGuard::new(ThermalConfig {
            gpu_max_c: Some(83.0),
            cpu_max_c: Some(90.0),
            hysteresis_c: 5.0,
            hold: Duration::from_secs(60),
        })
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn thermal_cool_then_restore_after_hysteresis_and_hold() {
        let mut guard = thermal();
        assert_eq!(guard.observe(secs(0), Some(70.0), Some(60.0)), None);
        assert_eq!(
            guard.observe(secs(1), Some(83.0), Some(90.0)),
            None,
            "at max is not over"
        );
        let Some(ThermalAction::Cool { reason }) = guard.observe(secs(2), Some(85.0), Some(60.0))
        else {
            panic!("expected Cool");
        };
        assert!(reason.contains("GPU at 85°C is over 83°C"), "{reason}");
        // Still hot: no repeated Cool.
        assert_eq!(guard.observe(secs(3), Some(88.0), Some(95.0)), None);
        // Below max but inside the hysteresis: hold on.
        assert_eq!(guard.observe(secs(100), Some(79.0), Some(60.0)), None);
        // Below max − hysteresis, but the hold has not passed yet.
        let mut early = thermal();
        early.observe(secs(0), Some(90.0), None);
        assert_eq!(early.observe(secs(30), Some(50.0), Some(50.0)), None);
        assert!(matches!(
            early.observe(secs(60), Some(50.0), Some(50.0)),
            Some(ThermalAction::Restore { .. })
        ));
        // Back to the first guard: cool enough and held long enough.
        let Some(ThermalAction::Restore { reason }) =
            guard.observe(secs(101), Some(77.0), Some(84.0))
        else {
            panic!("expected Restore");
        };
        assert!(reason.contains("GPU at 77°C"), "{reason}");
        assert_eq!(guard.cooling_since(), None);
        assert_eq!(guard.observe(secs(102), Some(77.0), Some(84.0)), None);
        // CPU alone can trigger it too.
        assert!(matches!(
            guard.observe(secs(103), Some(40.0), Some(91.0)),
            Some(ThermalAction::Cool { .. })
        ));
    }

    #[test]
    fn thermal_oscillation_does_not_flap() {
        let mut guard = thermal();
        let mut actions = Vec::new();
        // GPU swinging 80..86 °C every second for 10 minutes.
        for t in 0..600u64 {
            let gpu = if t % 2 == 0 { 86.0 } else { 80.0 };
            if let Some(a) = guard.observe(secs(t), Some(gpu), Some(50.0)) {
                actions.push((t, a));
            }
        }
        assert_eq!(actions.len(), 1, "{actions:?}");
    }

    #[test]
    fn thermal_missing_readings() {
        let mut guard = thermal();
        assert_eq!(guard.observe(secs(0), None, None), None);
        guard.observe(secs(1), Some(99.0), None);
        // The GPU reading disappears: that does not keep the machine throttled.
        assert!(matches!(
            guard.observe(secs(61), None, Some(50.0)),
            Some(ThermalAction::Restore { .. })
        ));
        // A sensor without a configured max is not watched.
        let mut gpu_only = ThermalGuard::new(ThermalConfig {
            gpu_max_c: Some(80.0),
            cpu_max_c: None,
            hysteresis_c: 3.0,
            hold: secs(0),
        });
        assert_eq!(gpu_only.observe(secs(0), Some(70.0), Some(120.0)), None);
    }

    #[test]
    fn cpu_temperature_reads_thermal_zones_and_hwmon() {
        let root =
            std::env::temp_dir().join(format!("corral-arbiter-sysfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        assert_eq!(cpu_temperature(&root), None);
        write("class/thermal/thermal_zone0/temp", "45000\n");
        write("class/thermal/thermal_zone1/temp", "51500\n");
        write("class/thermal/cooling_device0/cur_state", "99000\n");
        assert_eq!(cpu_temperature(&root), Some(51.5));
        write("class/hwmon/hwmon0/temp1_input", "67250\n");
        write("class/hwmon/hwmon0/temp1_max", "100000\n");
        write("class/hwmon/hwmon1/temp3_input", "garbage\n");
        write("class/hwmon/hwmon2/temp1_input", "-273000\n"); // disconnected
        write("class/hwmon/hwmon2/temp2_input", "255000\n"); // disconnected
        assert_eq!(cpu_temperature(&root), Some(67.25));
        let _ = fs::remove_dir_all(&root);
    }
}
