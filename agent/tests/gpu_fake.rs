//! `corral::gpu::nvml` against the fake libnvidia-ml (`tests/fake-nvml`): opening
//! without a library or a driver, polling, the awkward NVML cases, and the
//! poller thread's On/Off/Snapshot events as the fake GPU comes and goes.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use corral::gpu::nvml::{
    Gpu, GpuError, GpuEvent, GpuSnapshot, PollerConfig, ProcessKind, spawn_poller_with,
};
use corral::gpu::thermal::{ThermalAction, ThermalConfig, ThermalGuard};
use fake_nvml::code::{
    NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_GPU_IS_LOST, NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
};
use fake_nvml::{FakeDevice, FakeProcess, FakeState, Fixture};
use tokio::sync::mpsc::{self, Receiver, error::TryRecvError};

const MIB: u64 = 1024 * 1024;

/// corral's view of the fixture's fake GPU.
trait Open {
    fn open(&self) -> Result<Gpu, GpuError>;
    fn poller(&self, lib: &Path) -> (Receiver<GpuEvent>, JoinHandle<()>);
}

impl Open for Fixture {
    fn open(&self) -> Result<Gpu, GpuError> {
        Gpu::open(Some(&self.lib))
    }

    fn poller(&self, lib: &Path) -> (Receiver<GpuEvent>, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(64);
        let config = PollerConfig {
            lib_path: Some(lib.to_path_buf()),
            interval: Duration::from_millis(20),
            retry: Duration::from_millis(60),
        };
        (rx, spawn_poller_with(config, tx))
    }
}

fn rtx3060() -> FakeDevice {
    FakeDevice::new("NVIDIA GeForce RTX 3060", 12288)
        .uuid("GPU-3060")
        .used_mib(10_240)
        .temperature_c(66)
        .power_mw(150_250)
        .utilization(93, 40)
        .process(FakeProcess::compute(4242, Some(9216)))
        .process(FakeProcess::compute(4343, None))
        .process(FakeProcess::graphics(1717, Some(512)))
        .process(FakeProcess::graphics(4242, Some(100)))
}

fn one_gpu() -> FakeState {
    FakeState::new().device(rtx3060())
}

/// The next event within `timeout`; `None` on timeout or a closed channel.
fn next_event(rx: &mut Receiver<GpuEvent>, timeout: Duration) -> Option<GpuEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        match rx.try_recv() {
            Ok(event) => return Some(event),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) if Instant::now() >= deadline => return None,
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Skip snapshots until a non-snapshot event; panics after `timeout`.
fn next_non_snapshot(rx: &mut Receiver<GpuEvent>, timeout: Duration) -> GpuEvent {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(rx, left) {
            Some(GpuEvent::Snapshot(_)) => continue,
            Some(event) => return event,
            None => panic!("no On/Off event within {timeout:?}"),
        }
    }
}

fn next_snapshot(rx: &mut Receiver<GpuEvent>) -> GpuSnapshot {
    match next_event(rx, Duration::from_secs(5)) {
        Some(GpuEvent::Snapshot(snapshot)) => snapshot,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

/// Drop the receiver and check the thread ends promptly.
fn stop(rx: Receiver<GpuEvent>, handle: JoinHandle<()>) {
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !handle.is_finished() {
        assert!(
            Instant::now() < deadline,
            "poller did not stop after its receiver went away"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.join().unwrap();
}

#[test]
fn no_library_says_so() {
    let fx = Fixture::new("no-lib", &one_gpu());
    let missing = fx.dir.join("nowhere/libnvidia-ml.so.1");
    let err = Gpu::open(Some(&missing)).unwrap_err();
    assert!(matches!(err, GpuError::NoLibrary { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("no NVIDIA driver library"), "{text}");
    assert!(text.contains("GPU features are off"), "{text}");
    assert!(text.contains("nowhere/libnvidia-ml.so.1"), "{text}");
    assert!(!err.is_gone());
}

#[test]
fn driver_not_loaded_is_its_own_error() {
    let fx = Fixture::new(
        "no-driver",
        &one_gpu().init_error(NVML_ERROR_DRIVER_NOT_LOADED),
    );
    let err = fx.open().unwrap_err();
    assert!(matches!(err, GpuError::DriverNotLoaded), "{err:?}");
    assert!(err.to_string().contains("driver is not loaded"), "{err}");
    // No GPU at all is a third case.
    fx.set(&FakeState::new());
    assert!(matches!(fx.open(), Err(GpuError::NoDevices)));
    fx.set(&one_gpu());
    fx.open().unwrap();
}

#[test]
fn poll_reads_memory_processes_and_sensors() {
    let fx = Fixture::new(
        "poll",
        &one_gpu().device(FakeDevice::new("NVIDIA RTX A2000", 6138)),
    );
    let gpu = fx.open().unwrap();
    let snapshot = gpu.poll().unwrap();
    assert_eq!(snapshot.devices.len(), 2);
    let d0 = &snapshot.devices[0];
    assert_eq!(d0.index, 0);
    assert_eq!(d0.name, "NVIDIA GeForce RTX 3060");
    assert_eq!(d0.uuid, "GPU-3060");
    assert_eq!(d0.total_bytes, 12288 * MIB);
    assert_eq!(d0.used_bytes, 10_240 * MIB);
    assert_eq!(d0.free_bytes, 2048 * MIB);
    assert_eq!(d0.utilization_gpu, Some(93));
    assert_eq!(d0.temperature_c, Some(66));
    assert_eq!(d0.power_mw, Some(150_250));
    let procs: Vec<(u32, Option<u64>, ProcessKind)> = d0
        .processes
        .iter()
        .map(|p| (p.pid, p.used_bytes, p.kind))
        .collect();
    assert_eq!(
        procs,
        [
            (4242, Some(9216 * MIB), ProcessKind::Compute),
            // usedGpuMemory not available: unknown, never 16 EiB.
            (4343, None, ProcessKind::Compute),
            (1717, Some(512 * MIB), ProcessKind::Graphics),
            // In both lists: once per kind.
            (4242, Some(100 * MIB), ProcessKind::Graphics),
        ]
    );
    let by_pid = snapshot.used_by_pid();
    assert_eq!(by_pid[&4242], 9216 * MIB);
    assert_eq!(by_pid[&4343], 0);
    assert!(snapshot.devices[1].processes.is_empty());
    // The snapshot serializes for `corral status`.
    let json = serde_json::to_value(&snapshot).unwrap();
    assert_eq!(
        json["devices"][0]["processes"][1]["used_bytes"],
        serde_json::Value::Null
    );
    assert_eq!(json["devices"][0]["processes"][2]["kind"], "graphics");
}

#[test]
fn failing_sensors_are_none_not_errors() {
    let state = one_gpu()
        .error("nvmlDeviceGetPowerUsage", NVML_ERROR_NOT_SUPPORTED)
        .error("nvmlDeviceGetTemperature", NVML_ERROR_NOT_SUPPORTED)
        .error("nvmlDeviceGetUtilizationRates", NVML_ERROR_NOT_SUPPORTED);
    let fx = Fixture::new("sensors", &state);
    let snapshot = fx.open().unwrap().poll().unwrap();
    let d0 = &snapshot.devices[0];
    assert_eq!(
        (d0.power_mw, d0.temperature_c, d0.utilization_gpu),
        (None, None, None)
    );
    assert_eq!(d0.processes.len(), 4);
}

#[test]
fn processes_vanishing_and_appearing_between_count_calls() {
    let base = FakeState::new().device(
        FakeDevice::new("gpu", 8192)
            .process(FakeProcess::compute(100, Some(10)))
            .process(FakeProcess::compute(101, Some(20)))
            .process(FakeProcess::compute(102, Some(30))),
    );
    let fx = Fixture::new("vanish", &base.clone().vanish_between_count_calls(2));
    let gpu = fx.open().unwrap();
    let pids = |s: &GpuSnapshot| {
        s.devices[0]
            .processes
            .iter()
            .map(|p| p.pid)
            .collect::<Vec<_>>()
    };
    assert_eq!(pids(&gpu.poll().unwrap()), [102]);
    fx.set(&base.clone().vanish_between_count_calls(9));
    assert!(pids(&gpu.poll().unwrap()).is_empty());

    // Up to 5 newcomers fit nvml-wrapper's headroom.
    fx.set(&base.clone().appear_between_count_calls(5));
    assert_eq!(pids(&gpu.poll().unwrap()).len(), 8);

    // More: InsufficientSize, tried 1 + 3 times (count + fill each), then an error.
    fx.set(&base.clone().appear_between_count_calls(6));
    let before = fx.calls("nvmlDeviceGetComputeRunningProcesses_v3");
    let err = gpu.poll().unwrap_err();
    let after = fx.calls("nvmlDeviceGetComputeRunningProcesses_v3");
    assert_eq!(after - before, 8, "4 attempts of count + fill");
    assert!(!err.is_gone());
    assert!(
        err.to_string()
            .contains("running_compute_processes on GPU 0"),
        "{err}"
    );
}

#[test]
fn lost_gpu_is_gone() {
    let fx = Fixture::new("lost", &one_gpu());
    let gpu = fx.open().unwrap();
    gpu.poll().unwrap();
    fx.set(&one_gpu().error("nvmlDeviceGetMemoryInfo_v2", NVML_ERROR_GPU_IS_LOST));
    let err = gpu.poll().unwrap_err();
    assert!(err.is_gone(), "{err:?}");
    assert!(err.to_string().contains("GPU went away"), "{err}");
    // The device leaving the bus altogether: the count drops.
    fx.set(&FakeState::new());
    let err = gpu.poll().unwrap_err();
    assert!(err.is_gone(), "{err:?}");
    assert!(
        err.to_string().contains("now lists 0 GPU(s), it listed 1"),
        "{err}"
    );
}

#[test]
fn hot_gpu_read_back_trips_the_thermal_guard() {
    let fx = Fixture::new("hot", &FakeState::new().device(rtx3060().temperature_c(91)));
    let gpu = fx.open().unwrap();
    let mut guard = ThermalGuard::new(ThermalConfig {
        gpu_max_c: Some(85.0),
        cpu_max_c: None,
        hysteresis_c: 5.0,
        hold: Duration::from_secs(60),
    });
    let temperature = |gpu: &Gpu| gpu.poll().unwrap().devices[0].temperature_c.map(f64::from);
    let hot = temperature(&gpu);
    assert_eq!(hot, Some(91.0));
    let action = guard.observe(Duration::ZERO, hot, None);
    assert!(
        matches!(action, Some(ThermalAction::Cool { ref reason }) if reason.contains("91°C")),
        "{action:?}"
    );
    fx.set(&FakeState::new().device(rtx3060().temperature_c(70)));
    let cool = temperature(&gpu);
    assert_eq!(guard.observe(Duration::from_secs(30), cool, None), None);
    assert!(matches!(
        guard.observe(Duration::from_secs(60), cool, None),
        Some(ThermalAction::Restore { .. })
    ));
}

#[test]
fn poller_without_library_sends_off_once_and_stops_with_its_receiver() {
    let fx = Fixture::new("poller-no-lib", &one_gpu());
    let (mut rx, handle) = fx.poller(&fx.dir.join("missing/libnvidia-ml.so.1"));
    match next_event(&mut rx, Duration::from_secs(5)) {
        Some(GpuEvent::Off { reason }) => {
            assert!(reason.contains("no NVIDIA driver library"), "{reason}");
        }
        other => panic!("expected Off, got {other:?}"),
    }
    // Several quiet retries (every 60 ms): nothing more.
    assert!(next_event(&mut rx, Duration::from_millis(400)).is_none());
    stop(rx, handle);
}

#[test]
fn poller_follows_the_gpu_going_and_coming_back() {
    let fx = Fixture::new("poller", &one_gpu());
    let (mut rx, handle) = fx.poller(&fx.lib);
    assert!(matches!(
        next_event(&mut rx, Duration::from_secs(5)),
        Some(GpuEvent::On)
    ));
    let snapshot = next_snapshot(&mut rx);
    assert_eq!(snapshot.devices[0].processes[0].pid, 4242);
    assert!(snapshot.poll_us > 0);

    // The state changes mid-run: the next snapshots see it.
    let mut busier = one_gpu();
    busier.devices[0].used_mib = 12_000;
    fx.set(&busier);
    let deadline = Instant::now() + Duration::from_secs(5);
    while next_snapshot(&mut rx).devices[0].used_bytes != 12_000 * MIB {
        assert!(Instant::now() < deadline, "the change never showed");
    }

    // The GPU falls off the bus: Off once, then quiet retries.
    fx.set(&FakeState::new());
    match next_non_snapshot(&mut rx, Duration::from_secs(5)) {
        GpuEvent::Off { reason } => assert!(reason.contains("GPU went away"), "{reason}"),
        other => panic!("expected Off, got {other:?}"),
    }
    assert!(
        next_event(&mut rx, Duration::from_millis(400)).is_none(),
        "nothing while the GPU is away"
    );

    // It comes back: On, then snapshots again.
    fx.set(&one_gpu());
    assert!(matches!(
        next_event(&mut rx, Duration::from_secs(5)),
        Some(GpuEvent::On)
    ));
    assert_eq!(next_snapshot(&mut rx).devices.len(), 1);
    stop(rx, handle);
}

#[test]
fn poller_with_driver_not_loaded_turns_on_when_it_loads() {
    let fx = Fixture::new(
        "poller-driver",
        &one_gpu().init_error(NVML_ERROR_DRIVER_NOT_LOADED),
    );
    let (mut rx, handle) = fx.poller(&fx.lib);
    match next_event(&mut rx, Duration::from_secs(5)) {
        Some(GpuEvent::Off { reason }) => assert!(reason.contains("not loaded"), "{reason}"),
        other => panic!("expected Off, got {other:?}"),
    }
    assert!(next_event(&mut rx, Duration::from_millis(300)).is_none());
    fx.set(&one_gpu());
    assert!(matches!(
        next_event(&mut rx, Duration::from_secs(5)),
        Some(GpuEvent::On)
    ));
    next_snapshot(&mut rx);
    stop(rx, handle);
}

#[test]
fn poller_keeps_polling_through_errors_that_are_not_a_lost_gpu() {
    let fx = Fixture::new(
        "poller-perm",
        &one_gpu().error(
            "nvmlDeviceGetComputeRunningProcesses_v3",
            NVML_ERROR_NO_PERMISSION,
        ),
    );
    let (mut rx, handle) = fx.poller(&fx.lib);
    assert!(matches!(
        next_event(&mut rx, Duration::from_secs(5)),
        Some(GpuEvent::On)
    ));
    // Failing polls send nothing (no Off: the GPU is there).
    assert!(next_event(&mut rx, Duration::from_millis(200)).is_none());
    fx.set(&one_gpu());
    assert_eq!(next_snapshot(&mut rx).devices[0].processes.len(), 4);
    stop(rx, handle);
}

/// The daemon may hand a `Gpu` to another thread or share it.
#[test]
fn gpu_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Gpu>();
    check::<GpuEvent>();
}
