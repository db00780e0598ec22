//! A handle on one process that outlives its pid number: a pidfd (from the
//! control socket's `SO_PEERPIDFD`, or `pidfd_open`), with the start time
//! read when it was taken as a second witness. A pid is only acted on while
//! [`PidRef::is_same`] holds: a pid cannot be handed to another process while
//! the process a pidfd refers to still exists (zombies included), so a
//! request, a freeze or a kill never lands on a newcomer that reused it.
//! Reads only; signalling through it is `actuate::cgroup::signal`.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use crate::model::procs;

/// `SO_PEERPIDFD` (Linux 6.5): the peer's pidfd, taken by the kernel at
/// connect time. The same value on every architecture corral builds for
/// (x86, arm, riscv); mips, sparc and powerpc differ.
const SO_PEERPIDFD: libc::c_int = 77;

#[derive(Debug)]
pub struct PidRef {
    pid: u32,
    /// `None` on kernels without pidfds (< 5.3); then the start time alone
    /// tells a newcomer apart.
    fd: Option<OwnedFd>,
    /// From /proc/PID/stat when the handle was taken; `None` if it was gone.
    start_ticks: Option<u64>,
}

impl PidRef {
    /// A handle on the process that has `pid` now.
    pub fn open(pid: u32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        let fd = if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor to us alone.
            Some(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(e);
            }
            None
        };
        let start_ticks = procs::start_ticks(pid);
        if fd.is_none() && start_ticks.is_none() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(PidRef {
            pid,
            fd,
            start_ticks,
        })
    }

    /// The process at the other end of a connected unix socket: the pidfd
    /// the kernel took at connect time (`SO_PEERPIDFD`), else a pidfd opened
    /// now for the `SO_PEERCRED` pid, checked against the start time.
    pub fn of_socket_peer(socket: BorrowedFd<'_>, pid: u32) -> io::Result<Self> {
        let mut fd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `fd`.
        let got = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&raw mut fd).cast(),
                &mut len,
            )
        };
        if got == 0 && fd >= 0 {
            // SAFETY: the kernel returned a new descriptor for us alone.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(PidRef {
                pid,
                fd: Some(fd),
                start_ticks: procs::start_ticks(pid),
            });
        }
        PidRef::open(pid)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pidfd, to signal through or to pass on.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// Whether the process this handle was taken for still exists, so that
    /// `pid` still names it (and no newcomer).
    pub fn is_same(&self) -> bool {
        if let Some(fd) = &self.fd {
            // SAFETY: signal 0 only checks that the process exists.
            let alive = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    0,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            } == 0;
            if !alive {
                return false;
            }
        }
        // With a live pidfd the pid cannot have been reused; without one,
        // the start time is all there is.
        self.fd.is_some()
            || (self.start_ticks.is_some() && procs::start_ticks(self.pid) == self.start_ticks)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn a_handle_on_a_live_process_is_the_same_until_it_is_reaped() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let handle = PidRef::open(child.id()).unwrap();
        assert!(handle.is_same());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!handle.is_same(), "a reaped process is not the same");
    }

    #[test]
    fn a_gone_pid_cannot_be_opened() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(PidRef::open(pid).is_err());
    }
}
