//! Scaffolding the bus tests share: a scratch directory and a private
//! `dbus-daemon` (run as another user where a test needs that user's
//! session bus).
//!
//! Needs `dbus-daemon` (`apt-get install -y dbus-daemon`).

#![allow(dead_code, reason = "each test binary uses part of it")]

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "corral-bus-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `dbus-daemon --session` listening on `socket`; killed on drop.
pub struct DbusDaemon {
    child: Child,
    pub address: String,
}

impl DbusDaemon {
    /// A bus at `dir/bus`, run by the caller.
    pub fn start(dir: &Path) -> Self {
        Self::start_at(&dir.join("bus"), None)
    }

    /// A bus at `socket`, run as `uid` when given (its session bus: only
    /// that user may connect).
    pub fn start_at(socket: &Path, uid: Option<u32>) -> Self {
        let mut command = Command::new("dbus-daemon");
        command
            .args(["--session", "--nofork", "--nopidfile", "--print-address"])
            .arg(format!("--address=unix:path={}", socket.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(uid) = uid {
            let dir = socket.parent().unwrap();
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
            command.uid(uid).gid(uid).env("HOME", dir);
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start dbus-daemon ({e}); install it: apt-get install -y dbus-daemon")
        });
        let mut address = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut address)
            .unwrap();
        let address = address.trim().to_string();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon printed {address:?}"
        );
        DbusDaemon { child, address }
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
