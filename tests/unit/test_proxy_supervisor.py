"""How a restarted head recognises the proxy a previous head left running: by its /proc command line."""
from __future__ import annotations

import os
import subprocess
import sys

from gridserve.common.proxy_supervisor import proxy_cmdline


def test_a_live_process_running_the_proxy_module_is_recognised_with_its_argv():
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "gridserve.proxy",
                             "--head", "127.0.0.1:1"])
    try:
        while not open(f"/proc/{fake.pid}/cmdline", "rb").read():
            pass  # the child has not exec'd yet
        argv = proxy_cmdline(fake.pid)
        assert "gridserve.proxy" in argv and argv[argv.index("--head") + 1] == "127.0.0.1:1"
    finally:
        fake.kill()
        fake.wait()
    assert proxy_cmdline(fake.pid) == []  # gone (or its pid reused by something else)


def test_another_program_or_a_zombie_is_not_a_proxy():
    assert proxy_cmdline(os.getpid()) == []
    zombie = subprocess.Popen([sys.executable, "-c", "pass", "-m", "gridserve.proxy"])
    try:
        while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z":
            pass  # exited but not reaped yet
        assert proxy_cmdline(zombie.pid) == []
    finally:
        zombie.wait()
