//! A fake libnvidia-ml for tests on machines without an NVIDIA GPU or driver.
//!
//! Built as a `cdylib` (`libfake_nvml.so`) that exports the NVML C functions nvml-wrapper
//! 0.13 calls for init, system info, device enumeration, memory, processes, utilization,
//! temperature, power and clocks (see `ffi.rs` for the list and the exact behaviour), and
//! as an `rlib` with the helpers a test needs:
//!
//! ```no_run
//! use fake_nvml::{FakeDevice, FakeProcess, FakeState};
//! let dir = std::env::temp_dir().join("my-test");
//! let lib = fake_nvml::install_as_libnvidia(&dir); // dir/libnvidia-ml.so.1
//! FakeState::new()
//!     .device(FakeDevice::new("NVIDIA GeForce RTX 4090", 24564)
//!         .used_mib(2048)
//!         .process(FakeProcess::compute(4242, Some(2000))))
//!     .write(dir.join("state.json"))
//!     .unwrap();
//! // In-process: set FAKE_NVML_STATE=dir/state.json, then
//! // Nvml::builder().lib_path(lib.as_os_str()).init().
//! // Child process: FAKE_NVML_STATE=... LD_LIBRARY_PATH=dir, and the child's Nvml::init()
//! // finds libnvidia-ml.so.1 through the loader path.
//! ```
//!
//! The library re-reads the JSON file named by `FAKE_NVML_STATE` on every call, so a test
//! can change memory use, processes or forced errors while the code under test runs. With
//! no `FAKE_NVML_STATE`, or a path that does not exist, it is a machine whose driver loads
//! and that has no GPUs: init succeeds and the device count is 0. When `FAKE_NVML_TRACE`
//! names a file, every call appends its function name and a newline to it.

pub mod code;
mod ffi;
mod state;

use std::io;
use std::path::{Path, PathBuf};

pub use ffi::MEMORY_V2_VERSION;
pub use state::{FakeClocks, FakeDevice, FakeProcess, FakeState, ProcessKind};

/// Env var naming the JSON state file.
pub const STATE_ENV: &str = "FAKE_NVML_STATE";
/// Env var naming the trace file (one called function name per line).
pub const TRACE_ENV: &str = "FAKE_NVML_TRACE";
/// Env var that overrides where [`library_path`] finds `libfake_nvml.so`.
pub const LIB_ENV: &str = "FAKE_NVML_LIB";
/// First pid of the processes that `appear_between_count_calls` adds.
pub const APPEARING_PID_BASE: u32 = ffi::APPEARING_PID_BASE;

const LIB_FILE: &str = "libfake_nvml.so";

/// Where the built `libfake_nvml.so` is: `$FAKE_NVML_LIB` when set, else next to the
/// running executable's Cargo profile dir (`target/<profile>/libfake_nvml.so`, or
/// `target/<profile>/deps/`; a test executable lives in `target/<profile>/deps/`).
///
/// `cargo test -p fake-nvml` builds it. A test in another package that depends on
/// `fake-nvml` gets it built too, because Cargo builds every crate type of a dependency.
///
/// # Panics
/// When the library is not there; the message says what to build.
pub fn library_path() -> PathBuf {
    if let Some(path) = std::env::var_os(LIB_ENV) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("fake-nvml: cannot find the current executable");
    let mut dir = exe
        .parent()
        .expect("fake-nvml: executable has no parent dir")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let candidates = [dir.join(LIB_FILE), dir.join("deps").join(LIB_FILE)];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "fake-nvml: {LIB_FILE} not found at {candidates:?}; run `cargo build -p fake-nvml` \
                 (same profile and target dir) or set {LIB_ENV}"
            )
        })
}

/// Copy the fake library to `dir/libnvidia-ml.so.1` (creating `dir`) and return that path,
/// for `Nvml::builder().lib_path(...)` or for `LD_LIBRARY_PATH=dir`.
///
/// The copy goes through a temporary file and a rename, so a copy that a running process
/// has mapped is never overwritten in place.
///
/// # Panics
/// When the library is not built (see [`library_path`]) or `dir` is not writable.
pub fn install_as_libnvidia(dir: &Path) -> PathBuf {
    try_install_as_libnvidia(dir).unwrap_or_else(|e| {
        panic!(
            "fake-nvml: cannot install as {}/libnvidia-ml.so.1: {e}",
            dir.display()
        )
    })
}

fn try_install_as_libnvidia(dir: &Path) -> io::Result<PathBuf> {
    let source = library_path();
    std::fs::create_dir_all(dir)?;
    let target = dir.join("libnvidia-ml.so.1");
    let tmp = dir.join(format!(".libnvidia-ml.so.1.tmp{}", std::process::id()));
    std::fs::copy(&source, &tmp)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
    std::fs::rename(&tmp, &target)?;
    Ok(target)
}

/// The function names recorded in a trace file, in call order (empty when it does not exist).
pub fn read_trace(path: impl AsRef<Path>) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

/// The fake reads process-wide env vars, so fixtures in one test binary are
/// held one at a time.
static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A test's fake GPU: a scratch dir with the fake installed as
/// `libnvidia-ml.so.1`, a state file named by `FAKE_NVML_STATE` and a trace
/// named by `FAKE_NVML_TRACE` while it lives. Holding one serializes the
/// tests of a binary that use it; dropping it unsets the variables and
/// removes the dir.
pub struct Fixture {
    pub dir: PathBuf,
    /// The installed library, for `Nvml::builder().lib_path(..)`.
    pub lib: PathBuf,
    pub state: PathBuf,
    pub trace: PathBuf,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Fixture {
    /// `tag` names the scratch dir; `state` is the first state.
    pub fn new(tag: &str, state: &FakeState) -> Self {
        let lock = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("fake-nvml-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lib = install_as_libnvidia(&dir);
        let state_path = dir.join("state.json");
        let trace = dir.join("trace");
        state
            .write(&state_path)
            .expect("writing the fake NVML state");
        // SAFETY: every fixture holds ENV_LOCK while the variables are set,
        // and the tests using them read the environment only through it.
        unsafe {
            std::env::set_var(STATE_ENV, &state_path);
            std::env::set_var(TRACE_ENV, &trace);
        }
        Self {
            dir,
            lib,
            state: state_path,
            trace,
            _lock: lock,
        }
    }

    /// Replaces the state; the fake reads it on its next call.
    pub fn set(&self, state: &FakeState) {
        state
            .write(&self.state)
            .expect("writing the fake NVML state");
    }

    /// The NVML calls made so far, in order.
    pub fn trace(&self) -> Vec<String> {
        read_trace(&self.trace)
    }

    /// How many times `function` was called.
    pub fn calls(&self, function: &str) -> usize {
        self.trace().iter().filter(|c| *c == function).count()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: ENV_LOCK is still held (fields drop after this body).
        unsafe {
            std::env::remove_var(STATE_ENV);
            std::env::remove_var(TRACE_ENV);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
