#!/usr/bin/env python3
"""Starts COUNT copies of PROGRAM at RATE per second, keeps them alive, and
writes their pids to PIDFILE (the systemd VM tier's exec benchmark)."""
import os
import subprocess
import sys
import time

# Plain fork + exec, as a launcher does: vfork/posix_spawn children share the
# parent's memory until exec and are told apart from threads differently.
subprocess._USE_VFORK = False
subprocess._USE_POSIX_SPAWN = False

program, rate, count, pidfile = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
children = []
start = time.monotonic()
for i in range(count):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    children.append(subprocess.Popen([program]))
with open(pidfile + ".tmp", "w") as f:
    f.write("\n".join(str(c.pid) for c in children) + "\n")
os.rename(pidfile + ".tmp", pidfile)
time.sleep(3600)
