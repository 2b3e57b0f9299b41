"""Boot a real Linux guest under QEMU TCG whose disk is served by an external block server.

    from guest import build_guest, Guest, FileDisk, NbdDisk, VhostUserBlkDisk

    image = build_guest()                        # cached kernel + initramfs (build-guest.sh)
    with Guest(image, NbdDisk(sock, "disk"), job="write", mb=8, workdir=tmp_path) as g:
        console, rc = g.wait(timeout=120)
        r = g.result()                           # {'job': 'write', 'write-sha256': ..., ...}
        assert r["write-sha256"] == r["readback-sha256"] and not g.io_error

    # Far more data than the guest's RAM: the stream job, one segment at a time.
    with Guest(image, NbdDisk(sock, "disk", reconnect_delay=30), job="stream", mb=256, seg=16) as g:
        g.wait(timeout=600)
        r = g.result()
        assert r["write-sha256"] == r["readback-sha256"] == nbd_stream_digest(uri, 256, 16)

The guest's /init (tests/guest/init) documents the jobs and the THINBLK-* console markers.
Synchronise on the console with wait_for_line(); never with sleeps.

The kernel and initramfs are cached in $THINBLK_GUEST_CACHE (default ~/.cache/thinblk-guest);
the first build downloads Debian's cloud kernel package and takes a few seconds.
"""

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
BUILD_SCRIPT = KIT_DIR / "build-guest.sh"
QEMU = "qemu-system-x86_64"
MIB = 1 << 20


class GuestError(Exception):
    """The guest did not do what was expected; the message ends with the console's tail."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kver: str


def qemu_path():
    """Path of qemu-system-x86_64, or None if it is not installed."""
    return shutil.which(QEMU)


_built = {}


def default_cache_dir():
    """$THINBLK_GUEST_CACHE, else $XDG_CACHE_HOME/thinblk-guest (~/.cache/thinblk-guest)."""
    if os.environ.get("THINBLK_GUEST_CACHE"):
        return Path(os.environ["THINBLK_GUEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "thinblk-guest"


def build_guest(cache_dir=None, refresh=False):
    """Runs build-guest.sh (fast when cached) and returns a GuestImage. Memoised per cache_dir
    (default: default_cache_dir())."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = str(cache_dir)
    if key in _built and not refresh:
        return _built[key]
    cmd = ["bash", str(BUILD_SCRIPT)]
    if refresh:
        cmd.append("--refresh")
    cmd.append(str(cache_dir))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise GuestError(f"build-guest.sh failed ({p.returncode}):\n{p.stderr}")
    out = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    image = GuestImage(Path(out["KERNEL"]), Path(out["INITRD"]), out["KVER"])
    _built[key] = image
    return image


# ---- disks -----------------------------------------------------------------------------------

@dataclass
class FileDisk:
    """A virtio-blk disk on a local raw image, opened by QEMU itself (no external server)."""
    path: str
    shared_memory = False

    def qemu_args(self, i):
        return ["-blockdev", f"driver=file,node-name=file{i},filename={self.path}",
                "-blockdev", f"driver=raw,node-name=raw{i},file=file{i}",
                "-device", f"virtio-blk-pci,id=vblk{i},drive=raw{i}"]


@dataclass
class NbdDisk:
    """A virtio-blk disk on an NBD export over a Unix socket. werror/rerror=report hand server
    errors to the guest (QEMU would otherwise stop the VM itself on ENOSPC)."""
    socket: str
    export: str = ""
    werror: str = "report"
    rerror: str = "report"
    # Seconds QEMU's NBD client keeps failed and new requests while it reconnects to a server
    # that went away (QEMU's reconnect-delay; 0: fail them at once). Requests in flight when the
    # connection broke are sent again once reconnected.
    reconnect_delay: int = 0
    shared_memory = False

    def qemu_args(self, i):
        node = f"nbd{i}"
        blockdev = f"driver=nbd,node-name={node},server.type=unix,server.path={self.socket}"
        if self.export:
            blockdev += f",export={self.export}"
        if self.reconnect_delay:
            blockdev += f",reconnect-delay={self.reconnect_delay}"
        return ["-blockdev", blockdev,
                "-device", f"virtio-blk-pci,id=vblk{i},drive={node},"
                           f"werror={self.werror},rerror={self.rerror}"]


@dataclass
class VhostUserBlkDisk:
    """A vhost-user-blk disk: QEMU connects to the server's socket; guest RAM must be shared."""
    socket: str
    num_queues: int = 0     # 0: QEMU's default
    reconnect: int = 0      # seconds between QEMU's attempts to reconnect; 0: it does not

    shared_memory = True

    def qemu_args(self, i):
        dev = f"vhost-user-blk-pci,id=vublk{i},chardev=vub{i}"
        if self.num_queues:
            dev += f",num-queues={self.num_queues}"
        chardev = f"socket,id=vub{i},path={self.socket}"
        if self.reconnect:
            chardev += f",reconnect={self.reconnect}"
        return ["-chardev", chardev, "-device", dev]


# ---- helpers for tests -------------------------------------------------------------------------

def pattern(mb, seed, off=0):
    """The bytes the write job writes with thinblk.seed=SEED at OFF MiB: one 512-byte line per
    sector, 'thinblk seed=S sector=N' padded with spaces, N the absolute sector number."""
    first = off * 2048
    return b"".join(
        (f"thinblk seed={seed} sector={s}".ljust(511) + "\n").encode()
        for s in range(first, first + mb * 2048))


def digest_list(hexes):
    """The stream job's overall digest: sha256 of its segment digests, one "<hex>\\n" line each."""
    return hashlib.sha256("".join(h + "\n" for h in hexes).encode()).hexdigest()


def stream_segment_digests(read, mb, seg, off=0):
    """sha256 of every SEG MiB segment of MB MiB at OFF MiB, READ(offset, length) -> bytes
    giving the disk's contents (a file, or an NBD export: nbd_reader())."""
    out = []
    for at in range(off, off + mb, seg):
        h = hashlib.sha256()
        for m in range(at, at + seg):
            h.update(read(m * MIB, MIB))
        out.append(h.hexdigest())
    return out


def nbd_reader(uri):
    """(read(offset, length) -> bytes, close()) over an NBD URI, with python3-libnbd."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)

    def close():
        try:
            h.shutdown()
        except nbd.Error:
            pass
    return (lambda offset, length: h.pread(length, offset)), close


def nbd_stream_digest(uri, mb, seg, off=0):
    """digest_list() of the stream job's segments as read back through an NBD export."""
    read, close = nbd_reader(uri)
    try:
        return digest_list(stream_segment_digests(read, mb, seg, off))
    finally:
        close()


def file_sha256(path, offset=0, length=None):
    """sha256 hex digest of LENGTH bytes of PATH from OFFSET (to the end if None)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = f.read(MIB if left is None else min(MIB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def file_reader(path):
    """(read(offset, length) -> bytes, close()) over a file, as nbd_reader() over NBD."""
    f = open(path, "rb")
    return (lambda offset, length: os.pread(f.fileno(), length, offset)), f.close


def raw_copy(image, fmt, out):
    """The guest-visible contents of IMAGE (format FMT: "raw", "qcow2") as the raw file OUT
    (returned), by qemu-img convert with shared access (-U): it may run beside the server
    that has the image open, and reads the image through QEMU's driver, not ours."""
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(out)],
                   check=True)
    return out


def image_sha256(image, fmt, offset, length, workdir):
    """file_sha256() of the guest-visible bytes of IMAGE: the file itself if raw, else a
    raw_copy() made in WORKDIR."""
    if fmt != "raw":
        image = raw_copy(image, fmt, Path(workdir) / f"{Path(image).name}.raw")
    return file_sha256(image, offset, length)


def wait_until(predicate, timeout, what, interval=0.02):
    """Polls PREDICATE until it returns a true value (returned) or TIMEOUT seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _die_with_parent():
    # So that QEMU does not outlive a killed test run. (The signal follows the thread that
    # started QEMU: start guests from a thread that lives as long as they do.)
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


# ---- the guest ---------------------------------------------------------------------------------

_RESULT_RE = re.compile(r"THINBLK-RESULT ([^\n]*)")
_INT_KEYS = {"mb", "off", "seg", "i", "count", "discard-max", "write-zeroes-max", "dd-status",
             "read-status", "discard-status", "zero-status", "punch-status"}


def _fields(text):
    r = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            r[k] = int(v) if k in _INT_KEYS and v.lstrip("-").isdigit() else v
    return r


class Guest:
    """One QEMU TCG guest running one /init job against DISKS. Use as a context manager: QEMU
    is started on entry and killed on exit if still running. The serial console is written to
    WORKDIR/console.log (QEMU's stderr to WORKDIR/qemu.err); WORKDIR defaults to a temporary
    folder removed on close."""

    def __init__(self, image, disks, job="write", mb=8, off=0, bs=None, seed=None, seg=None,
                 par=None, cpus=1, mem=512, append="", extra_args=(), workdir=None, qmp=False):
        self.image = image
        self.disks = list(disks) if isinstance(disks, (list, tuple)) else [disks]
        self.mem = mem
        self.cpus = cpus    # -smp: the guest's virtio-blk uses min(queues, CPUs) queues
        params = {"job": job, "mb": mb, "off": off, "bs": bs, "seed": seed, "seg": seg,
                  "par": par}
        self.append = " ".join(["console=ttyS0 quiet panic=-1"] +
                               [f"thinblk.{k}={v}" for k, v in params.items() if v is not None] +
                               ([append] if append else []))
        self.extra_args = list(extra_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="thinblk-guest-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_path = self.workdir / "console.log"
        self.stderr_path = self.workdir / "qemu.err"
        self.qmp_socket = self.workdir / "qmp.sock" if qmp else None
        self.proc = None
        self.started_at = None
        self.elapsed = None     # seconds from start() to QEMU's exit, set by wait()

    def command(self):
        machine = "q35"
        args = []
        if any(d.shared_memory for d in self.disks):
            # vhost-user back-ends map guest RAM: it must be a shareable memfd.
            args += ["-object", f"memory-backend-memfd,id=mem,size={self.mem}M,share=on"]
            machine += ",memory-backend=mem"
        if self.cpus > 1:
            args += ["-smp", str(self.cpus)]
        args = [qemu_path() or QEMU, "-accel", "tcg", "-machine", machine, "-m", str(self.mem),
                "-nographic", "-no-reboot", "-nic", "none",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
                "-append", self.append] + args
        for i, d in enumerate(self.disks):
            args += d.qemu_args(i)
        if self.qmp_socket:
            args += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        return args + self.extra_args

    def start(self):
        with open(self.console_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, preexec_fn=_die_with_parent)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def kill(self):
        """Stops QEMU if it still runs (SIGTERM, then SIGKILL); the console stays readable."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def close(self):
        """Kills QEMU if it still runs; removes the workdir if we created it."""
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- console

    @property
    def console(self):
        """Everything the guest printed so far, with \\r removed."""
        try:
            data = self.console_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r", "")

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _fail(self, why):
        tail = "\n".join(self.console.splitlines()[-40:])
        err = self.stderr().strip()
        raise GuestError(f"{why}\n--- qemu stderr ---\n{err}\n--- console (tail) ---\n{tail}")

    def wait_for_line(self, pattern, timeout=60):
        """Waits until a console line matches the regex PATTERN (re.search) and returns the
        match. Raises GuestError on timeout or if QEMU exits first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            # Read the console before polling the process, so output written just before the
            # exit is not missed.
            for line in self.console.splitlines():
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None:
                self._fail(f"QEMU exited ({self.proc.returncode}) before a line matched {pattern!r}")
            if time.monotonic() >= deadline:
                self._fail(f"no console line matched {pattern!r} within {timeout}s")
            time.sleep(0.05)

    def wait(self, timeout=120):
        """Waits for QEMU to exit (the guest powers off after its job) and returns (console,
        QEMU's exit code). On timeout, kills QEMU and raises GuestError."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._fail(f"guest still running after {timeout}s")
        if self.elapsed is None:
            self.elapsed = time.monotonic() - self.started_at
        return self.console, rc

    # -- parsed markers

    def markers(self, name):
        """The text after 'THINBLK-NAME' of every such marker line, in order."""
        rx = re.compile(rf"THINBLK-{re.escape(name)}(?: (.*))?$")
        return [m.group(1) or "" for m in map(rx.search, self.console.splitlines()) if m]

    def result(self):
        """The THINBLK-RESULT line as a dict ('job', 'mb', 'off', 'seg', 'write-sha256',
        'readback-sha256', 'read-sha256', 'dd-status', 'read-status', the discard job's
        'discard-status', 'zero-status', 'punch-status'; ints where numeric)."""
        m = _RESULT_RE.search(self.console)
        if not m:
            self._fail("no THINBLK-RESULT line on the console")
        return _fields(m.group(1))

    def segments(self, name="SEG"):
        """The stream job's THINBLK-SEG (written) or THINBLK-RSEG (read back) markers so far, as
        dicts ('i', 'off', 'write-sha256' or 'readback-sha256', 'dd-status' or 'read-status')."""
        return [_fields(text) for text in self.markers(name)]

    def wait_for_segments(self, n, timeout=300):
        """Waits until the stream job has written N segments; returns them."""
        self.wait_for_line(rf"THINBLK-SEG i={n - 1} ", timeout)
        return self.segments()

    def fields(self, name):
        """Every THINBLK-NAME marker of key=value fields, as a dict (ints where numeric)."""
        return [_fields(text) for text in self.markers(name)]

    def queue_interrupts(self):
        """{virtqueue's interrupt name: interrupts the guest took on it} (THINBLK-IRQ); more
        than 0 if that queue completed requests (several may share one: EVENT_IDX)."""
        return {f["name"]: f["count"] for f in self.fields("IRQ")}

    @property
    def io_error(self):
        """True if the guest reported a block I/O error in its dmesg (THINBLK-IOERROR)."""
        return bool(self.markers("IOERROR"))

    @property
    def dmesg(self):
        """The guest's dmesg lines about its disk or I/O errors (THINBLK-DMESG)."""
        return self.markers("DMESG")

    @property
    def status(self):
        """The job's status from THINBLK-END (0: success), or None if it did not get there."""
        ends = self.markers("END")
        m = re.match(r"status=(\d+)", ends[-1]) if ends else None
        return int(m.group(1)) if m else None


def main():
    """Debug: boot the guest on a disk, console on this terminal. Example:
    python3 tests/guest/guest.py --nbd /tmp/nbd.sock --export disk --job shell"""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--file", metavar="IMAGE", help="a local raw image")
    g.add_argument("--nbd", metavar="SOCK")
    g.add_argument("--vhost-user", metavar="SOCK")
    ap.add_argument("--export", default="")
    ap.add_argument("--job", default="shell")
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--seg", type=int)
    ap.add_argument("--cache-dir")
    a = ap.parse_args()
    if a.file:
        disk = FileDisk(a.file)
    elif a.nbd:
        disk = NbdDisk(a.nbd, a.export)
    else:
        disk = VhostUserBlkDisk(a.vhost_user)
    guest = Guest(build_guest(a.cache_dir), disk, job=a.job, mb=a.mb, seed=a.seed, seg=a.seg,
                  workdir=tempfile.gettempdir())
    cmd = guest.command()
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def small_tmpfs(size, name="thinblk-test"):
    """A tmpfs of size (mount's syntax, "8M") on a new directory under /tmp, for running out
    of space for real; unmounted (lazily if still busy) and removed afterwards. Needs root."""
    mnt = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", name, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
        mnt.rmdir()


def grow_tmpfs(mnt, size):
    """Give the tmpfs at mnt more room (the volume is extended)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
