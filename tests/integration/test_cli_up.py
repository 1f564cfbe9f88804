"""`gridserve up`: a refused start when a port is taken, and a full local cluster that Ctrl-C stops cleanly."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

GRIDSERVE = str(Path(sys.executable).parent / "gridserve")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_up_refuses_a_taken_port_with_one_clear_line_and_starts_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run([GRIDSERVE, "up", "--grpc-port", "0", "--http-port", str(port), "--state-dir",
                              str(tmp_path / "state"), "--work-dir", str(tmp_path / "node")],
                             capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert res.stderr.strip() == (f"error: port {port} on 127.0.0.1 is already in use "
                                  f"(is another gridserve running? pick another --http-port)")
    assert not (tmp_path / "state").exists()


def test_up_rejects_an_unknown_model_before_starting_anything(tmp_path):
    res = subprocess.run([GRIDSERVE, "up", "--model", "nope", "--state-dir", str(tmp_path / "state")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "model 'nope' is not in" in res.stderr and "smollm2" in res.stderr


@pytest.mark.integration
def test_up_serves_the_model_then_ctrl_c_stops_every_process(tmp_path, tiny_configs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([GRIDSERVE, "up", "--grpc-port", "0", "--http-port", "0", "--num-cpus", "2",
                             "--state-dir", str(tmp_path / "state"), "--work-dir", str(tmp_path / "node"),
                             "--model-configs", str(tiny_configs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "gridserve up exited early:\n" + "".join(lines)
            lines.append(line)
        out = "".join(lines)
        assert "loading tiny ..." in out
        url = re.search(r'curl -N -X POST (http://\S+/v1/chat/tiny) -d "What is the capital of France\?"', out)
        assert url, out
        flags = re.search(r"gridserve status (--head .*)", out).group(1).split()  # --head and --state-dir
        status = json.loads(subprocess.run([GRIDSERVE, "status", "-o", "json", *flags],
                                           capture_output=True, text=True, timeout=30).stdout)
        pids = [status["proxy_pid"], *(r["pid"] for r in status["replicas"])]
        pids += [int(p) for p in re.findall(r"starting (?:the head|a scheduler) .*?\(pid (\d+)", out)]
        assert len(pids) == 4, out
        assert all(alive(p) for p in pids)

        import urllib.request
        with urllib.request.urlopen(urllib.request.Request(url.group(1), data=b"Hello", method="POST"),
                                    timeout=60) as resp:
            assert resp.status == 200 and resp.read()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not [p for p in pids if alive(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
