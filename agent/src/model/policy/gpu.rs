//! The `[gpu]` section: VRAM budgets per class, the ladder, the thermal
//! guard; merged layer by layer, key by key, and checked against the
//! classes.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use indexmap::IndexMap;
use serde::Deserialize;

use super::{
    COOLED_BY_DEFAULT, Class, GAME, Layer, PolicyError, class_names, find_key, invalid_at,
};
use crate::gpu::{
    arbiter::{Amount, ArbiterConfig, ClassBudget, Step},
    thermal::ThermalConfig,
};

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct GpuSpec {
    enabled: Option<bool>,
    library: Option<PathBuf>,
    poll_interval_ms: Option<u64>,
    grace_ms: Option<u64>,
    margin: Option<Amount>,
    classes: Option<IndexMap<String, toml::Spanned<GpuClassSpec>>>,
    thermal: Option<ThermalSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuClassSpec {
    /// Required where the class first gets a budget; an override may
    /// change any key alone.
    priority: Option<u32>,
    reserve: Option<Amount>,
    min: Option<Amount>,
    max: Option<Amount>,
    ladder: Option<Vec<Step>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThermalSpec {
    gpu_max_c: Option<f64>,
    cpu_max_c: Option<f64>,
    hysteresis_c: Option<f64>,
    hold_ms: Option<u64>,
    classes: Option<toml::Spanned<Vec<String>>>,
}

/// VRAM coordination and the thermal guard.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    pub enabled: bool,
    /// libnvidia-ml to load; None: `libnvidia-ml.so.1` from the loader path.
    pub library: Option<PathBuf>,
    pub poll_interval: Duration,
    pub arbiter: ArbiterConfig,
    pub thermal: ThermalConfig,
    /// `[gpu.thermal] classes`: whose core sets the thermal guard halves
    /// while it is too hot. Kept beside [`ThermalConfig`] rather than in it:
    /// the guard only decides when, and its config is built field by field
    /// elsewhere.
    pub cooled_classes: Vec<String>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: false,
            library: None,
            poll_interval: Duration::from_secs(1),
            arbiter: ArbiterConfig {
                protected_class: GAME.to_owned(),
                grace: Duration::from_secs(5),
                margin: Amount::Percent(5.0),
                classes: Vec::new(),
            },
            thermal: ThermalConfig {
                gpu_max_c: None,
                cpu_max_c: None,
                hysteresis_c: 5.0,
                hold: Duration::from_secs(30),
            },
            cooled_classes: COOLED_BY_DEFAULT.iter().map(|c| (*c).to_owned()).collect(),
        }
    }
}

/// Merges one layer's `[gpu]` into `gpu`.
pub(super) fn merge(
    gpu: &mut GpuConfig,
    layer: &Layer,
    g: &GpuSpec,
    classes: &IndexMap<String, Class>,
) -> Result<(), PolicyError> {
    if let Some(enabled) = g.enabled {
        gpu.enabled = enabled;
    }
    if let Some(library) = &g.library {
        gpu.library = Some(library.clone());
    }
    if let Some(ms) = g.poll_interval_ms {
        gpu.poll_interval = Duration::from_millis(ms.max(50));
    }
    if let Some(ms) = g.grace_ms {
        gpu.arbiter.grace = Duration::from_millis(ms);
    }
    if let Some(margin) = g.margin {
        gpu.arbiter.margin = margin;
    }
    if let Some(classes) = &g.classes {
        // Key by key, like everything else: an override may
        // change one class's `max` alone.
        for (class, spanned) in classes {
            let spec = spanned.get_ref();
            let at = match gpu.arbiter.classes.iter().position(|b| b.class == *class) {
                Some(at) => at,
                None => {
                    let Some(priority) = spec.priority else {
                        return Err(layer.invalid(
                            spanned.span().start,
                            format!("[gpu.classes.{class}]: missing `priority` (1 = highest; the largest number is acted on first)"),
                        ));
                    };
                    gpu.arbiter.classes.push(ClassBudget {
                        class: class.clone(),
                        priority,
                        reserve: None,
                        min: None,
                        max: None,
                        ladder: Vec::new(),
                    });
                    gpu.arbiter.classes.len() - 1
                }
            };
            let budget = &mut gpu.arbiter.classes[at];
            if let Some(priority) = spec.priority {
                budget.priority = priority;
            }
            if spec.reserve.is_some() {
                budget.reserve = spec.reserve;
            }
            if spec.min.is_some() {
                budget.min = spec.min;
            }
            if spec.max.is_some() {
                budget.max = spec.max;
            }
            if let Some(ladder) = &spec.ladder {
                budget.ladder = ladder.clone();
            }
        }
    }
    if let Some(t) = &g.thermal {
        if t.gpu_max_c.is_some() {
            gpu.thermal.gpu_max_c = t.gpu_max_c;
        }
        if t.cpu_max_c.is_some() {
            gpu.thermal.cpu_max_c = t.cpu_max_c;
        }
        if let Some(h) = t.hysteresis_c {
            gpu.thermal.hysteresis_c = h;
        }
        if let Some(ms) = t.hold_ms {
            gpu.thermal.hold = Duration::from_millis(ms);
        }
        if let Some(cooled) = &t.classes {
            check_cooled(layer, cooled, classes)?;
            gpu.cooled_classes = cooled.get_ref().clone();
        }
    }
    Ok(())
}

/// Checks an enabled `[gpu]`: budgets name classes, and the arbiter's own
/// rules hold; errors point at the last layer that has a `[gpu]`.
pub(super) fn validate(
    gpu: &GpuConfig,
    layers: &[Layer],
    classes: &IndexMap<String, Class>,
) -> Result<(), PolicyError> {
    let last = layers
        .iter()
        .rev()
        .find(|l| l.file.gpu.is_some())
        .or(layers.last());
    let fail = |message: String| match last {
        Some(l) => invalid_at(
            &l.path,
            &l.text,
            find_key(&l.text, "gpu")
                .or_else(|| l.text.find("[gpu"))
                .unwrap_or(0),
            message,
        ),
        None => invalid_at(Path::new(""), "", 0, message),
    };
    for budget in &gpu.arbiter.classes {
        if !classes.contains_key(&budget.class) {
            return Err(fail(format!(
                "[gpu.classes.{}]: no such class; define it under [classes]",
                budget.class
            )));
        }
    }
    gpu.arbiter
        .validate()
        .map_err(|e| fail(format!("[gpu]: {e}")))?;
    Ok(())
}

/// Checks `[gpu.thermal] classes` in `layer`: each must be a class with
/// cpus, or there is nothing to halve.
fn check_cooled(
    layer: &Layer,
    cooled: &toml::Spanned<Vec<String>>,
    classes: &IndexMap<String, Class>,
) -> Result<(), PolicyError> {
    for class in cooled.get_ref() {
        if !classes.get(class).is_some_and(Class::is_managed) {
            return Err(layer.invalid(
                cooled.span().start,
                format!(
                    "[gpu.thermal] classes: `{class}` is not a class with cpus, so the thermal guard has no cores of it to halve; use some of: {}",
                    class_names(classes, Class::is_managed)
                ),
            ));
        }
    }
    Ok(())
}
