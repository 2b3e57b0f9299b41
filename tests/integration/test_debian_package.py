"""The Debian package (debian/): dpkg-buildpackage -us -uc -b builds it from a scratch copy of
the tree (tracked and untracked files git does not ignore; no build artifact lands in the
source tree), and dpkg -x unpacks it into a scratch root, where its programs run. dpkg -x
rather than dpkg -i: it checks the same files and links without changing the machine; what
dpkg -i adds (maintainer scripts) is checked by reading them.

The build compiles the project once more (about a minute), once per session: the fixture is
module-scoped, and the module skips under a sanitizer build (test.sh's second pass), which
would only build the same package again.
"""

import os
import shutil
import subprocess

import pytest

from conftest import SOURCE_DIR, sanitized_build
from test_systemd_units import needs_systemd_analyze, verify_with_program

BUILD_TIMEOUT = 900


missing = [tool for tool in ("git", "dpkg-buildpackage", "dh", "lintian")
           if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (scripts/deps.sh)"),
    pytest.mark.skipif(not missing and sanitized_build(),
                       reason="built once, in the pass without sanitizers"),
]

PROGRAMS = ["usr/bin/thinblkd", "usr/bin/thinblkctl", "usr/sbin/thinblk-agent",
            "usr/bin/thinblk-vhost-io"]
MAN_PAGES = ["usr/share/man/man1/thinblkd.1.gz", "usr/share/man/man1/thinblkctl.1.gz",
             "usr/share/man/man8/thinblk-agent.8.gz", "usr/share/man/man1/thinblk-vhost-io.1.gz"]
UNITS = ["lib/systemd/system/thinblkd@.service", "lib/systemd/system/thinblk-agent.service"]


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(the .deb, the .changes, a scratch root it is unpacked in)."""
    scratch = tmp_path_factory.mktemp("package")
    tree = scratch / "thinblk"
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=SOURCE_DIR).stdout.split("\0")
    for name in filter(None, files):
        if (SOURCE_DIR / name).exists():   # tracked but deleted in the worktree: gone
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SOURCE_DIR / name, tree / name)
    env = dict(os.environ, DEB_BUILD_OPTIONS=f"parallel={os.cpu_count()} nocheck")
    r = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    version = run(["dpkg-parsechangelog", "-S", "Version"], cwd=tree).stdout.strip()
    deb = scratch / f"thinblk_{version}_{arch}.deb"
    root = scratch / "root"
    run(["dpkg", "-x", deb, root])
    return deb, scratch / f"thinblk_{version}_{arch}.changes", root


def test_package_holds_programs_man_pages_and_units(package):
    deb, _, _ = package
    listed = {line.split()[-1].removeprefix("./")
              for line in run(["dpkg", "-c", deb]).stdout.splitlines()}
    assert set(PROGRAMS + MAN_PAGES + UNITS) <= listed


def test_unpacked_programs_run(package):
    _, _, root = package
    assert run([root / "usr/bin/thinblkd", "--version"]).stdout.startswith("thinblkd ")
    assert "Usage" in run([root / "usr/bin/thinblkctl", "--help"]).stdout
    assert run([root / "usr/sbin/thinblk-agent", "--version"]).stdout.startswith("thinblk-agent")


def test_units_not_enabled_nor_started(package, tmp_path):
    """postinst (dh_installsystemd --no-enable --no-start) starts nothing and enables the
    agent again only on an upgrade where the admin had enabled it (debian-installed)."""
    deb, _, _ = package
    run(["dpkg-deb", "-e", deb, tmp_path / "control"])
    postinst = (tmp_path / "control" / "postinst").read_text()
    assert "deb-systemd-invoke" not in postinst
    assert "if deb-systemd-helper debian-installed 'thinblk-agent.service'" in postinst


@needs_systemd_analyze
@pytest.mark.parametrize("unit,program", zip(UNITS, ["usr/bin/thinblkd",
                                                      "usr/sbin/thinblk-agent"]))
def test_unpacked_units_verify_clean(package, tmp_path, unit, program):
    _, _, root = package
    assert verify_with_program(root / unit, root / program, tmp_path) == (0, "")


def test_lintian_finds_no_error(package):
    _, changes, _ = package
    r = subprocess.run(["lintian", changes], capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stdout.splitlines() if line.startswith("E: ")]
    assert errors == [], r.stdout
