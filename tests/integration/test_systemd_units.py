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

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="needs systemd-analyze (package systemd)")


def verify(unit_dir, names):
    """systemd-analyze verify's exit status and complaints about the units in unit_dir."""
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=unit_dir,
                       capture_output=True, text=True, timeout=TIMEOUT)
    return r.returncode, (r.stdout + r.stderr).strip()


def verify_with_program(unit, program, scratch):
    """verify on a copy of unit (a path) in scratch, its ExecStart= running program instead."""
    text, count = re.subn(rf"^ExecStart=\S*/{program.name} ", f"ExecStart={program} ",
                          unit.read_text(), flags=re.M)
    assert count == 1, text
    (scratch / unit.name).write_text(text)
    return verify(scratch, [unit.name])


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_clean(tmp_path, name):
    assert verify_with_program(BUILD_DIR / "systemd" / name, UNITS[name], tmp_path) == (0, "")


@needs_systemd_analyze
def test_verify_complains_of_a_bad_directive(tmp_path):
    """verify exits 0 on a directive it ignores: the tests above must read its output too."""
    (tmp_path / "bad.service").write_text(
        "[Service]\nExecStart=/bin/true\nDeviceAllow=block-* rwz\n")
    code, out = verify(tmp_path, ["bad.service"])
    assert code == 0 and "Invalid device rights 'rwz'" in out
