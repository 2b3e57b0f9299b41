"""rbd's key-secret against a Ceph cluster that requires cephx (the fixture ceph_cephx, apart
from the session's auth-none cluster): the key of a cephx user given as a secret object, as
QEMU takes it (the secret holds the key's bytes; librados gets their base64), also in
libvirt's encrypted form. A wrong or missing key fails blockdev-add with librados' error and
the daemon goes on serving.
"""
import base64
import json
import shutil
import subprocess

import nbd
import pytest

from ceph import ceph_cephx  # noqa: F401  (the cephx cluster fixture)
from conftest import error, ok
from test_rbd import built_with_rbd, job_statuses
from test_secret import IV, MASTER, b64, encrypt

pytestmark = pytest.mark.skipif(not built_with_rbd(), reason="thinblkd was built without the "
                                "rbd driver (it needs librbd-dev and librados-dev)")

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(ceph_cephx):
    """A pool with an image, and a cephx user allowed on it: (cluster, pool, user, key)."""
    pool = ceph_cephx.new_pool()
    ceph_cephx.create_image(pool, "disk", 8 * MiB)
    key = ceph_cephx.user_key("vm1", pool)
    return ceph_cephx, pool, "vm1", key


def rbd_opts(c, pool, user, **extra):
    return {"driver": "rbd", "pool": pool, "image": "disk", "conf": c.conf, "user": user,
            "__org.thinblk_op-timeout": 10, **extra}


def serve(qmp, node, sock, name):
    ok(qmp.cmd("block-export-add", {"type": "nbd", "id": f"e-{name}", "node-name": node,
                                    "name": name, "writable": True}))
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
    return h


def rbd_read(c, pool, offset, length):
    """The image's bytes as the rbd tool (client.admin) reads them."""
    data = subprocess.run(["rbd", "--conf", c.conf, "export", f"{pool}/disk", "-"],
                          capture_output=True, check=True, timeout=60).stdout
    return data[offset:offset + length]


def start(daemons, tmp_path, args=()):
    sock = tmp_path / "nbd.sock"
    d = daemons.start(args=["--nbd-server", f"addr.type=unix,addr.path={sock}", *args])
    return d, d.negotiated(), sock


def test_key_secret_opens_the_image(cluster, daemons, tmp_path):
    c, pool, user, key = cluster
    d, qmp, sock = start(daemons, tmp_path, ["-v", "-v"])  # logging at debug level
    # The secret holds the key's bytes: its base64 text is the key ceph prints.
    ok(qmp.cmd("object-add", {"qom-type": "secret", "id": "sec0", "data": key,
                              "format": "base64"}))
    ok(qmp.cmd("blockdev-add", rbd_opts(c, pool, user, **{
        "node-name": "r0", "key-secret": "sec0", "auth-client-required": ["cephx"]})))
    h = serve(qmp, "r0", sock, "disk")
    pattern = bytes(range(256)) * 16
    h.pwrite(pattern, 64 * 1024)
    h.flush()
    assert h.pread(len(pattern), 64 * 1024) == pattern
    assert rbd_read(c, pool, 64 * 1024, len(pattern)) == pattern
    # The key is nowhere in what the daemon shows or logs.
    shown = json.dumps([qmp.cmd("query-named-block-nodes"), qmp.cmd("query-block")])
    assert key not in shown
    assert key not in d.stderr()
    # As QEMU: the secret was read at open; deleting it leaves the node alone.
    ok(qmp.cmd("object-del", {"id": "sec0"}))
    assert h.pread(len(pattern), 64 * 1024) == pattern
    h.shutdown()


def test_libvirt_encrypted_key_on_the_command_line(cluster, daemons, tmp_path):
    """libvirt's arguments: a master key file and the disk's key encrypted with it; the node
    opened at --blockdev (on the loop thread, not blockdev-add's offload thread)."""
    c, pool, user, key = cluster
    master = tmp_path / "master-key.aes"
    master.write_bytes(MASTER)
    ct = b64(encrypt(MASTER, IV, base64.b64decode(key)))
    blockdev = ",".join(f"{k}={v}" for k, v in rbd_opts(c, pool, user).items()
                        if not k.startswith("__"))
    d, qmp, sock = start(daemons, tmp_path, [
        "--object", f"secret,id=masterKey0,format=raw,file={master}",
        "--object", f"secret,id=virtio-disk0-secret0,data={ct},keyid=masterKey0,"
                    f"iv={b64(IV)},format=base64",
        "--blockdev", f"{blockdev},node-name=r0,key-secret=virtio-disk0-secret0"])
    h = serve(qmp, "r0", sock, "disk")
    h.pwrite(b"\x5a" * 4096, 0)
    h.flush()
    assert h.pread(4096, 0) == b"\x5a" * 4096
    assert rbd_read(c, pool, 0, 4096) == b"\x5a" * 4096
    h.shutdown()
    # QEMU takes the very same objects and options.
    if shutil.which("qemu-io"):
        r = subprocess.run([
            "qemu-io", "--object", f"secret,id=masterKey0,format=raw,file={master}",
            "--object", f"secret,id=s0,data={ct},keyid=masterKey0,iv={b64(IV)},format=base64",
            "--image-opts", f"{blockdev},key-secret=s0", "-c", "read -P 0x5a 0 4096"],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r
        assert "Pattern verification failed" not in r.stdout, r
        assert "read 4096/4096 bytes at offset 0" in r.stdout, r


def test_wrong_or_missing_key_fails_and_the_daemon_goes_on(cluster, daemons, tmp_path):
    c, pool, user, key = cluster
    d, qmp, sock = start(daemons, tmp_path)
    ok(qmp.cmd("object-add", {"qom-type": "secret", "id": "good", "data": key,
                              "format": "base64"}))
    ok(qmp.cmd("blockdev-add", rbd_opts(c, pool, user, **{"node-name": "r0",
                                                          "key-secret": "good"})))
    h = serve(qmp, "r0", sock, "disk")
    h.pwrite(b"\x33" * 4096, 8192)
    # Another user's key: the monitor refuses it.
    other = c.user_key("vm2", pool)
    ok(qmp.cmd("object-add", {"qom-type": "secret", "id": "wrong", "data": other,
                              "format": "base64"}))
    reply = qmp.cmd("blockdev-add", rbd_opts(c, pool, user, **{"node-name": "r1",
                                                              "key-secret": "wrong"}))
    assert reply == error("error connecting: Permission denied")
    # Bytes that are no cephx key: librados cannot decode them when it connects.
    ok(qmp.cmd("object-add", {"qom-type": "secret", "id": "garbage", "data": "not a key"}))
    reply = qmp.cmd("blockdev-add", rbd_opts(c, pool, user, **{"node-name": "r1",
                                                              "key-secret": "garbage"}))
    assert reply == error("error connecting: Invalid argument")
    # No key: this user has no keyring (librados finds none).
    reply = qmp.cmd("blockdev-add", rbd_opts(c, pool, user, **{"node-name": "r1"}))
    assert reply == error("error connecting: No such file or directory")
    assert qmp.cmd("blockdev-add", rbd_opts(c, pool, user, **{
        "node-name": "r1", "key-secret": "nope"})) == error("No secret with id 'nope'")
    # The daemon goes on: the first node serves, the names are free, a right key works.
    assert qmp.cmd("query-status")["return"]["status"] == "running"
    assert h.pread(4096, 8192) == b"\x33" * 4096
    assert [n["node-name"] for n in qmp.cmd("query-named-block-nodes")["return"]] == ["r0"]
    ok(qmp.cmd("blockdev-add", rbd_opts(c, pool, user, **{"node-name": "r1",
                                                          "key-secret": "good",
                                                          "read-only": True})))
    h.shutdown()


def test_blockdev_create_with_key_secret(cluster, daemons):
    c, pool, user, key = cluster
    qmp = daemons.start().negotiated()
    ok(qmp.cmd("object-add", {"qom-type": "secret", "id": "k", "data": key,
                              "format": "base64"}))
    location = {"pool": pool, "image": "created", "conf": c.conf, "user": user,
                "key-secret": "k"}
    ok(qmp.cmd("blockdev-create", {"job-id": "c1", "options": {
        "driver": "rbd", "location": location, "size": 4 * MiB}}))
    assert job_statuses(qmp, "c1") == ["created", "running", "waiting", "pending", "concluded"]
    info = json.loads(c.rbd("info", "--format", "json", f"{pool}/created"))
    assert info["size"] == 4 * MiB
    # An unknown secret fails the job (QEMU looks it up when it connects, in the job).
    ok(qmp.cmd("blockdev-create", {"job-id": "c2", "options": {
        "driver": "rbd", "location": {**location, "image": "x", "key-secret": "nope"},
        "size": MiB}}))
    assert job_statuses(qmp, "c2") == ["created", "running", "aborting", "concluded"]
    jobs = {j["id"]: j for j in qmp.cmd("query-jobs")["return"]}
    assert jobs["c2"]["error"] == "No secret with id 'nope'"
