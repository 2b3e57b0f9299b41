"""A throwaway single-node Ceph cluster for the tests, started once per test session.

One monitor, one manager and one OSD on 127.0.0.1 (msgr2 only), memstore (nothing on disk but
this directory; memstore is not sparse: keep images small), no authentication, no systemd, no
replication (size 1). The manager is required: without it pool statistics never reach the
monitor and quotas are never enforced; its reporting periods are 1 s so a pool over its quota
is flagged full in 2 to 3 s rather than 7.

The fixture ceph_cephx is a second such cluster with cephx required everywhere (its daemons'
keys made beforehand and given to the monitor at mkfs; the ceph and rbd tools use
client.admin's keyring), for the tests of keys; it starts only if a test asks for it.

    def test_x(ceph):
        pool = ceph.new_pool(quota_bytes=64 * MiB)
        ceph.create_image(pool, "disk", 256 * MiB)
        ... --blockdev driver=rbd,pool=POOL,image=disk,conf=ceph.conf ...

Every ceph/rbd command is bounded by a timeout: some block forever when a daemon is missing.
Needs root (the daemons run as root here) and Debian's ceph-mon, ceph-mgr, ceph-osd and
ceph-common; skips with a clear message without them.
"""
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

PACKAGES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd", "monmaptool")
START_TIMEOUT = 90     # seconds for the whole cluster to come up
MiB = 1024 * 1024


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gen_key():
    """A new cephx key (base64 of a 16-byte AES key with its header), as ceph-authtool makes."""
    return subprocess.run(["ceph-authtool", "--gen-print-key"], check=True, capture_output=True,
                          text=True, timeout=30).stdout.strip()


def keyring_entry(entity, key, **caps):
    lines = [f"[{entity}]", f"\tkey = {key}"]
    lines += [f'\tcaps {svc} = "{cap}"' for svc, cap in sorted(caps.items())]
    return "\n".join(lines) + "\n"


class Cluster:
    def __init__(self, directory, cephx=False):
        self.dir = Path(directory)
        self.cephx = cephx
        self.conf = str(self.dir / "ceph.conf")
        self.procs = {}
        self.osd_frozen = False
        self._pools = itertools.count()
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        for sub in ("run", "log", "mon", "mgr", "osd"):
            (self.dir / sub).mkdir()
        d = self.dir
        Path(self.conf).write_text(f"""[global]
fsid = {self.fsid}
mon_host = v2:127.0.0.1:{self.port}
auth_cluster_required = {"cephx" if cephx else "none"}
auth_service_required = {"cephx" if cephx else "none"}
auth_client_required = {"cephx" if cephx else "none"}
ms_bind_msgr1 = false
ms_bind_msgr2 = true
run_dir = {d}/run
admin_socket = {d}/run/$cluster-$name.$pid.$cctid.asok
log_file = {d}/log/$name.log
mon_data = {d}/mon/$cluster-$id
mgr_data = {d}/mgr/$cluster-$id
osd_data = {d}/osd/$cluster-$id
osd_objectstore = memstore
memstore_device_bytes = {1024 * MiB}
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
osd_crush_chooseleaf_type = 0
mgr_stats_period = 1
mon_mgr_digest_period = 1
osd_mon_report_interval = 1
mgr_tick_period = 1
osd_memory_target = {512 * MiB}
""")
        if cephx:
            self._write_keys()

    def _write_keys(self):
        d = self.dir
        admin = keyring_entry("client.admin", gen_key(), mon="allow *", osd="allow *",
                              mds="allow *", mgr="allow *")
        mgr = keyring_entry("mgr.x", gen_key(), mon="allow profile mgr", osd="allow *",
                            mds="allow *")
        osd = keyring_entry("osd.0", gen_key(), mon="allow profile osd",
                            mgr="allow profile osd", osd="allow *")
        (d / "admin.keyring").write_text(admin)
        (d / "mon.keyring").write_text(keyring_entry("mon.", gen_key(), mon="allow *") +
                                       admin + mgr + osd)
        self.mgr_keyring, self.osd_keyring = mgr, osd
        with open(self.conf, "a") as f:
            f.write(f"[client.admin]\nkeyring = {d}/admin.keyring\n")

    # ---- commands ----

    def _run(self, prog, args, timeout):
        r = subprocess.run([prog, "--conf", self.conf, *map(str, args)], capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{prog} {' '.join(map(str, args))}: exit {r.returncode}: "
                               f"{r.stderr.strip()}")
        return r.stdout

    def cli(self, *args, timeout=30):
        """`ceph --conf CONF ARGS`: its standard output; raises on failure or timeout."""
        return self._run("ceph", args, timeout)

    def rbd(self, *args, timeout=30):
        """`rbd --conf CONF ARGS`: its standard output; raises on failure or timeout."""
        return self._run("rbd", args, timeout)

    # ---- pools and images ----

    def new_pool(self, quota_bytes=0, pgs=8):
        """A fresh pool with a unique name, initialised for RBD, with a quota if given."""
        name = f"p{next(self._pools)}"
        self.cli("osd", "pool", "create", name, pgs)
        self.rbd("pool", "init", name, timeout=60)
        if quota_bytes:
            self.set_quota(name, quota_bytes)
        return name

    def set_quota(self, pool, max_bytes):
        """The pool's max_bytes quota; 0 lifts it."""
        self.cli("osd", "pool", "set-quota", pool, "max_bytes", max_bytes)

    def is_full(self, pool):
        for p in json.loads(self.cli("osd", "pool", "ls", "detail", "--format", "json")):
            if p["pool_name"] == pool:
                return "full" in p.get("flags_names", "").split(",") or \
                    "full_quota" in p.get("flags_names", "").split(",")
        raise KeyError(pool)

    def wait_full(self, pool, full=True, timeout=60):
        """Until the monitor has flagged the pool full (its quota reached), or not."""
        deadline = time.monotonic() + timeout
        while self.is_full(pool) != full:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pool {pool} not {'full' if full else 'free'} "
                                   f"after {timeout} s")
            time.sleep(0.2)   # polling the monitor: there is no event to wait on

    def user_key(self, name, pool):
        """A cephx user client.NAME allowed RBD on pool (created if new): its key, base64."""
        out = self.cli("auth", "get-or-create", f"client.{name}", "mon", "profile rbd",
                       "osd", f"profile rbd pool={pool}", "--format", "json")
        return json.loads(out)[0]["key"]

    def create_image(self, pool, name, size):
        self.rbd("create", "--size", f"{size // MiB}M", f"{pool}/{name}")

    def qemu_spec(self, pool, image):
        """QEMU's legacy file name for the image, for qemu-img and qemu-io."""
        return f"rbd:{pool}/{image}:conf={self.conf}"

    # ---- daemons ----

    def _spawn(self, name, args):
        log = open(self.dir / "log" / f"{name}.stderr", "ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def _wait(self, what, cond, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"ceph {name} exited with {p.returncode} while waiting "
                                       f"for {what}: see {self.dir}/log")
            try:
                if cond():
                    return
            except (RuntimeError, subprocess.TimeoutExpired, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ceph: {what} not after {timeout} s: see {self.dir}/log")
            time.sleep(0.2)   # polling the monitor: there is no event to wait on

    def _osd_up(self):
        stat = json.loads(self.cli("osd", "stat", "--format", "json", timeout=10))
        return stat.get("num_up_osds") == 1 and stat.get("num_in_osds") == 1

    def start(self):
        subprocess.run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                        f"[v2:127.0.0.1:{self.port}]", str(self.dir / "monmap")],
                       check=True, capture_output=True, timeout=30)
        keyring = ["--keyring", str(self.dir / "mon.keyring")] if self.cephx else []
        subprocess.run(["ceph-mon", "--conf", self.conf, "--mkfs", "-i", "a", "--monmap",
                        str(self.dir / "monmap"), *keyring], check=True, capture_output=True,
                       timeout=60)
        self._spawn("mon", ["ceph-mon", "--conf", self.conf, "-f", "-i", "a"])
        (self.dir / "mgr" / "ceph-x").mkdir()
        if self.cephx:
            (self.dir / "mgr" / "ceph-x" / "keyring").write_text(self.mgr_keyring)
        self._spawn("mgr", ["ceph-mgr", "--conf", self.conf, "-f", "-i", "x"])
        self._wait("the monitor", lambda: self.cli("mon", "stat", timeout=10) is not None)
        osd_id = self.cli("osd", "new", self.osd_uuid).strip()
        assert osd_id == "0", osd_id
        (self.dir / "osd" / "ceph-0").mkdir()
        if self.cephx:
            (self.dir / "osd" / "ceph-0" / "keyring").write_text(self.osd_keyring)
        subprocess.run(["ceph-osd", "--conf", self.conf, "--mkfs", "-i", "0", "--osd-uuid",
                        self.osd_uuid], check=True, capture_output=True, timeout=60)
        self.start_osd()
        self._wait("the manager", lambda: json.loads(
            self.cli("mgr", "stat", "--format", "json", timeout=10)).get("available"))

    def start_osd(self):
        """The OSD answering again: thawed if kill_osd() froze it, else started; returns once
        the cluster sees it up."""
        p = self.procs.get("osd")
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            self.osd_frozen = False
        else:
            self._spawn("osd", ["ceph-osd", "--conf", self.conf, "-f", "-i", "0"])
        self._wait("the OSD up", self._osd_up)

    def kill_osd(self):
        """The only OSD stops answering, as a dead or unreachable one does to its clients:
        frozen (SIGSTOP), not killed, because memstore keeps the data in the process and a
        killed OSD would come back empty. With one OSD nothing marks it down meanwhile
        (no peers to report it), so clients see their operations time out."""
        os.kill(self.procs["osd"].pid, signal.SIGSTOP)
        self.osd_frozen = True

    def stop(self):
        if self.osd_frozen:
            os.kill(self.procs["osd"].pid, signal.SIGCONT)
        for name in ("osd", "mgr", "mon"):
            p = self.procs.pop(name, None)
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _cluster(cephx):
    missing = [p for p in PACKAGES + (("ceph-authtool",) if cephx else ())
               if shutil.which(p) is None]
    if missing:
        pytest.skip("Ceph is not installed (" + ", ".join(missing) + "): scripts/deps.sh "
                    "installs ceph-mon ceph-mgr ceph-osd ceph-common")
    if os.geteuid() != 0:
        pytest.skip("the Ceph test cluster runs as root")
    directory = tempfile.mkdtemp(prefix="thinblk-ceph-")
    cluster = Cluster(directory, cephx=cephx)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph():
    yield from _cluster(cephx=False)


@pytest.fixture(scope="session")
def ceph_cephx():
    yield from _cluster(cephx=True)
