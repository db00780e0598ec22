//! systemd's notify protocol (sd_notify): READY=1 once the programs are
//! attached and the /proc seed is placed, WATCHDOG=1 from the event loop,
//! RELOADING=1/READY=1 around a policy reload, STOPPING=1 on the way out.
//! A no-op when the agent is not started by systemd (no NOTIFY_SOCKET).

use std::{os::unix::net::UnixDatagram, path::PathBuf, time::Duration};

/// The notify socket and the watchdog period systemd asked for.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<UnixDatagram>,
    target: Option<Target>,
    /// A quarter of WATCHDOG_USEC: how often to say WATCHDOG=1.
    pub watchdog_every: Option<Duration>,
}

#[derive(Debug, Clone)]
enum Target {
    Path(PathBuf),
    /// Linux abstract socket (NOTIFY_SOCKET starting with '@').
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from the
    /// environment.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").map(|s| {
            let bytes = s.as_encoded_bytes();
            match bytes.strip_prefix(b"@") {
                Some(name) => Target::Abstract(name.to_vec()),
                None => Target::Path(PathBuf::from(s)),
            }
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(|u| Duration::from_micros(u / 4));
        Notifier {
            socket: target.as_ref().and_then(|_| UnixDatagram::unbound().ok()),
            target,
            watchdog_every,
        }
    }

    /// Sends one notification; errors are ignored (systemd may be gone).
    pub fn send(&self, state: &str) {
        let (Some(socket), Some(target)) = (&self.socket, &self.target) else {
            return;
        };
        let _ = match target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                match std::os::unix::net::SocketAddr::from_abstract_name(name) {
                    Ok(addr) => socket.send_to_addr(state.as_bytes(), &addr),
                    Err(e) => Err(e),
                }
            }
        };
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// Says WATCHDOG=1 if half the watchdog period has passed.
    /// Pings the watchdog. Called on every tick of the loop's watchdog
    /// timer, which runs at a quarter of WATCHDOG_USEC, so two pings are at
    /// most half the limit apart even when a tick comes late. (It used to
    /// skip ticks that came a little early, which let pings drift to the
    /// full limit apart and systemd kill the agent.)
    pub fn watchdog(&self) {
        if self.watchdog_every.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    pub fn reloading(&self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}
