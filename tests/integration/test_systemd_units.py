"""The systemd units as built (systemd/*.service.in with this build's paths): systemd-analyze
verify finds nothing to say about them. Their programs are pointed at the build's, as verify
checks that ExecStart= is executable and the build's prefix need not be installed."""

import re
import shutil
import subprocess

import pytest

from conftest import BUILD_DIR, TIMEOUT

UNITS = {"thinblkd@.service": BUILD_DIR / "src" / "daemon" / "thinblkd",
         "thinblk-agent.service": BUILD_DIR / "src" / "agent" / "thinblk-agent"}


def verify(unit_dir, names):
    """systemd-analyze verify's complaints (stdout and stderr) about the units in unit_dir."""
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=unit_dir,
                       capture_output=True, text=True, timeout=TIMEOUT)
    return r.returncode, (r.stdout + r.stderr).strip()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_clean(tmp_path, name):
    text = (BUILD_DIR / "systemd" / name).read_text()
    program = UNITS[name]
    text, count = re.subn(rf"^ExecStart=\S*/{program.name} ", f"ExecStart={program} ", text,
                          flags=re.M)
    assert count == 1, text
    (tmp_path / name).write_text(text)
    assert verify(tmp_path, [name]) == (0, "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_verify_complains_of_a_bad_directive(tmp_path):
    """verify exits 0 on a directive it ignores: the tests above must read its output too."""
    (tmp_path / "bad.service").write_text(
        "[Service]\nExecStart=/bin/true\nDeviceAllow=block-* rwz\n")
    code, out = verify(tmp_path, ["bad.service"])
    assert code == 0 and "Invalid device rights 'rwz'" in out
