//! The fake's state file: the JSON a test writes and the fake library re-reads on every call.
//!
//! Schema (every field but `devices[].name` and `devices[].total_mib` may be left out):
//!
//! ```json
//! {
//!   "init_error": null,                 // or an nvmlReturn_t code that nvmlInit* returns, e.g. 9
//!   "driver_version": "550.54.15",
//!   "nvml_version": null,               // null: "12." + driver_version
//!   "devices": [{
//!     "name": "NVIDIA GeForce RTX 4090",
//!     "uuid": null,                     // null: "GPU-00000000-0000-0000-0000-<index, 12 digits>"
//!     "total_mib": 24564,
//!     "used_mib": 0,
//!     "reserved_mib": 0,
//!     "temperature_c": 40,
//!     "power_mw": 30000,
//!     "utilization_gpu": 0,
//!     "utilization_memory": 0,
//!     "clocks_mhz": {"graphics": 210, "sm": 210, "memory": 405, "video": 555},
//!     "processes": [{"pid": 4242, "used_mib": 1024, "kind": "compute"}]  // used_mib null: not available
//!   }],
//!   "errors": {"nvmlDeviceGetMemoryInfo_v2": 15},  // forced return code per exported function
//!   "vanish_between_count_calls": 0,
//!   "appear_between_count_calls": 0
//! }
//! ```
//!
//! Unknown keys are rejected, so a typo in a test fails loudly (the fake then returns
//! `NVML_ERROR_UNKNOWN` from every call and prints why on stderr).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Whole state of the fake machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FakeState {
    /// When set, `nvmlInit_v2` / `nvmlInitWithFlags` return this code (9 = driver not loaded).
    pub init_error: Option<u32>,
    /// What `nvmlSystemGetDriverVersion` reports.
    pub driver_version: String,
    /// What `nvmlSystemGetNVMLVersion` reports; `None` gives `"12." + driver_version`.
    pub nvml_version: Option<String>,
    /// The GPUs, in index order.
    pub devices: Vec<FakeDevice>,
    /// Forced return codes, keyed by exported function name (e.g. `"nvmlDeviceGetMemoryInfo_v2"`).
    /// A forced code is returned before the function does anything else.
    pub errors: BTreeMap<String, u32>,
    /// The first N processes (of the queried kind, in file order) disappear between the
    /// count call (`*count == 0`) and the fill call of a `*RunningProcesses_v3` query.
    pub vanish_between_count_calls: u32,
    /// N extra processes (pids 4_000_000.., 1 MiB each) appear between the count call and
    /// the fill call of a `*RunningProcesses_v3` query.
    pub appear_between_count_calls: u32,
}

impl Default for FakeState {
    fn default() -> Self {
        Self {
            init_error: None,
            driver_version: "550.54.15".to_owned(),
            nvml_version: None,
            devices: Vec::new(),
            errors: BTreeMap::new(),
            vanish_between_count_calls: 0,
            appear_between_count_calls: 0,
        }
    }
}

impl FakeState {
    /// A machine with the driver loaded and no GPUs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a GPU (its index is its position).
    pub fn device(mut self, device: FakeDevice) -> Self {
        self.devices.push(device);
        self
    }

    /// Make `nvmlInit*` fail with `code` (9 = `NVML_ERROR_DRIVER_NOT_LOADED`).
    pub fn init_error(mut self, code: u32) -> Self {
        self.init_error = Some(code);
        self
    }

    /// Set the reported driver version.
    pub fn driver_version(mut self, version: impl Into<String>) -> Self {
        self.driver_version = version.into();
        self
    }

    /// Force `function` (an exported symbol name) to return `code`.
    pub fn error(mut self, function: impl Into<String>, code: u32) -> Self {
        self.errors.insert(function.into(), code);
        self
    }

    /// Make the first `n` processes vanish between a process query's count and fill calls.
    pub fn vanish_between_count_calls(mut self, n: u32) -> Self {
        self.vanish_between_count_calls = n;
        self
    }

    /// Make `n` processes appear between a process query's count and fill calls.
    pub fn appear_between_count_calls(mut self, n: u32) -> Self {
        self.appear_between_count_calls = n;
        self
    }

    /// Write the state as JSON, atomically (temporary file + rename), so the fake never
    /// reads a half-written file while another thread polls.
    pub fn write(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let path = path.as_ref();
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }

    /// Read a state file.
    pub fn read(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeDevice {
    /// `nvmlDeviceGetName`.
    pub name: String,
    /// `nvmlDeviceGetUUID`; `None` gives `GPU-00000000-0000-0000-0000-<index, 12 digits>`.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Installed memory.
    pub total_mib: u64,
    /// Allocated memory (not derived from `processes`: set both).
    #[serde(default)]
    pub used_mib: u64,
    /// Memory the driver reserves (`nvmlMemory_v2_t.reserved`).
    #[serde(default)]
    pub reserved_mib: u64,
    /// `nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)`.
    #[serde(default = "default_temperature")]
    pub temperature_c: u32,
    /// `nvmlDeviceGetPowerUsage`, milliwatts.
    #[serde(default = "default_power")]
    pub power_mw: u32,
    /// `nvmlDeviceGetUtilizationRates().gpu`, percent.
    #[serde(default)]
    pub utilization_gpu: u32,
    /// `nvmlDeviceGetUtilizationRates().memory`, percent.
    #[serde(default)]
    pub utilization_memory: u32,
    /// `nvmlDeviceGetClockInfo`.
    #[serde(default)]
    pub clocks_mhz: FakeClocks,
    /// Processes with a context on this GPU.
    #[serde(default)]
    pub processes: Vec<FakeProcess>,
}

fn default_temperature() -> u32 {
    40
}

fn default_power() -> u32 {
    30_000
}

impl FakeDevice {
    /// An idle GPU with `total_mib` of memory.
    pub fn new(name: impl Into<String>, total_mib: u64) -> Self {
        Self {
            name: name.into(),
            uuid: None,
            total_mib,
            used_mib: 0,
            reserved_mib: 0,
            temperature_c: default_temperature(),
            power_mw: default_power(),
            utilization_gpu: 0,
            utilization_memory: 0,
            clocks_mhz: FakeClocks::default(),
            processes: Vec::new(),
        }
    }

    /// Set the UUID.
    pub fn uuid(mut self, uuid: impl Into<String>) -> Self {
        self.uuid = Some(uuid.into());
        self
    }

    /// Set the allocated memory.
    pub fn used_mib(mut self, mib: u64) -> Self {
        self.used_mib = mib;
        self
    }

    /// Set the driver-reserved memory.
    pub fn reserved_mib(mut self, mib: u64) -> Self {
        self.reserved_mib = mib;
        self
    }

    /// Set the temperature.
    pub fn temperature_c(mut self, celsius: u32) -> Self {
        self.temperature_c = celsius;
        self
    }

    /// Set the power draw.
    pub fn power_mw(mut self, milliwatts: u32) -> Self {
        self.power_mw = milliwatts;
        self
    }

    /// Set the utilization rates, percent.
    pub fn utilization(mut self, gpu: u32, memory: u32) -> Self {
        self.utilization_gpu = gpu;
        self.utilization_memory = memory;
        self
    }

    /// Add a process.
    pub fn process(mut self, process: FakeProcess) -> Self {
        self.processes.push(process);
        self
    }

    /// The UUID the fake reports for this device at `index`.
    pub fn uuid_at(&self, index: usize) -> String {
        self.uuid
            .clone()
            .unwrap_or_else(|| format!("GPU-00000000-0000-0000-0000-{index:012}"))
    }
}

/// Clock speeds reported by `nvmlDeviceGetClockInfo`, MHz.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FakeClocks {
    /// `NVML_CLOCK_GRAPHICS` (0).
    pub graphics: u32,
    /// `NVML_CLOCK_SM` (1).
    pub sm: u32,
    /// `NVML_CLOCK_MEM` (2).
    pub memory: u32,
    /// `NVML_CLOCK_VIDEO` (3).
    pub video: u32,
}

impl Default for FakeClocks {
    fn default() -> Self {
        Self {
            graphics: 210,
            sm: 210,
            memory: 405,
            video: 555,
        }
    }
}

/// Which `*RunningProcesses_v3` call lists a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    /// `nvmlDeviceGetComputeRunningProcesses_v3` (CUDA contexts).
    Compute,
    /// `nvmlDeviceGetGraphicsRunningProcesses_v3` (OpenGL/Vulkan contexts).
    Graphics,
}

/// One process with a context on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeProcess {
    /// Process id.
    pub pid: u32,
    /// Memory used; `None` (JSON `null`) is reported as `NVML_VALUE_NOT_AVAILABLE` (`u64::MAX`).
    #[serde(default)]
    pub used_mib: Option<u64>,
    /// Compute or graphics context.
    #[serde(default = "default_kind")]
    pub kind: ProcessKind,
}

fn default_kind() -> ProcessKind {
    ProcessKind::Compute
}

impl FakeProcess {
    /// A compute (CUDA) process; `used_mib: None` = not available.
    pub fn compute(pid: u32, used_mib: Option<u64>) -> Self {
        Self {
            pid,
            used_mib,
            kind: ProcessKind::Compute,
        }
    }

    /// A graphics process; `used_mib: None` = not available.
    pub fn graphics(pid: u32, used_mib: Option<u64>) -> Self {
        Self {
            pid,
            used_mib,
            kind: ProcessKind::Graphics,
        }
    }
}
