"""A TCP NBD client that goes away while its device is stopped frees its connection at once,
not at cont: while the connection is not read, the daemon still watches for the client's
shutdown (EPOLLRDHUP). And QEMU's NBD client waits through a stop longer than its
reconnect-delay (docs/thin-provisioning.md; libnbd's wait is in test_nbd_protocol.py)."""
import socket
import subprocess
import time

import nbd

from conftest import TIMEOUT


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(daemons, tmp_path):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    port = free_port()
    d = daemons.start(args=[
        "-v", "-v",
        "--blockdev", f"driver=file,node-name=proto0,filename={image}",
        "--blockdev", "driver=raw,node-name=fmt0,file=proto0",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},"
                        "max-connections=1",
        "--export", "type=nbd,id=disk0,node-name=fmt0,name=disk,writable=on"])
    return d, f"nbd://127.0.0.1:{port}/disk"


def wait_for(cond, what):
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT}s"
        time.sleep(0.02)


def test_client_gone_while_stopped_frees_its_slot(daemons, tmp_path):
    d, uri = start(daemons, tmp_path)
    qmp = d.negotiated()
    h = nbd.NBD()
    h.connect_uri(uri)
    assert qmp.cmd("stop") == {"return": {}}
    h.aio_pwrite(b"\x5a" * 4096, 0)       # held: the connection is not read while stopped
    h.poll(0)
    del h                                   # nbd_close(): abruptly, no NBD_CMD_DISC
    wait_for(lambda: "closing: hang-up while not reading" in d.stderr(), "hang-up logged")
    # The one slot is free: a new client completes its handshake while still stopped.
    r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, f"{16 << 20}\n"), r.stderr
    assert qmp.cmd("cont") == {"return": {}}
    # The dropped write was never done: nobody got a reply for it.
    h2 = nbd.NBD()
    h2.connect_uri(uri)
    assert h2.pread(4096, 0) == b"\0" * 4096
    h2.shutdown()


def test_qemu_nbd_client_with_reconnect_delay_waits_through_a_stop(daemons, tmp_path):
    """reconnect-delay is for a lost connection, not a slow reply: a stop longer than it
    is waited through."""
    d, uri = start(daemons, tmp_path)
    qmp = d.negotiated()
    assert qmp.cmd("stop") == {"return": {}}
    port = uri.split(":")[2].split("/")[0]
    p = subprocess.Popen(
        ["qemu-io", "--image-opts", "-c", "write -P 0x3c 0 64k",
         f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
         "export=disk,reconnect-delay=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    assert p.poll() is None
    assert qmp.cmd("cont") == {"return": {}}
    out, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0 and "wrote 65536/65536 bytes" in out, out
