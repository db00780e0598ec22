//! nvml-wrapper 0.13 against the fake libnvidia-ml: every call corral relies on, driven by
//! the state file, including the awkward cases (no driver, processes that vanish between
//! the count and fill calls, state changed mid-run, forced error codes).

use std::ffi::OsStr;
use std::process::Command;

use fake_nvml::code::*;
use fake_nvml::{FakeDevice, FakeProcess, FakeState, Fixture, STATE_ENV, TRACE_ENV};
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::InitFlags;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

const MIB: u64 = 1024 * 1024;

/// nvml-wrapper on the fake this fixture installed.
fn init(fx: &Fixture) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(fx.lib.as_os_str()).init()
}

fn rtx4090() -> FakeDevice {
    FakeDevice::new("NVIDIA GeForce RTX 4090", 24564)
        .uuid("GPU-11111111-2222-3333-4444-555555555555")
        .used_mib(6144)
        .temperature_c(63)
        .power_mw(215_500)
        .utilization(87, 41)
        .process(FakeProcess::compute(4242, Some(4096)))
        .process(FakeProcess::compute(4343, None))
        .process(FakeProcess::graphics(1717, Some(512)))
}

fn two_gpus() -> FakeState {
    FakeState::new()
        .driver_version("550.54.15")
        .device(rtx4090())
        .device(FakeDevice::new("NVIDIA RTX A2000", 6138))
}

#[test]
fn library_path_finds_the_built_cdylib() {
    let path = fake_nvml::library_path();
    assert!(path.is_file(), "{path:?}");
    assert_eq!(path.file_name(), Some(OsStr::new("libfake_nvml.so")));
}

#[test]
fn init_system_info_and_devices() {
    let fx = Fixture::new("devices", &two_gpus());
    let nvml = init(&fx).unwrap();
    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml.sys_nvml_version().unwrap(), "12.550.54.15");
    assert_eq!(nvml.device_count().unwrap(), 2);

    let d0 = nvml.device_by_index(0).unwrap();
    assert_eq!(d0.name().unwrap(), "NVIDIA GeForce RTX 4090");
    assert_eq!(
        d0.uuid().unwrap(),
        "GPU-11111111-2222-3333-4444-555555555555"
    );
    let d1 = nvml.device_by_index(1).unwrap();
    assert_eq!(d1.name().unwrap(), "NVIDIA RTX A2000");
    assert_eq!(
        d1.uuid().unwrap(),
        "GPU-00000000-0000-0000-0000-000000000001"
    );
    assert!(matches!(
        nvml.device_by_index(2),
        Err(NvmlError::InvalidArg)
    ));
    nvml.shutdown().unwrap();
}

#[test]
fn memory_info_total_used_free() {
    let state = FakeState::new().device(rtx4090().reserved_mib(300));
    let fx = Fixture::new("memory", &state);
    let nvml = init(&fx).unwrap();
    let mem = nvml.device_by_index(0).unwrap().memory_info().unwrap();
    assert_eq!(mem.version, fake_nvml::MEMORY_V2_VERSION);
    assert_eq!(mem.total, 24564 * MIB);
    assert_eq!(mem.used, 6144 * MIB);
    assert_eq!(mem.reserved, 300 * MIB);
    assert_eq!(mem.free, (24564 - 6144 - 300) * MIB);
}

#[test]
fn running_processes_with_and_without_used_memory() {
    let fx = Fixture::new("procs", &two_gpus());
    let nvml = init(&fx).unwrap();
    let d0 = nvml.device_by_index(0).unwrap();

    let compute = d0.running_compute_processes().unwrap();
    assert_eq!(compute.len(), 2);
    assert_eq!(compute[0].pid, 4242);
    assert_eq!(compute[0].used_gpu_memory, UsedGpuMemory::Used(4096 * MIB));
    assert_eq!(
        compute[0].gpu_instance_id, None,
        "non-MIG reports 0xFFFFFFFF"
    );
    assert_eq!(compute[0].compute_instance_id, None);
    assert_eq!(compute[1].pid, 4343);
    assert_eq!(compute[1].used_gpu_memory, UsedGpuMemory::Unavailable);
    assert_eq!(d0.running_compute_processes_count().unwrap(), 2);

    let graphics = d0.running_graphics_processes().unwrap();
    assert_eq!(graphics.len(), 1);
    assert_eq!(graphics[0].pid, 1717);
    assert_eq!(graphics[0].used_gpu_memory, UsedGpuMemory::Used(512 * MIB));

    let d1 = nvml.device_by_index(1).unwrap();
    assert!(d1.running_compute_processes().unwrap().is_empty());
    assert!(d1.running_graphics_processes().unwrap().is_empty());
}

#[test]
fn temperature_power_utilization_clocks() {
    let fx = Fixture::new("sensors", &two_gpus());
    let nvml = init(&fx).unwrap();
    let d0 = nvml.device_by_index(0).unwrap();
    assert_eq!(d0.temperature(TemperatureSensor::Gpu).unwrap(), 63);
    assert_eq!(d0.power_usage().unwrap(), 215_500);
    let util = d0.utilization_rates().unwrap();
    assert_eq!((util.gpu, util.memory), (87, 41));
    assert_eq!(d0.clock_info(Clock::Graphics).unwrap(), 210);
    assert_eq!(d0.clock_info(Clock::Memory).unwrap(), 405);
}

#[test]
fn driver_not_loaded_init_error() {
    let state = two_gpus().init_error(NVML_ERROR_DRIVER_NOT_LOADED);
    let fx = Fixture::new("no-driver", &state);
    assert!(matches!(init(&fx), Err(NvmlError::DriverNotLoaded)));
    assert!(matches!(
        Nvml::builder()
            .lib_path(fx.lib.as_os_str())
            .flags(InitFlags::NO_GPUS)
            .init(),
        Err(NvmlError::DriverNotLoaded)
    ));
    // The driver "loads" later: the same library now initializes.
    fx.set(&two_gpus());
    assert_eq!(init(&fx).unwrap().device_count().unwrap(), 2);
}

#[test]
fn no_state_file_is_a_machine_without_gpus() {
    let fx = Fixture::new("no-state", &two_gpus());
    std::fs::remove_file(&fx.state).unwrap();
    let nvml = init(&fx).unwrap();
    assert_eq!(nvml.device_count().unwrap(), 0);
    // SAFETY: ENV_LOCK is held by `fx`.
    unsafe { std::env::remove_var(STATE_ENV) };
    assert_eq!(nvml.device_count().unwrap(), 0);
}

#[test]
fn processes_vanishing_between_count_and_fill_calls() {
    let state = FakeState::new().device(
        FakeDevice::new("gpu", 8192)
            .process(FakeProcess::compute(100, Some(10)))
            .process(FakeProcess::compute(101, Some(20)))
            .process(FakeProcess::compute(102, Some(30))),
    );
    let fx = Fixture::new("vanish", &state.clone().vanish_between_count_calls(2));
    let nvml = init(&fx).unwrap();
    let d0 = nvml.device_by_index(0).unwrap();
    let procs = d0.running_compute_processes().unwrap();
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    assert_eq!(pids, [102]);
    assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(30 * MIB));

    // All of them gone by the fill call: an empty list, not an error.
    fx.set(&state.clone().vanish_between_count_calls(5));
    assert!(d0.running_compute_processes().unwrap().is_empty());

    // Up to 5 appearing fit nvml-wrapper's headroom; more give InsufficientSize, which
    // callers must treat as "try again".
    fx.set(&state.clone().appear_between_count_calls(2));
    let pids: Vec<u32> = d0
        .running_compute_processes()
        .unwrap()
        .iter()
        .map(|p| p.pid)
        .collect();
    let base = fake_nvml::APPEARING_PID_BASE;
    assert_eq!(pids, [100, 101, 102, base, base + 1]);
    fx.set(&state.appear_between_count_calls(6));
    assert!(matches!(
        d0.running_compute_processes(),
        Err(NvmlError::InsufficientSize(_))
    ));
}

#[test]
fn state_changes_mid_run_are_seen() {
    let fx = Fixture::new("mid-run", &two_gpus());
    let nvml = init(&fx).unwrap();
    let d0 = nvml.device_by_index(0).unwrap();
    assert_eq!(d0.memory_info().unwrap().used, 6144 * MIB);
    assert_eq!(d0.running_compute_processes().unwrap().len(), 2);

    let mut state = two_gpus();
    state.devices[0].used_mib = 20_000;
    state.devices[0].temperature_c = 80;
    state.devices[0].processes = vec![FakeProcess::compute(9999, Some(15_000))];
    fx.set(&state);

    assert_eq!(d0.memory_info().unwrap().used, 20_000 * MIB);
    assert_eq!(d0.temperature(TemperatureSensor::Gpu).unwrap(), 80);
    let procs = d0.running_compute_processes().unwrap();
    assert_eq!(procs.len(), 1);
    assert_eq!(procs[0].pid, 9999);
    assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(15_000 * MIB));

    // The second GPU falls off the bus: its handle now reports GpuLost.
    let d1 = nvml.device_by_index(1).unwrap();
    state.devices.truncate(1);
    fx.set(&state);
    assert!(matches!(d1.memory_info(), Err(NvmlError::GpuLost)));
    assert_eq!(nvml.device_count().unwrap(), 1);
}

#[test]
fn forced_error_codes_per_function() {
    let state = two_gpus()
        .error("nvmlDeviceGetMemoryInfo_v2", NVML_ERROR_GPU_IS_LOST)
        .error(
            "nvmlDeviceGetComputeRunningProcesses_v3",
            NVML_ERROR_NO_PERMISSION,
        )
        .error("nvmlDeviceGetPowerUsage", NVML_ERROR_NOT_SUPPORTED);
    let fx = Fixture::new("errors", &state);
    let nvml = init(&fx).unwrap();
    let d0 = nvml.device_by_index(0).unwrap();
    assert!(matches!(d0.memory_info(), Err(NvmlError::GpuLost)));
    assert!(matches!(
        d0.running_compute_processes(),
        Err(NvmlError::NoPermission)
    ));
    assert!(matches!(d0.power_usage(), Err(NvmlError::NotSupported)));
    // Functions without a forced code still work.
    assert_eq!(d0.running_graphics_processes().unwrap().len(), 1);
    assert_eq!(d0.temperature(TemperatureSensor::Gpu).unwrap(), 63);

    // Errors cleared mid-run.
    fx.set(&two_gpus());
    assert_eq!(d0.memory_info().unwrap().total, 24564 * MIB);

    // Init itself can be forced to fail.
    fx.set(&two_gpus().error("nvmlInit_v2", NVML_ERROR_NO_PERMISSION));
    assert!(matches!(init(&fx), Err(NvmlError::NoPermission)));
}

#[test]
fn trace_lists_each_call() {
    let fx = Fixture::new("trace", &two_gpus());
    let nvml = init(&fx).unwrap();
    let d0 = nvml.device_by_index(0).unwrap();
    d0.memory_info().unwrap();
    d0.running_compute_processes().unwrap();
    drop(nvml);
    let nvml = Nvml::builder()
        .lib_path(fx.lib.as_os_str())
        .flags(InitFlags::NO_GPUS)
        .init()
        .unwrap();
    nvml.shutdown().unwrap();
    assert_eq!(
        fx.trace(),
        [
            "nvmlInit_v2",
            "nvmlSystemGetDriverVersion",
            "nvmlDeviceGetHandleByIndex_v2",
            "nvmlDeviceGetMemoryInfo_v2",
            "nvmlDeviceGetComputeRunningProcesses_v3",
            "nvmlDeviceGetComputeRunningProcesses_v3",
            "nvmlShutdown",
            "nvmlInitWithFlags",
            "nvmlSystemGetDriverVersion",
            "nvmlShutdown",
        ]
    );
}

#[test]
fn state_file_round_trips_and_parses_the_documented_schema() {
    let json = r#"{
        "init_error": null,
        "driver_version": "535.183.01",
        "devices": [{
            "name": "gpu0", "uuid": "GPU-x", "total_mib": 8192, "used_mib": 100,
            "temperature_c": 50, "power_mw": 70000,
            "utilization_gpu": 5, "utilization_memory": 6,
            "processes": [
                {"pid": 1, "used_mib": 64, "kind": "compute"},
                {"pid": 2, "used_mib": null, "kind": "graphics"}
            ]
        }],
        "errors": {"nvmlDeviceGetMemoryInfo_v2": 15},
        "vanish_between_count_calls": 1
    }"#;
    let state: FakeState = serde_json::from_str(json).unwrap();
    assert_eq!(state.devices[0].processes[1].used_mib, None);
    assert_eq!(state.errors["nvmlDeviceGetMemoryInfo_v2"], 15);
    let dir = std::env::temp_dir().join(format!("fake-nvml-{}-roundtrip", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.json");
    state.write(&path).unwrap();
    assert_eq!(FakeState::read(&path).unwrap(), state);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(serde_json::from_str::<FakeState>(r#"{"devcies": []}"#).is_err());
}

/// `Nvml::init()` (no explicit path) finds the fake through `LD_LIBRARY_PATH`, which the
/// loader reads at process start, hence the child process.
#[test]
fn ld_library_path_finds_the_fake_in_a_child_process() {
    let fx = Fixture::new("ld-path", &two_gpus());
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_init_through_loader_path",
            "--include-ignored",
        ])
        .env("LD_LIBRARY_PATH", &fx.dir)
        .env(STATE_ENV, &fx.state)
        .env(TRACE_ENV, &fx.trace)
        .env("FAKE_NVML_CHILD", "1")
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "child failed:\n{}\n{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(fx.trace().iter().any(|c| c == "nvmlDeviceGetName"));
}

#[test]
#[ignore = "run by ld_library_path_finds_the_fake_in_a_child_process"]
fn child_init_through_loader_path() {
    assert_eq!(std::env::var("FAKE_NVML_CHILD").as_deref(), Ok("1"));
    let nvml = Nvml::init().unwrap();
    let name = nvml.device_by_index(0).unwrap().name().unwrap();
    assert_eq!(name, "NVIDIA GeForce RTX 4090");
}
