//! A best-effort desktop notification through `notify-send`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tracing::debug;

/// How long a `notify-send` may run before it is killed.
const NOTIFY_LIMIT: Duration = Duration::from_secs(10);

/// Show a desktop notification with `notify-send`, if it is on PATH. Never
/// blocks longer than spawning it; the child is reaped (and killed after
/// 10 s) in a thread. Failures are logged at debug level only.
///
/// Note that a root agent's notification reaches a user's desktop only if
/// the environment it inherits has that user's session bus.
pub fn notify_desktop(summary: &str, body: &str) {
    let Some(program) = find_on_path("notify-send") else {
        debug!("notify-send is not on PATH; not notifying: {summary}");
        return;
    };
    spawn_and_reap(&program, &["--app-name=corral", "--", summary, body]);
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Spawn `program` with no stdio and forget it; a thread waits for it.
/// Returns whether it was spawned.
fn spawn_and_reap(program: &Path, args: &[&str]) -> bool {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            debug!("could not run {}: {e}", program.display());
            return false;
        }
    };
    let program = program.to_path_buf();
    let reaper = std::thread::Builder::new()
        .name("corral-notify".into())
        .spawn(move || {
            let started = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            debug!("{} exited with {status}", program.display());
                        }
                        return;
                    }
                    Ok(None) if started.elapsed() < NOTIFY_LIMIT => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Ok(None) | Err(_) => {
                        debug!("{} hung; killing it", program.display());
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                }
            }
        });
    if let Err(e) = reaper {
        // The child becomes a zombie until the agent exits; harmless.
        debug!("could not start a thread to reap {}", e);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_and_reap_runs_and_tolerates_missing_programs() {
        assert!(spawn_and_reap(Path::new("/bin/true"), &[]) || !Path::new("/bin/true").exists());
        assert!(!spawn_and_reap(
            Path::new("/nonexistent/notify-send"),
            &["x"]
        ));
    }
}
