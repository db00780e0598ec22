//! GPU figures from NVML (memory, per-process VRAM, utilization, temperature,
//! power), polled on a thread of their own, degrading instead of stopping.
//!
//! # Reading
//!
//! [`Gpu::open`] loads `libnvidia-ml.so.1` (through the loader path, or from
//! an explicit file) and initializes NVML. It fails with a [`GpuError`] that
//! says what that means for the user: no library ([`GpuError::NoLibrary`]),
//! a library but no kernel driver ([`GpuError::DriverNotLoaded`]), a driver
//! that reports no GPU ([`GpuError::NoDevices`]), or anything else
//! ([`GpuError::Nvml`]).
//!
//! [`Gpu::poll`] reads every device into a [`GpuSnapshot`]:
//!
//! - memory (`nvmlDeviceGetMemoryInfo_v2`), name and UUID: required, a
//!   failure fails the poll;
//! - compute and graphics processes (`*RunningProcesses_v3`): required. NVML
//!   counts first and fills a buffer with 5 entries of headroom second; when
//!   more processes than that appear in between it answers
//!   `InsufficientSize`, and the query is tried again, up to 3 more times.
//!   A pid listed twice in one list (one entry per MIG instance) is merged
//!   into one entry of that kind; a pid in both lists appears once per kind.
//!   `usedGpuMemory == NVML_VALUE_NOT_AVAILABLE` (WDDM, some containers)
//!   becomes `used_bytes: None`, never 16 EiB;
//! - utilization, temperature and power: optional, a sensor that fails is
//!   `None` and the poll goes on.
//!
//! An error that means the GPU or the driver went away (`GpuLost`,
//! `Uninitialized`, `DriverNotLoaded`, `ResetRequired`, a handle that no
//! longer resolves, or fewer devices than were seen before) is reported as
//! [`GpuError::Gone`]; [`GpuError::is_gone`] tells the poller to start over.
//!
//! # Polling
//!
//! [`spawn_poller`] runs all of this on a dedicated std thread, so an NVML
//! call that blocks (they can take tens of milliseconds on a busy driver)
//! never stalls the event loop. It sends [`GpuEvent`]s:
//!
//! - [`GpuEvent::On`] whenever NVML becomes usable (also the first time);
//! - [`GpuEvent::Snapshot`] every interval while it is;
//! - [`GpuEvent::Off`] once per outage (NVML cannot be opened at start, or
//!   the GPU vanished mid-run), with a sentence the receiver logs as the one
//!   warning. Opening is then retried quietly (every 30 s by default, see
//!   [`PollerConfig::retry`]) until it works again.
//!
//! A poll error that does not mean the GPU is gone (a permission error, say)
//! is logged when it first appears or changes, and polling goes on.
//!
//! The thread ends when the receiver is dropped: it checks at least every
//! 100 ms while it sleeps, and a send to a closed channel ends it at once.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nvml_wrapper::{
    Nvml, enum_wrappers::device::TemperatureSensor, enums::device::UsedGpuMemory, error::NvmlError,
    struct_wrappers::device::ProcessInfo,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Sender;

/// How many more times a process query is tried after `InsufficientSize`.
const PROCESS_RETRIES: usize = 3;

/// How often a sleeping poller checks whether its receiver is gone.
const CLOSE_CHECK: Duration = Duration::from_millis(100);

/// How long the poller waits between attempts to open NVML while it is off.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(30);

/// What went wrong with NVML, phrased for the user.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// `libnvidia-ml.so.1` could not be loaded (`dlopen` failed).
    #[error(
        "no NVIDIA driver library (libnvidia-ml.so.1) found{}; GPU features are off. \
         Install the NVIDIA driver's NVML library (e.g. libnvidia-ml1 or nvidia-utils) to turn \
         them on ({source})",
        path_note(.path)
    )]
    NoLibrary {
        /// The file that was asked for, `None` for the loader path.
        path: Option<PathBuf>,
        source: NvmlError,
    },
    /// The library is there but the kernel driver is not loaded.
    #[error(
        "the NVIDIA kernel driver is not loaded (libnvidia-ml.so.1 is installed, but NVML says \
         DRIVER_NOT_LOADED); GPU features are off. Check `nvidia-smi` and `modprobe nvidia`; \
         corral turns them on once the driver loads"
    )]
    DriverNotLoaded,
    /// NVML works but lists no GPU.
    #[error(
        "the NVIDIA driver reports no GPU; GPU features are off. Check `nvidia-smi -L`; corral \
         turns them on once a GPU shows up"
    )]
    NoDevices,
    /// The GPU or the driver went away while corral was using it.
    #[error(
        "the GPU went away ({what}); GPU features are off until it comes back. Check \
         `nvidia-smi` and the kernel log (`dmesg | grep -i nvrm`)"
    )]
    Gone {
        /// What was seen, e.g. "GPU 0 memory: the GPU has fallen off the bus...".
        what: String,
    },
    /// Any other NVML failure.
    #[error("NVML call {call}{} failed: {source}; check `nvidia-smi` for the same error", device_note(*.device))]
    Nvml {
        /// The nvml-wrapper call, e.g. "running_compute_processes".
        call: &'static str,
        /// The device index, when the call was about one device.
        device: Option<u32>,
        source: NvmlError,
    },
}

fn path_note(path: &Option<PathBuf>) -> String {
    match path {
        Some(path) => format!(" at {}", path.display()),
        None => String::new(),
    }
}

fn device_note(device: Option<u32>) -> String {
    match device {
        Some(index) => format!(" on GPU {index}"),
        None => String::new(),
    }
}

impl GpuError {
    /// Whether this error means the GPU or the driver went away, so the handle
    /// is useless and NVML must be opened again.
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Gone { .. } | Self::DriverNotLoaded)
    }

    /// Classify an NVML error from a call on an open handle.
    fn from_call(call: &'static str, device: Option<u32>, source: NvmlError) -> Self {
        match source {
            NvmlError::GpuLost
            | NvmlError::Uninitialized
            | NvmlError::DriverNotLoaded
            | NvmlError::ResetRequired
            | NvmlError::LibRmVersionMismatch => Self::Gone {
                what: format!("{call}{}: {source}", device_note(device)),
            },
            source => Self::Nvml {
                call,
                device,
                source,
            },
        }
    }
}

/// Which NVML process list a [`GpuProcess`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    /// A CUDA (compute) context.
    Compute,
    /// An OpenGL/Vulkan (graphics) context.
    Graphics,
}

/// One process with a context on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// VRAM the process uses on this GPU; `None` when NVML says "not
    /// available" (`u64::MAX`), which must never be read as 16 EiB.
    pub used_bytes: Option<u64>,
    pub kind: ProcessKind,
}

/// One GPU at one poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// NVML index.
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// GPU busy share over the driver's last sample period, percent.
    pub utilization_gpu: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_mw: Option<u32>,
    /// Compute processes first, then graphics, each in NVML's order.
    pub processes: Vec<GpuProcess>,
}

/// Every GPU at one poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSnapshot {
    pub devices: Vec<DeviceSnapshot>,
    /// How long the poll took, in microseconds.
    pub poll_us: u64,
}

impl GpuSnapshot {
    /// One GPU of `total_gib` GiB with `free_gib` free, at `temperature_c`,
    /// and `processes` (pid, GiB, kind) on it: a poll for tests and fakes
    /// of the loop.
    pub fn one_gpu(
        total_gib: u64,
        free_gib: u64,
        temperature_c: u32,
        processes: &[(u32, u64, ProcessKind)],
    ) -> Self {
        const GIB: u64 = 1 << 30;
        GpuSnapshot {
            devices: vec![DeviceSnapshot {
                index: 0,
                name: "Test GPU".into(),
                uuid: "GPU-0".into(),
                total_bytes: total_gib * GIB,
                used_bytes: total_gib.saturating_sub(free_gib) * GIB,
                free_bytes: free_gib * GIB,
                utilization_gpu: Some(90),
                temperature_c: Some(temperature_c),
                power_mw: None,
                processes: processes
                    .iter()
                    .map(|&(pid, gib, kind)| GpuProcess {
                        pid,
                        used_bytes: Some(gib * GIB),
                        kind,
                    })
                    .collect(),
            }],
            poll_us: 10,
        }
    }

    /// VRAM per pid over all GPUs: on one GPU the larger of a pid's compute
    /// and graphics figures (both lists report the same process memory),
    /// summed over GPUs. A pid whose figure is not available counts 0 but is
    /// listed, so the caller still knows it holds a context.
    pub fn used_by_pid(&self) -> BTreeMap<u32, u64> {
        let mut total = BTreeMap::new();
        for device in &self.devices {
            let mut on_device: BTreeMap<u32, u64> = BTreeMap::new();
            for process in &device.processes {
                let used = on_device.entry(process.pid).or_default();
                *used = (*used).max(process.used_bytes.unwrap_or(0));
            }
            for (pid, used) in on_device {
                *total.entry(pid).or_insert(0u64) += used;
            }
        }
        total
    }
}

/// An open NVML library.
pub struct Gpu {
    nvml: Nvml,
    /// The most devices seen since open; fewer later means one vanished.
    devices_seen: AtomicU32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("devices_seen", &self.devices_seen.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Load NVML from `lib_path` (or `libnvidia-ml.so.1` through the loader
    /// path when `None`), initialize it, and check that it lists a GPU.
    pub fn open(lib_path: Option<&Path>) -> Result<Gpu, GpuError> {
        let result = match lib_path {
            Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
            None => Nvml::init(),
        };
        let nvml = result.map_err(|source| match source {
            NvmlError::LibloadingError(_) => GpuError::NoLibrary {
                path: lib_path.map(Path::to_path_buf),
                source,
            },
            NvmlError::DriverNotLoaded => GpuError::DriverNotLoaded,
            source => GpuError::Nvml {
                call: "init",
                device: None,
                source,
            },
        })?;
        let count = nvml
            .device_count()
            .map_err(|e| GpuError::from_call("device_count", None, e))?;
        if count == 0 {
            return Err(GpuError::NoDevices);
        }
        Ok(Gpu {
            nvml,
            devices_seen: AtomicU32::new(count),
        })
    }

    /// Read every GPU once. See the module docs for what is required and what
    /// may be `None`.
    pub fn poll(&self) -> Result<GpuSnapshot, GpuError> {
        let started = Instant::now();
        let count = self
            .nvml
            .device_count()
            .map_err(|e| GpuError::from_call("device_count", None, e))?;
        let seen = self.devices_seen.fetch_max(count, Ordering::Relaxed);
        if count < seen {
            return Err(GpuError::Gone {
                what: format!("the driver now lists {count} GPU(s), it listed {seen}"),
            });
        }
        let devices = (0..count)
            .map(|index| self.poll_device(index))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GpuSnapshot {
            devices,
            poll_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    fn poll_device(&self, index: u32) -> Result<DeviceSnapshot, GpuError> {
        let at = Some(index);
        let device = self.nvml.device_by_index(index).map_err(|e| match e {
            // The count said this index exists; a handle that does not
            // resolve means the device left in between.
            NvmlError::InvalidArg | NvmlError::NotFound => GpuError::Gone {
                what: format!("GPU {index} no longer has a handle: {e}"),
            },
            e => GpuError::from_call("device_by_index", at, e),
        })?;
        let memory = device
            .memory_info()
            .map_err(|e| GpuError::from_call("memory_info", at, e))?;
        let name = device
            .name()
            .map_err(|e| GpuError::from_call("name", at, e))?;
        let uuid = device
            .uuid()
            .map_err(|e| GpuError::from_call("uuid", at, e))?;
        let mut processes = with_retries(|| device.running_compute_processes())
            .map(|list| merge(list, ProcessKind::Compute))
            .map_err(|e| GpuError::from_call("running_compute_processes", at, e))?;
        processes.extend(
            with_retries(|| device.running_graphics_processes())
                .map(|list| merge(list, ProcessKind::Graphics))
                .map_err(|e| GpuError::from_call("running_graphics_processes", at, e))?,
        );
        // Sensors: a failing one is unknown, not a failed poll. A lost GPU
        // shows up in the required calls above first.
        let utilization_gpu = device.utilization_rates().ok().map(|u| u.gpu);
        let temperature_c = device.temperature(TemperatureSensor::Gpu).ok();
        let power_mw = device.power_usage().ok();
        Ok(DeviceSnapshot {
            index,
            name,
            uuid,
            total_bytes: memory.total,
            used_bytes: memory.used,
            free_bytes: memory.free,
            utilization_gpu,
            temperature_c,
            power_mw,
            processes,
        })
    }
}

/// Run a process query, again up to [`PROCESS_RETRIES`] times while NVML
/// answers `InsufficientSize` (more than 5 processes appeared between its
/// count and fill calls).
fn with_retries(
    mut query: impl FnMut() -> Result<Vec<ProcessInfo>, NvmlError>,
) -> Result<Vec<ProcessInfo>, NvmlError> {
    let mut attempt = 0;
    loop {
        match query() {
            Err(NvmlError::InsufficientSize(_)) if attempt < PROCESS_RETRIES => attempt += 1,
            result => return result,
        }
    }
}

/// One entry per pid, in first-seen order; duplicates (one per MIG instance)
/// add up, and one unknown figure makes the pid's figure unknown.
fn merge(list: Vec<ProcessInfo>, kind: ProcessKind) -> Vec<GpuProcess> {
    let mut out: Vec<GpuProcess> = Vec::with_capacity(list.len());
    for info in list {
        let used = match info.used_gpu_memory {
            UsedGpuMemory::Used(bytes) if bytes != u64::MAX => Some(bytes),
            _ => None,
        };
        if let Some(seen) = out.iter_mut().find(|p| p.pid == info.pid) {
            seen.used_bytes = seen.used_bytes.zip(used).map(|(a, b)| a.saturating_add(b));
        } else {
            out.push(GpuProcess {
                pid: info.pid,
                used_bytes: used,
                kind,
            });
        }
    }
    out
}

/// What the poller tells the event loop.
#[derive(Debug, Clone)]
pub enum GpuEvent {
    /// NVML opened and lists a GPU; snapshots follow.
    On,
    /// GPU features are off; `reason` is the sentence to log (once). Sent
    /// once per outage, however long it lasts.
    Off { reason: String },
    /// One poll.
    Snapshot(GpuSnapshot),
}

/// How [`spawn_poller_with`] runs.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// The NVML library file; `None` loads `libnvidia-ml.so.1` through the
    /// loader path.
    pub lib_path: Option<PathBuf>,
    /// Time between polls while NVML works.
    pub interval: Duration,
    /// Time between attempts to open NVML while it does not
    /// ([`DEFAULT_RETRY`], 30 s, by default).
    pub retry: Duration,
}

impl PollerConfig {
    /// Poll every `interval`, retry opening every [`DEFAULT_RETRY`].
    pub fn new(lib_path: Option<PathBuf>, interval: Duration) -> Self {
        Self {
            lib_path,
            interval,
            retry: DEFAULT_RETRY,
        }
    }
}

/// Start the poller thread with the default 30 s retry; see the module docs.
pub fn spawn_poller(
    lib_path: Option<PathBuf>,
    interval: Duration,
    tx: Sender<GpuEvent>,
) -> JoinHandle<()> {
    spawn_poller_with(PollerConfig::new(lib_path, interval), tx)
}

/// Start the poller thread (named `corral-gpu`); it ends when `tx`'s
/// receiver is dropped.
///
/// # Panics
/// When the OS cannot start a thread.
pub fn spawn_poller_with(config: PollerConfig, tx: Sender<GpuEvent>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("corral-gpu".to_owned())
        .spawn(move || run_poller(&config, &tx))
        .expect("cannot start the GPU poller thread")
}

fn run_poller(config: &PollerConfig, tx: &Sender<GpuEvent>) {
    // Whether Off was sent for the outage in progress.
    let mut off_sent = false;
    loop {
        let gpu = match Gpu::open(config.lib_path.as_deref()) {
            Ok(gpu) => gpu,
            Err(e) => {
                if off_sent {
                    tracing::debug!("NVML still unavailable: {e}");
                } else {
                    off_sent = true;
                    let reason = e.to_string();
                    if tx.blocking_send(GpuEvent::Off { reason }).is_err() {
                        return;
                    }
                }
                if !sleep_unless_closed(tx, config.retry) {
                    return;
                }
                continue;
            }
        };
        // From here the only way back to opening is through an Off, which
        // sets `off_sent` again.
        if tx.blocking_send(GpuEvent::On).is_err() {
            return;
        }
        let mut last_error: Option<String> = None;
        loop {
            let started = Instant::now();
            match gpu.poll() {
                Ok(snapshot) => {
                    if last_error.take().is_some() {
                        tracing::info!("GPU polling works again");
                    }
                    if tx.blocking_send(GpuEvent::Snapshot(snapshot)).is_err() {
                        return;
                    }
                }
                Err(e) if e.is_gone() => {
                    off_sent = true;
                    let reason = e.to_string();
                    if tx.blocking_send(GpuEvent::Off { reason }).is_err() {
                        return;
                    }
                    break;
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!("GPU poll failed, will keep trying: {text}");
                        last_error = Some(text);
                    }
                }
            }
            if !sleep_unless_closed(tx, config.interval.saturating_sub(started.elapsed())) {
                return;
            }
        }
        drop(gpu);
        if !sleep_unless_closed(tx, config.retry) {
            return;
        }
    }
}

/// Sleep for `duration`, waking every [`CLOSE_CHECK`] to see whether the
/// receiver is gone. Returns `false` when it is.
fn sleep_unless_closed(tx: &Sender<GpuEvent>, duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    loop {
        if tx.is_closed() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(CLOSE_CHECK));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, used: UsedGpuMemory) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: used,
            gpu_instance_id: None,
            compute_instance_id: None,
        }
    }

    #[test]
    fn merge_dedups_and_keeps_unknown_unknown() {
        let list = vec![
            info(1, UsedGpuMemory::Used(10)),
            info(2, UsedGpuMemory::Unavailable),
            info(1, UsedGpuMemory::Used(5)),
            info(3, UsedGpuMemory::Used(u64::MAX)),
        ];
        let merged = merge(list, ProcessKind::Compute);
        let got: Vec<(u32, Option<u64>)> = merged.iter().map(|p| (p.pid, p.used_bytes)).collect();
        assert_eq!(got, [(1, Some(15)), (2, None), (3, None)]);
    }

    #[test]
    fn retries_insufficient_size_three_more_times() {
        let mut calls = 0;
        let result = with_retries(|| {
            calls += 1;
            Err(NvmlError::InsufficientSize(None))
        });
        assert!(matches!(result, Err(NvmlError::InsufficientSize(_))));
        assert_eq!(calls, 1 + PROCESS_RETRIES);

        let mut calls = 0;
        let result = with_retries(|| {
            calls += 1;
            if calls < 3 {
                Err(NvmlError::InsufficientSize(Some(9)))
            } else {
                Ok(vec![info(7, UsedGpuMemory::Used(1))])
            }
        });
        assert_eq!(result.unwrap().len(), 1);
    }

    #[test]
    fn used_by_pid_takes_max_per_device_and_sums_devices() {
        let device = |index, processes| DeviceSnapshot {
            index,
            name: "gpu".into(),
            uuid: format!("GPU-{index}"),
            total_bytes: 100,
            used_bytes: 0,
            free_bytes: 100,
            utilization_gpu: None,
            temperature_c: None,
            power_mw: None,
            processes,
        };
        let p = |pid, used_bytes, kind| GpuProcess {
            pid,
            used_bytes,
            kind,
        };
        let snapshot = GpuSnapshot {
            devices: vec![
                device(
                    0,
                    vec![
                        p(1, Some(30), ProcessKind::Compute),
                        p(1, Some(20), ProcessKind::Graphics),
                        p(2, None, ProcessKind::Graphics),
                    ],
                ),
                device(1, vec![p(1, Some(5), ProcessKind::Compute)]),
            ],
            poll_us: 0,
        };
        let used = snapshot.used_by_pid();
        assert_eq!(used.get(&1), Some(&35));
        assert_eq!(used.get(&2), Some(&0));
    }

    #[test]
    fn gone_errors_are_recognized() {
        for e in [
            NvmlError::GpuLost,
            NvmlError::Uninitialized,
            NvmlError::DriverNotLoaded,
        ] {
            assert!(GpuError::from_call("memory_info", Some(0), e).is_gone());
        }
        assert!(!GpuError::from_call("memory_info", Some(0), NvmlError::NoPermission).is_gone());
        let text = GpuError::from_call("name", Some(1), NvmlError::NoPermission).to_string();
        assert!(text.contains("name on GPU 1"), "{text}");
    }
}
