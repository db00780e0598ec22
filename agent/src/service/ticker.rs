//! A periodic timer the kernel fires once a period (a timerfd in the
//! loop's epoll set), for the loop's slow ticks. tokio's own timers wake a
//! loop twice for a deadline more than 64 ms away: once at the start of
//! the timer wheel's coarse slot, to move the timer down a level, and once
//! at the deadline. An idle agent's wake-ups were mostly those.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use tokio::io::unix::AsyncFd;

pub struct Ticker {
    timer: AsyncFd<OwnedFd>,
}

impl Ticker {
    /// Fires every `period` (at least 1 ms), the first time one period from
    /// now.
    pub fn every(period: Duration) -> io::Result<Ticker> {
        let period = period.max(Duration::from_millis(1));
        // SAFETY: timerfd_create takes no pointers; the descriptor it
        // returns is owned here alone.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let spec = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(period.subsec_nanos() as i32),
        };
        let times = libc::itimerspec {
            it_interval: spec,
            it_value: spec,
        };
        // SAFETY: `times` is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &times, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns `fd`, so the descriptor outlives its
        // registration.
        let timer = unsafe { AsyncFd::register(fd) }?;
        Ok(Ticker { timer })
    }

    /// Waits for the next period's end. Returns how many periods ended
    /// since the last tick (more than one when the loop was busy). Cancel
    /// safe: a tick not taken stays for the next call.
    pub async fn tick(&mut self) -> io::Result<u64> {
        loop {
            let mut guard = self.timer.readable_mut().await?;
            let mut expired = [0u8; 8];
            // SAFETY: reads at most 8 bytes into `expired`.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    expired.as_mut_ptr().cast(),
                    expired.len(),
                )
            };
            if n == 8 {
                return Ok(u64::from_ne_bytes(expired));
            }
            let err = io::Error::last_os_error();
            if n < 0 && err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn ticks_once_a_period_and_counts_the_periods_a_busy_loop_missed() {
        let start = std::time::Instant::now();
        let mut ticker = Ticker::every(Duration::from_millis(30)).unwrap();
        assert_eq!(ticker.tick().await.unwrap(), 1);
        assert!(start.elapsed() >= Duration::from_millis(30));
        // Busy for three periods and a half: the next tick says three.
        std::thread::sleep(Duration::from_millis(105));
        assert_eq!(ticker.tick().await.unwrap(), 3);
        // A tick given up in a select! is still there for the next call.
        tokio::select! {
            biased;
            _ = std::future::ready(()) => {}
            _ = ticker.tick() => panic!("no period has ended yet"),
        }
        assert_eq!(ticker.tick().await.unwrap(), 1);
    }
}
