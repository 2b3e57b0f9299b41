"""run.sh, the quick start, in a temporary run directory: what it prints, the mode without the
agent, and that a SIGINT to its whole process group (Ctrl-C in a terminal) leaves no loop
device behind. run.sh --serve skips the set-up and the build."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BUILD_DIR, TIMEOUT

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="run.sh attaches a loop device")


def loop_devices(img):
    out = subprocess.run(["losetup", "-n", "-O", "NAME", "-j", str(img)], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


def start(tmp_path, **env):
    log = open(tmp_path / "run.log", "w+")
    p = subprocess.Popen([str(ROOT / "run.sh"), "--serve"], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "THINBLK_RUN_DIR": str(tmp_path / "run"),
                              "THINBLK_BUILD": str(BUILD_DIR), "THINBLK_INITIAL": "64M",
                              "THINBLK_VSIZE": "1G", **env})
    deadline = time.monotonic() + TIMEOUT
    while "From another terminal" not in (tmp_path / "run.log").read_text():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail((tmp_path / "run.log").read_text())
        time.sleep(0.05)
    return p, (tmp_path / "run.log").read_text()


def interrupt_group(p):
    os.killpg(p.pid, signal.SIGINT)
    p.wait(timeout=TIMEOUT)


def test_group_sigint_detaches_the_loop_device(tmp_path):
    img = tmp_path / "run" / "disk.img"
    p, out = start(tmp_path)
    assert len(loop_devices(img)) == 1, out
    interrupt_group(p)
    assert loop_devices(img) == [], (tmp_path / "run.log").read_text()
    # And again, serving the disk made the first time.
    p, out = start(tmp_path)
    interrupt_group(p)
    assert loop_devices(img) == [], (tmp_path / "run.log").read_text()


def test_allocation_printed_is_what_the_file_takes(tmp_path):
    p, out = start(tmp_path)
    interrupt_group(p)
    st = os.stat(tmp_path / "run" / "disk.img")
    m = re.search(r"(\d+) MiB allocated of (\d+) MiB", out)
    assert m, out
    assert int(m.group(2)) == 64
    assert int(m.group(1)) == st.st_blocks * 512 >> 20 < 64


def test_without_the_agent(tmp_path):
    p, out = start(tmp_path, THINBLK_AGENT="0")
    ps = subprocess.run(["pgrep", "-s", str(p.pid), "-f", "thinblk-agent"],
                        capture_output=True, text=True)
    interrupt_group(p)
    assert ps.stdout == "", ps
    assert "no agent: when the disk runs out" in out
    assert "thinblk-agent" not in (tmp_path / "run.log").read_text()
