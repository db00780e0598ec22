//! The kernel's proc connector as a doorbell: it rings when a process
//! execs or forks, and the agent then reads the facts from the ring buffer.
//! It carries no facts the loop decides from; the loop only counts the
//! forks among its rings, to know which records are still to come.
//!
//! Why: a wake-up from a BPF program goes through irq_work, a self-IPI the
//! traced process pays for (most of the exec program's cost in a VM). The
//! connector's message is sent from the same task right after the exec
//! tracepoint (`exec_binprm`: `trace_sched_process_exec`, then
//! `proc_exec_connector`), so the exec record is in the ring when it rings,
//! and its wake-up is a plain one. A fork rings from `copy_process`, before
//! the fork tracepoint: that ring only wakes the agent early, so the
//! child's exec is read at once (its fork record comes with it).
//!
//! A classic socket filter lets through only execs and process forks
//! (threads, exits, uid and comm changes never wake the agent).

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// `<linux/cn_proc.h>`: `enum what` values the filter lets through, and
/// the kernel's answer to a subscription.
const PROC_EVENT_NONE: u32 = 0x0;
const PROC_EVENT_FORK: u32 = 0x1;
const PROC_EVENT_EXEC: u32 = 0x2;
/// `<linux/connector.h>`: the proc connector's id.
const CN_IDX_PROC: u32 = 0x1;
const CN_VAL_PROC: u32 = 0x1;

/// Byte offsets in a message: `nlmsghdr` (16), `cn_msg` (20), then
/// `proc_event` { what, cpu, timestamp_ns (8), event_data }.
const NLMSG_HDR: usize = 16;
const CN_MSG: usize = 20;
const EVENT_WHAT: u32 = (NLMSG_HDR + CN_MSG) as u32;
const EVENT_DATA: usize = EVENT_WHAT as usize + 16;
/// `event_data.fork`: parent_pid, parent_tgid, child_pid, child_tgid.
const FORK_CHILD_PID: u32 = EVENT_WHAT + 16 + 8;
const FORK_CHILD_TGID: u32 = FORK_CHILD_PID + 4;

/// How many messages one read takes at most.
pub const BATCH: usize = 16;
/// A message is 16 + 20 + 40 bytes; room to spare.
const MESSAGE_BYTES: usize = 128;

/// A subscribed proc connector socket, non-blocking.
pub struct Doorbell {
    socket: OwnedFd,
}

impl Doorbell {
    /// Opens and subscribes. Fails without CAP_NET_ADMIN, outside the
    /// initial namespaces or without CONFIG_PROC_EVENTS; the caller then
    /// has the BPF programs wake it instead.
    pub fn open() -> io::Result<Doorbell> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_CONNECTOR,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is ours alone.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is its unset state.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as u16;
        address.nl_groups = CN_IDX_PROC;
        // SAFETY: bind with a valid sockaddr_nl of the size given.
        let bound = unsafe {
            libc::bind(
                fd,
                (&raw const address).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        let doorbell = Doorbell { socket };
        doorbell.subscribe(true)?;
        doorbell.confirm()?;
        // Only now: the filter would drop the answer. What came before it
        // is unfiltered (other processes' exits, say): thrown away.
        attach_filter(doorbell.socket.as_raw_fd())?;
        loop {
            match doorbell.take() {
                Ok(rings) if rings.messages == BATCH => {}
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(doorbell)
    }

    /// Reads the kernel's answer to the subscription. The kernel answers in
    /// the send itself, and only once someone listens: no answer means it
    /// refused (without CAP_NET_ADMIN, or outside the initial user and pid
    /// namespaces, it ignores the request), and nothing would ever ring.
    fn confirm(&self) -> io::Result<()> {
        let word = |m: &[u8], at: usize| u32::from_ne_bytes(m[at..at + 4].try_into().unwrap());
        loop {
            let mut message = [0u8; MESSAGE_BYTES];
            // SAFETY: recv into a buffer of the length given.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    message.as_mut_ptr().cast(),
                    message.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::WouldBlock {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the kernel did not answer the subscription (it needs CAP_NET_ADMIN \
                         in the initial namespaces)",
                    ));
                }
                return Err(error);
            }
            // Other listeners' answers and events may come first.
            let (what, ack) = (
                word(&message, EVENT_WHAT as usize),
                word(&message, NLMSG_HDR + 12),
            );
            if (n as usize) < EVENT_DATA + 4 || what != PROC_EVENT_NONE || ack != self.ack() + 1 {
                continue;
            }
            return match word(&message, EVENT_DATA) {
                0 => Ok(()),
                err => Err(io::Error::from_raw_os_error(err as i32)),
            };
        }
    }

    /// The `ack` of our subscription; the answer carries it plus one.
    fn ack(&self) -> u32 {
        // SAFETY: getpid has no preconditions.
        unsafe { libc::getpid() as u32 }
    }

    /// PROC_CN_MCAST_LISTEN or _IGNORE: the kernel sends proc events only
    /// while someone listens, and before 6.6 it counts listeners only by
    /// these messages (a closed socket is not subtracted).
    fn subscribe(&self, listen: bool) -> io::Result<()> {
        let op: u32 = if listen { 1 } else { 2 };
        let mut message = [0u8; NLMSG_HDR + CN_MSG + 4];
        let total = message.len() as u32;
        message[0..4].copy_from_slice(&total.to_ne_bytes());
        message[4..6].copy_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        let cn = NLMSG_HDR;
        message[cn..cn + 4].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
        message[cn + 4..cn + 8].copy_from_slice(&CN_VAL_PROC.to_ne_bytes());
        message[cn + 12..cn + 16].copy_from_slice(&self.ack().to_ne_bytes());
        message[cn + 16..cn + 18].copy_from_slice(&4u16.to_ne_bytes());
        message[cn + CN_MSG..].copy_from_slice(&op.to_ne_bytes());
        // SAFETY: send from a buffer of the length given.
        let sent = unsafe {
            libc::send(
                self.socket.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes what is waiting, in one read of up to [`BATCH`] messages.
    /// Fewer than [`BATCH`] means none was left, and the next message will
    /// wake an edge-triggered poller again. A socket that overflowed
    /// (ENOBUFS) counts as one ring: records are waiting.
    /// `Err(WouldBlock)` when nothing was there.
    pub fn take(&self) -> io::Result<Rings> {
        let mut buffers = [[0u8; MESSAGE_BYTES]; BATCH];
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: buffers[i].as_mut_ptr().cast(),
            iov_len: MESSAGE_BYTES,
        });
        // SAFETY: mmsghdr is plain data; zeroed is its unset state.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (header, iovec) in headers.iter_mut().zip(iovecs.iter_mut()) {
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at its own live buffer.
        let taken = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if taken < 0 {
            let error = io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::ENOBUFS) => Ok(Rings {
                    messages: 1,
                    forks: 0,
                }),
                _ => Err(error),
            };
        }
        let taken = taken as usize;
        let what = EVENT_WHAT as usize;
        let forks = buffers[..taken]
            .iter()
            .filter(|m| m[what..what + 4] == PROC_EVENT_FORK.to_ne_bytes())
            .count();
        Ok(Rings {
            messages: taken,
            forks,
        })
    }
}

/// What one [`Doorbell::take`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rings {
    pub messages: usize,
    /// Process forks among them. A fork rings before its record is
    /// written (see the module's note), so a reader that finds fewer fork
    /// records than this may wait a moment for the rest.
    pub forks: usize,
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        let _ = self.subscribe(false);
    }
}

impl AsRawFd for Doorbell {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// A word of the message as a classic BPF absolute load sees it: in
/// network byte order, while the kernel writes `what` in its own.
fn as_loaded(value: u32) -> u32 {
    u32::from_be_bytes(value.to_ne_bytes())
}

/// Lets through an exec, and a fork whose child is a process (its pid is
/// its tgid); drops everything else, and anything too short to read.
fn filter() -> [libc::sock_filter; 9] {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_MISC, BPF_RET, BPF_TAX, BPF_W, BPF_X,
    };
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let load = BPF_LD | BPF_W | BPF_ABS;
    [
        /* 0 */ op(load, EVENT_WHAT),
        /* 1 */ jump(BPF_JMP | BPF_JEQ | BPF_K, as_loaded(PROC_EVENT_EXEC), 5, 0),
        /* 2 */ jump(BPF_JMP | BPF_JEQ | BPF_K, as_loaded(PROC_EVENT_FORK), 0, 5),
        /* 3 */ op(load, FORK_CHILD_TGID),
        /* 4 */ op(BPF_MISC | BPF_TAX, 0),
        /* 5 */ op(load, FORK_CHILD_PID),
        /* 6 */ jump(BPF_JMP | BPF_JEQ | BPF_X, 0, 0, 1),
        /* 7 */ op(BPF_RET | BPF_K, u32::MAX),
        /* 8 */ op(BPF_RET | BPF_K, 0),
    ]
}

fn attach_filter(fd: RawFd) -> io::Result<()> {
    let mut program = filter();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: setsockopt with a valid sock_fprog whose filter outlives the
    // call (the kernel copies it).
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as u32,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The (what, pid) of each message that comes within `limit`: for an
    /// exec its pid, for a fork its child's.
    fn messages_within(doorbell: &Doorbell, limit: Duration) -> Vec<(u32, u32)> {
        let start = Instant::now();
        let mut seen = Vec::new();
        let word =
            |m: &[u8], at: u32| u32::from_ne_bytes(m[at as usize..][..4].try_into().unwrap());
        while start.elapsed() < limit {
            let mut message = [0u8; MESSAGE_BYTES];
            // SAFETY: recv into a buffer of the length given.
            let n = unsafe {
                libc::recv(
                    doorbell.as_raw_fd(),
                    message.as_mut_ptr().cast(),
                    message.len(),
                    0,
                )
            };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let what = word(&message, EVENT_WHAT);
            let pid = if what == PROC_EVENT_FORK {
                word(&message, FORK_CHILD_PID)
            } else {
                word(&message, EVENT_WHAT + 16)
            };
            seen.push((what, pid));
        }
        seen
    }

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn rings_for_a_process_fork_and_an_exec_and_never_for_a_thread_or_an_exit() {
        if !root() {
            eprintln!("skipped: the proc connector needs root");
            return;
        }
        let doorbell = Doorbell::open().expect("the proc connector (CONFIG_PROC_EVENTS)");
        let threads: Vec<u32> = (0..8)
            .map(|_| {
                // SAFETY: gettid has no preconditions.
                std::thread::spawn(|| unsafe { libc::gettid() } as u32)
            })
            .map(|t| t.join().unwrap())
            .collect();
        let child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        let status = child.wait_with_output().unwrap().status;
        assert!(status.success());
        let seen = messages_within(&doorbell, Duration::from_millis(300));
        // Other tests' processes ring too: only ours are looked at.
        assert!(
            seen.contains(&(PROC_EVENT_FORK, pid)),
            "no fork of {pid} in {seen:?}"
        );
        assert!(
            seen.contains(&(PROC_EVENT_EXEC, pid)),
            "no exec of {pid} in {seen:?}"
        );
        let ours = seen.iter().filter(|(_, p)| *p == pid).count();
        assert_eq!(
            ours, 2,
            "only the fork and the exec of {pid} ring (its exit does not): {seen:?}"
        );
        for tid in threads {
            assert!(
                !seen.iter().any(|(_, p)| *p == tid),
                "thread {tid} rang: {seen:?}"
            );
        }
        assert!(
            seen.iter()
                .all(|(what, _)| [PROC_EVENT_FORK, PROC_EVENT_EXEC].contains(what))
        );
    }

    #[test]
    fn take_reads_a_batch_and_says_when_nothing_waits() {
        if !root() {
            eprintln!("skipped: the proc connector needs root");
            return;
        }
        let doorbell = Doorbell::open().expect("the proc connector (CONFIG_PROC_EVENTS)");
        for _ in 0..3 {
            std::process::Command::new("/bin/true").status().unwrap();
        }
        let (mut taken, mut forks) = (0, 0);
        loop {
            match doorbell.take() {
                Ok(rings) => {
                    taken += rings.messages;
                    forks += rings.forks;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(taken >= 6, "3 spawns rang {taken} times, not at least 6");
        assert!(
            forks >= 3 && forks < taken,
            "{forks} of {taken} rings were forks"
        );
    }
}
