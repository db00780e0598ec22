//! Times one NVML poll and one arbiter decision.
//!
//! `cargo bench -p corral --bench gpu`. Installs the fake libnvidia-ml
//! (`tests/fake-nvml`) into a temporary directory with one 24 GiB GPU and
//! 100 processes (60 compute, 40 graphics), times 200 [`Gpu::poll`] calls,
//! then runs [`Arbiter::decide`] over a 10,000-step timeline (a game coming
//! and going while ai and dev usage swings across their budgets).
//!
//! The fake re-reads its JSON state file on every NVML call, so the poll
//! figure is mostly file reading and parsing: an upper bound for the agent's
//! own work, not a measure of the real driver. When the machine has a real
//! `libnvidia-ml.so.1` and GPU, the same poll is timed against it too, and
//! what it reports is printed (otherwise one line says why not).

use std::{
    collections::BTreeMap,
    hint::black_box,
    time::{Duration, Instant},
};

use corral::{
    gpu::arbiter::{Amount, Arbiter, ArbiterConfig, ClassBudget, Observation, Step},
    gpu::nvml::Gpu,
};
use fake_nvml::{FakeDevice, FakeProcess, FakeState, STATE_ENV};

const PROCESSES: u32 = 100;
const POLLS: u32 = 200;
const STEPS: u32 = 10_000;
const GIB: u64 = 1024 * 1024 * 1024;

fn main() {
    let dir = std::env::temp_dir().join(format!("corral-bench-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let lib = fake_nvml::install_as_libnvidia(&dir);
    let mut device = FakeDevice::new("NVIDIA GeForce RTX 4090", 24564).used_mib(20_000);
    for i in 0..PROCESSES {
        let pid = 10_000 + i;
        let used = Some(u64::from(i % 7 + 1) * 100);
        device = device.process(if i < 60 {
            FakeProcess::compute(pid, used)
        } else {
            FakeProcess::graphics(pid, used)
        });
    }
    let state = dir.join("state.json");
    FakeState::new().device(device).write(&state).unwrap();
    // SAFETY: single-threaded here; nothing else reads the environment yet.
    unsafe { std::env::set_var(STATE_ENV, &state) };

    let gpu = Gpu::open(Some(&lib)).expect("the fake NVML opens");
    let first = gpu.poll().unwrap();
    assert_eq!(first.devices[0].processes.len(), PROCESSES as usize);
    let mut samples = Vec::with_capacity(POLLS as usize);
    let started = Instant::now();
    for _ in 0..POLLS {
        let t = Instant::now();
        black_box(gpu.poll().unwrap());
        samples.push(t.elapsed());
    }
    let total = started.elapsed();
    samples.sort();
    println!(
        "poll, 1 GPU, {PROCESSES} processes (fake NVML): {:.1} µs/poll mean, {:.1} µs median, \
         {:.1} µs p99 over {POLLS} polls",
        total.as_secs_f64() * 1e6 / f64::from(POLLS),
        micros(samples[samples.len() / 2]),
        micros(samples[samples.len() * 99 / 100]),
    );
    drop(gpu);
    let _ = std::fs::remove_dir_all(&dir);
    real_nvml();

    let timeline = timeline();
    let mut arbiter = Arbiter::new(config());
    let started = Instant::now();
    let mut actions = 0usize;
    for obs in &timeline {
        actions += black_box(arbiter.decide(obs)).len();
    }
    let total = started.elapsed();
    println!(
        "arbiter: {:.3} µs/decide over a {STEPS}-step timeline ({actions} actions)",
        total.as_secs_f64() * 1e6 / f64::from(STEPS),
    );
}

/// The same poll against the machine's own driver, when it has one
/// (`libnvidia-ml.so.1` through the loader path).
fn real_nvml() {
    let gpu = match Gpu::open(None) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("real NVML: not timed: {e}");
            return;
        }
    };
    let snapshot = match gpu.poll() {
        Ok(snapshot) => snapshot,
        Err(e) => {
            println!("real NVML: the first poll failed: {e}");
            return;
        }
    };
    for d in &snapshot.devices {
        println!(
            "real NVML: GPU {} {:?} {}: {} of {} MiB used, {} processes, util {:?}%, {:?} °C, \
             {:?} mW",
            d.index,
            d.name,
            d.uuid,
            d.used_bytes >> 20,
            d.total_bytes >> 20,
            d.processes.len(),
            d.utilization_gpu,
            d.temperature_c,
            d.power_mw
        );
    }
    let started = Instant::now();
    let mut failed = 0;
    for _ in 0..POLLS {
        failed += usize::from(black_box(gpu.poll()).is_err());
    }
    println!(
        "real NVML: {:.1} µs/poll over {POLLS} polls ({failed} failed)",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(POLLS)
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn config() -> ArbiterConfig {
    let amount = |s: &str| Some(s.parse::<Amount>().unwrap());
    let budget = |class: &str, priority, reserve, min, max, ladder: &[Step]| ClassBudget {
        class: class.to_owned(),
        priority,
        reserve,
        min,
        max,
        ladder: ladder.to_vec(),
    };
    use Step::*;
    ArbiterConfig {
        protected_class: "game".to_owned(),
        grace: Duration::from_secs(30),
        margin: "5%".parse().unwrap(),
        classes: vec![
            budget("game", 1, amount("33%"), None, None, &[]),
            budget(
                "render",
                2,
                None,
                amount("42%"),
                amount("67%"),
                &[Notify, Ask, Freeze],
            ),
            budget(
                "ai",
                3,
                None,
                amount("17%"),
                amount("25%"),
                &[Notify, Ask, Freeze],
            ),
            budget("dev", 4, None, None, amount("17%"), &[Notify, Freeze]),
        ],
    }
}

/// One observation a second on a 12 GiB card: the game runs 5 minutes in
/// every 8, ai swings between 1 and 9 GiB, dev between 0.5 and 3 GiB.
fn timeline() -> Vec<Observation> {
    let total = 12 * GIB;
    (0..STEPS)
        .map(|t| {
            let game_on = t % 480 < 300;
            let wave = |period: u32, lo: u64, hi: u64| {
                let phase = f64::from(t % period) / f64::from(period);
                let tri = if phase < 0.5 {
                    phase * 2.0
                } else {
                    2.0 - phase * 2.0
                };
                lo + ((hi - lo) as f64 * tri) as u64
            };
            let mut used = BTreeMap::new();
            used.insert("ai".to_owned(), wave(700, GIB, 9 * GIB));
            used.insert("dev".to_owned(), wave(130, GIB / 2, 3 * GIB));
            used.insert("render".to_owned(), GIB);
            if game_on {
                used.insert("game".to_owned(), wave(300, GIB / 4, 3 * GIB));
            }
            let in_use: u64 = used.values().sum();
            Observation {
                now: Duration::from_secs(u64::from(t)),
                total_bytes: total,
                free_bytes: total.saturating_sub(in_use),
                used_by_class: used,
                protected_running: game_on,
            }
        })
        .collect()
}
