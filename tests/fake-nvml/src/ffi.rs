//! The C ABI of the fake libnvidia-ml: each exported `nvml*` function re-reads the state file,
//! appends its name to the trace file, and answers like the real library would.
//!
//! Order of checks in every device call: trace line, `NVML_ERROR_UNINITIALIZED` when
//! `nvmlInit*` has not succeeded (init is reference counted like the real one), state file
//! load (`NVML_ERROR_UNKNOWN` plus a line on stderr when it cannot be read or parsed), forced
//! code from `errors`, then handle/argument checks (`NVML_ERROR_INVALID_ARGUMENT` for a null
//! pointer, `NVML_ERROR_GPU_IS_LOST` for a handle whose index no longer exists in the state).
//!
//! Device handles are opaque pointers whose address is `index + 1`; they are never
//! dereferenced.

use std::collections::BTreeSet;
use std::ffi::{c_char, c_uint, c_void};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::code::*;
use crate::state::{FakeDevice, FakeState, ProcessKind};
use crate::{STATE_ENV, TRACE_ENV};

type NvmlDevice = *mut c_void;

/// `nvmlMemory_t` (v1): total, free, used in bytes.
#[repr(C)]
pub struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

/// `nvmlMemory_v2_t`: the caller sets `version` to [`MEMORY_V2_VERSION`].
#[repr(C)]
pub struct NvmlMemoryV2 {
    version: u32,
    total: u64,
    reserved: u64,
    free: u64,
    used: u64,
}

/// `NVML_STRUCT_VERSION(Memory, 2)`: `sizeof(nvmlMemory_v2_t) | 2 << 24`.
pub const MEMORY_V2_VERSION: u32 = 40 | (2 << 24);

/// `nvmlProcessInfo_t` as used by the `_v3` process queries.
#[repr(C)]
pub struct NvmlProcessInfo {
    pid: u32,
    used_gpu_memory: u64,
    gpu_instance_id: u32,
    compute_instance_id: u32,
}

/// `nvmlUtilization_t`, percent.
#[repr(C)]
pub struct NvmlUtilization {
    gpu: u32,
    memory: u32,
}

const _: () = assert!(size_of::<NvmlMemory>() == 24);
const _: () = assert!(size_of::<NvmlMemoryV2>() == 40);
const _: () = assert!(size_of::<NvmlMemoryV2>() as u32 | (2 << 24) == MEMORY_V2_VERSION);
const _: () = assert!(size_of::<NvmlProcessInfo>() == 24);
const _: () = assert!(size_of::<NvmlUtilization>() == 8);

/// `NVML_VALUE_NOT_AVAILABLE` as an unsigned long long.
const VALUE_NOT_AVAILABLE: u64 = u64::MAX;
/// Instance id of a GPU without MIG.
const NO_INSTANCE: u32 = 0xFFFF_FFFF;
const MIB: u64 = 1024 * 1024;
/// First pid of the processes that `appear_between_count_calls` adds.
pub(crate) const APPEARING_PID_BASE: u32 = 4_000_000;

/// Successful `nvmlInit*` calls not yet matched by `nvmlShutdown`.
static INIT_COUNT: AtomicU32 = AtomicU32::new(0);

/// Process queries whose count call has been answered and whose fill call is due:
/// (device index, kind). Used by `vanish_between_count_calls` / `appear_between_count_calls`.
static PENDING_FILL: Mutex<BTreeSet<(usize, ProcessKind)>> = Mutex::new(BTreeSet::new());

fn trace(name: &str) {
    let Some(path) = std::env::var_os(TRACE_ENV) else {
        return;
    };
    let line = format!("{name}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("fake-nvml: cannot append to trace file {path:?}: {e}");
    }
}

/// The state named by `FAKE_NVML_STATE`; no variable or no file: a machine without GPUs.
fn load_state() -> Result<FakeState, String> {
    let Some(path) = std::env::var_os(STATE_ENV) else {
        return Ok(FakeState::default());
    };
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("cannot parse state file {path:?}: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FakeState::default()),
        Err(e) => Err(format!("cannot read state file {path:?}: {e}")),
    }
}

/// Common prologue; `body` runs only when the library is initialized (or `needs_init` is
/// false), the state loaded and no error is forced for `name`.
fn call(name: &str, needs_init: bool, body: impl FnOnce(&FakeState) -> u32) -> u32 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        trace(name);
        if needs_init && INIT_COUNT.load(Ordering::SeqCst) == 0 {
            return NVML_ERROR_UNINITIALIZED;
        }
        let state = match load_state() {
            Ok(state) => state,
            Err(e) => {
                eprintln!("fake-nvml: {name}: {e}");
                return NVML_ERROR_UNKNOWN;
            }
        };
        if let Some(&code) = state.errors.get(name) {
            return code;
        }
        body(&state)
    }));
    result.unwrap_or_else(|_| {
        eprintln!("fake-nvml: {name} panicked");
        NVML_ERROR_UNKNOWN
    })
}

/// The device behind `handle`, with its index.
fn device(state: &FakeState, handle: NvmlDevice) -> Result<(usize, &FakeDevice), u32> {
    if handle.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    let index = handle.addr() - 1;
    state
        .devices
        .get(index)
        .map(|d| (index, d))
        .ok_or(NVML_ERROR_GPU_IS_LOST)
}

/// Run `f` on the device and turn `Err(code)` into the code.
fn with_device(
    state: &FakeState,
    handle: NvmlDevice,
    f: impl FnOnce(usize, &FakeDevice) -> Result<(), u32>,
) -> u32 {
    match device(state, handle).and_then(|(i, d)| f(i, d)) {
        Ok(()) => NVML_SUCCESS,
        Err(code) => code,
    }
}

/// Copy `s` and a NUL into a caller buffer of `length` bytes.
///
/// # Safety
/// `buf` is null or valid for `length` bytes of writes.
unsafe fn write_cstr(buf: *mut c_char, length: c_uint, s: &str) -> Result<(), u32> {
    if buf.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    if s.len() + 1 > length as usize {
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: `buf` holds `length >= s.len() + 1` bytes (caller contract, checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        *buf.add(s.len()) = 0;
    }
    Ok(())
}

/// Store `value` through `out`.
///
/// # Safety
/// `out` is null or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T) -> Result<(), u32> {
    if out.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: non-null and valid by the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

fn init(name: &str) -> u32 {
    call(name, false, |state| {
        if let Some(code) = state.init_error {
            return code;
        }
        INIT_COUNT.fetch_add(1, Ordering::SeqCst);
        NVML_SUCCESS
    })
}

/// `nvmlInit_v2`: fails with `init_error` when set.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> u32 {
    init("nvmlInit_v2")
}

/// `nvmlInit` (v1 name of `nvmlInit_v2`).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit() -> u32 {
    init("nvmlInit")
}

/// `nvmlInitWithFlags`: flags are accepted and ignored (no GPUs never fails init here).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> u32 {
    init("nvmlInitWithFlags")
}

/// `nvmlShutdown`: undoes one successful init. A broken state file does not stop it; a
/// forced error does (and leaves the library initialized).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> u32 {
    let result = catch_unwind(|| {
        trace("nvmlShutdown");
        if let Ok(state) = load_state()
            && let Some(&code) = state.errors.get("nvmlShutdown")
        {
            return code;
        }
        match INIT_COUNT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
            Ok(_) => NVML_SUCCESS,
            Err(_) => NVML_ERROR_UNINITIALIZED,
        }
    });
    result.unwrap_or(NVML_ERROR_UNKNOWN)
}

/// `nvmlErrorString`: a static description of `result`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: u32) -> *const c_char {
    trace("nvmlErrorString");
    crate::code::error_string(result).as_ptr()
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
/// `version` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> u32 {
    call("nvmlSystemGetDriverVersion", true, |state| {
        // SAFETY: forwarded caller contract.
        unsafe { write_cstr(version, length, &state.driver_version) }
            .err()
            .unwrap_or(NVML_SUCCESS)
    })
}

/// `nvmlSystemGetNVMLVersion` (works before init, like the real one).
///
/// # Safety
/// `version` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> u32 {
    call("nvmlSystemGetNVMLVersion", false, |state| {
        let v = state
            .nvml_version
            .clone()
            .unwrap_or_else(|| format!("12.{}", state.driver_version));
        // SAFETY: forwarded caller contract.
        unsafe { write_cstr(version, length, &v) }
            .err()
            .unwrap_or(NVML_SUCCESS)
    })
}

unsafe fn device_count(name: &str, count: *mut c_uint) -> u32 {
    call(name, true, |state| {
        let n = state.devices.len() as c_uint;
        // SAFETY: forwarded caller contract.
        unsafe { put(count, n) }.err().unwrap_or(NVML_SUCCESS)
    })
}

/// `nvmlDeviceGetCount_v2`.
///
/// # Safety
/// `count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> u32 {
    // SAFETY: same contract.
    unsafe { device_count("nvmlDeviceGetCount_v2", count) }
}

/// `nvmlDeviceGetCount` (v1 name).
///
/// # Safety
/// `count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> u32 {
    // SAFETY: same contract.
    unsafe { device_count("nvmlDeviceGetCount", count) }
}

unsafe fn handle_by_index(name: &str, index: c_uint, device: *mut NvmlDevice) -> u32 {
    call(name, true, |state| {
        if index as usize >= state.devices.len() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        let handle = std::ptr::without_provenance_mut(index as usize + 1);
        // SAFETY: forwarded caller contract.
        unsafe { put(device, handle) }.err().unwrap_or(NVML_SUCCESS)
    })
}

/// `nvmlDeviceGetHandleByIndex_v2`: `NVML_ERROR_INVALID_ARGUMENT` for an index past the count.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut NvmlDevice,
) -> u32 {
    // SAFETY: same contract.
    unsafe { handle_by_index("nvmlDeviceGetHandleByIndex_v2", index, device) }
}

/// `nvmlDeviceGetHandleByIndex` (v1 name).
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(index: c_uint, device: *mut NvmlDevice) -> u32 {
    // SAFETY: same contract.
    unsafe { handle_by_index("nvmlDeviceGetHandleByIndex", index, device) }
}

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: NvmlDevice,
    name: *mut c_char,
    length: c_uint,
) -> u32 {
    call("nvmlDeviceGetName", true, |state| {
        with_device(state, device, |_, d| {
            // SAFETY: forwarded caller contract.
            unsafe { write_cstr(name, length, &d.name) }
        })
    })
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
/// `uuid` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: NvmlDevice,
    uuid: *mut c_char,
    length: c_uint,
) -> u32 {
    call("nvmlDeviceGetUUID", true, |state| {
        with_device(state, device, |i, d| {
            // SAFETY: forwarded caller contract.
            unsafe { write_cstr(uuid, length, &d.uuid_at(i)) }
        })
    })
}

/// `nvmlDeviceGetMemoryInfo` (v1): `used` includes `reserved_mib`, as v1 has no reserved field.
///
/// # Safety
/// `memory` is null or valid for a write of `nvmlMemory_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: NvmlDevice,
    memory: *mut NvmlMemory,
) -> u32 {
    call("nvmlDeviceGetMemoryInfo", true, |state| {
        with_device(state, device, |_, d| {
            let total = d.total_mib * MIB;
            let used = (d.used_mib + d.reserved_mib) * MIB;
            let info = NvmlMemory {
                total,
                free: total.saturating_sub(used),
                used,
            };
            // SAFETY: forwarded caller contract.
            unsafe { put(memory, info) }
        })
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`: `NVML_ERROR_ARGUMENT_VERSION_MISMATCH` unless
/// `memory->version` is `0x0200_0028`; free = total - used - reserved.
///
/// # Safety
/// `memory` is null or valid for reads and writes of `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut NvmlMemoryV2,
) -> u32 {
    call("nvmlDeviceGetMemoryInfo_v2", true, |state| {
        with_device(state, device, |_, d| {
            if memory.is_null() {
                return Err(NVML_ERROR_INVALID_ARGUMENT);
            }
            // SAFETY: non-null, valid by the caller's contract.
            let version = unsafe { (*memory).version };
            if version != MEMORY_V2_VERSION {
                return Err(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
            }
            let total = d.total_mib * MIB;
            let used = d.used_mib * MIB;
            let reserved = d.reserved_mib * MIB;
            let info = NvmlMemoryV2 {
                version,
                total,
                reserved,
                free: total.saturating_sub(used).saturating_sub(reserved),
                used,
            };
            // SAFETY: forwarded caller contract.
            unsafe { put(memory, info) }
        })
    })
}

/// The `*RunningProcesses_v3` protocol: `*count == 0` asks for the count
/// (`NVML_ERROR_INSUFFICIENT_SIZE` with the count, or success with 0); otherwise `infos`
/// holds `*count` entries, and a list longer than that gives `NVML_ERROR_INSUFFICIENT_SIZE`
/// with the needed count.
unsafe fn running_processes(
    name: &str,
    kind: ProcessKind,
    device: NvmlDevice,
    count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> u32 {
    call(name, true, |state| {
        with_device(state, device, |index, d| {
            if count.is_null() {
                return Err(NVML_ERROR_INVALID_ARGUMENT);
            }
            let mut list: Vec<(u32, u64)> = d
                .processes
                .iter()
                .filter(|p| p.kind == kind)
                .map(|p| {
                    let used = p.used_mib.map_or(VALUE_NOT_AVAILABLE, |m| m * MIB);
                    (p.pid, used)
                })
                .collect();
            let mut pending = PENDING_FILL.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: non-null, valid by the caller's contract.
            let capacity = unsafe { *count };
            if capacity == 0 {
                let n = list.len() as c_uint;
                // SAFETY: as above.
                unsafe { *count = n };
                if n == 0 {
                    pending.remove(&(index, kind));
                    return Ok(());
                }
                pending.insert((index, kind));
                return Err(NVML_ERROR_INSUFFICIENT_SIZE);
            }
            if infos.is_null() {
                return Err(NVML_ERROR_INVALID_ARGUMENT);
            }
            if pending.remove(&(index, kind)) {
                let vanish = (state.vanish_between_count_calls as usize).min(list.len());
                list.drain(..vanish);
                list.extend(
                    (0..state.appear_between_count_calls).map(|i| (APPEARING_PID_BASE + i, MIB)),
                );
            }
            let n = list.len() as c_uint;
            // SAFETY: as above.
            unsafe { *count = n };
            if n > capacity {
                return Err(NVML_ERROR_INSUFFICIENT_SIZE);
            }
            for (i, (pid, used)) in list.into_iter().enumerate() {
                let info = NvmlProcessInfo {
                    pid,
                    used_gpu_memory: used,
                    gpu_instance_id: NO_INSTANCE,
                    compute_instance_id: NO_INSTANCE,
                };
                // SAFETY: `i < n <= capacity`, and `infos` holds `capacity` entries.
                unsafe { infos.add(i).write(info) };
            }
            Ok(())
        })
    })
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`.
///
/// # Safety
/// `count` is null or valid for reads and writes; `infos` is null or valid for `*count`
/// writes of `nvmlProcessInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: NvmlDevice,
    count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> u32 {
    // SAFETY: same contract.
    unsafe {
        running_processes(
            "nvmlDeviceGetComputeRunningProcesses_v3",
            ProcessKind::Compute,
            device,
            count,
            infos,
        )
    }
}

/// `nvmlDeviceGetGraphicsRunningProcesses_v3`.
///
/// # Safety
/// `count` is null or valid for reads and writes; `infos` is null or valid for `*count`
/// writes of `nvmlProcessInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: NvmlDevice,
    count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> u32 {
    // SAFETY: same contract.
    unsafe {
        running_processes(
            "nvmlDeviceGetGraphicsRunningProcesses_v3",
            ProcessKind::Graphics,
            device,
            count,
            infos,
        )
    }
}

/// `nvmlDeviceGetUtilizationRates`.
///
/// # Safety
/// `utilization` is null or valid for a write of `nvmlUtilization_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: NvmlDevice,
    utilization: *mut NvmlUtilization,
) -> u32 {
    call("nvmlDeviceGetUtilizationRates", true, |state| {
        with_device(state, device, |_, d| {
            let u = NvmlUtilization {
                gpu: d.utilization_gpu,
                memory: d.utilization_memory,
            };
            // SAFETY: forwarded caller contract.
            unsafe { put(utilization, u) }
        })
    })
}

/// `nvmlDeviceGetTemperature`: only `NVML_TEMPERATURE_GPU` (0); other sensors give
/// `NVML_ERROR_INVALID_ARGUMENT`.
///
/// # Safety
/// `temp` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: NvmlDevice,
    sensor: c_uint,
    temp: *mut c_uint,
) -> u32 {
    call("nvmlDeviceGetTemperature", true, |state| {
        with_device(state, device, |_, d| {
            if sensor != 0 {
                return Err(NVML_ERROR_INVALID_ARGUMENT);
            }
            // SAFETY: forwarded caller contract.
            unsafe { put(temp, d.temperature_c) }
        })
    })
}

/// `nvmlDeviceGetPowerUsage`, milliwatts.
///
/// # Safety
/// `power` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: NvmlDevice, power: *mut c_uint) -> u32 {
    call("nvmlDeviceGetPowerUsage", true, |state| {
        with_device(state, device, |_, d| {
            // SAFETY: forwarded caller contract.
            unsafe { put(power, d.power_mw) }
        })
    })
}

/// `nvmlDeviceGetClockInfo`: graphics (0), SM (1), memory (2), video (3); others give
/// `NVML_ERROR_INVALID_ARGUMENT`.
///
/// # Safety
/// `clock` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: NvmlDevice,
    clock_type: c_uint,
    clock: *mut c_uint,
) -> u32 {
    call("nvmlDeviceGetClockInfo", true, |state| {
        with_device(state, device, |_, d| {
            let c = &d.clocks_mhz;
            let mhz = match clock_type {
                0 => c.graphics,
                1 => c.sm,
                2 => c.memory,
                3 => c.video,
                _ => return Err(NVML_ERROR_INVALID_ARGUMENT),
            };
            // SAFETY: forwarded caller contract.
            unsafe { put(clock, mhz) }
        })
    })
}
