"""QEMU's secret object (--object secret / object-add / object-del) as QEMU 7.2 makes it:
data or file, format raw or base64, and libvirt's encrypted form (keyid names a secret holding
a 32-byte AES key, iv its base64 IV, data base64 AES-256-CBC ciphertext). The ciphertexts are
made here with openssl enc. The texts are QEMU's (these tests also pass against QEMU with
THINBLK_TEST_AGAINST_QEMU=1, but for those marked thinblk_only). What a secret's bytes are is
checked by the unit test (test-secret.c) and by rbd's key-secret (test_rbd_secret.py).
"""
import base64
import os
import shutil
import subprocess

import pytest

from conftest import error, ok, thinblk_only

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

MASTER = bytes(range(32))   # a 32-byte master key, as libvirt's master-key.aes holds
IV = bytes(range(100, 116))


def encrypt(key, iv, plaintext):
    """AES-256-CBC with PKCS#7 padding, by openssl: the ciphertext's bytes."""
    return subprocess.run(["openssl", "enc", "-aes-256-cbc", "-K", key.hex(), "-iv", iv.hex()],
                          input=plaintext, capture_output=True, check=True).stdout


def b64(data):
    return base64.b64encode(data).decode()


@pytest.fixture
def master_file(tmp_path):
    path = tmp_path / "master-key.aes"
    path.write_bytes(MASTER)
    return path


def add(q, id, **props):
    return q.cmd("object-add", {"qom-type": "secret", "id": id, **props})


def test_object_add_secret_forms(qmp, master_file):
    ok(add(qmp, "raw0", data="letmein"))
    ok(add(qmp, "b640", data=b64(b"\x00\x01binary\xff"), format="base64"))
    ok(add(qmp, "file0", file=str(master_file)))
    ok(add(qmp, "empty0", data=""))
    # libvirt's: the master key from a file, the disk's secret encrypted with it.
    ct = encrypt(MASTER, IV, b"the cephx key bytes")
    ok(add(qmp, "masterKey0", file=str(master_file), format="raw"))
    ok(add(qmp, "disk0-secret0", data=b64(ct), keyid="masterKey0", iv=b64(IV),
           format="base64"))
    # The master key can go while what it decrypted stays (QEMU 7.2: secrets are never "in
    # use"); then both are gone.
    ok(qmp.cmd("object-del", {"id": "masterKey0"}))
    assert qmp.cmd("object-del", {"id": "masterKey0"}) == error("object 'masterKey0' not found")
    ok(qmp.cmd("object-del", {"id": "disk0-secret0"}))
    assert qmp.cmd("object-del", {"id": "disk0-secret0"}) == error(
        "object 'disk0-secret0' not found")


def test_object_add_secret_errors(qmp, tmp_path, master_file):
    assert add(qmp, "s0") == error("Either 'file' or 'data' must be provided")
    assert add(qmp, "s0", data="x", file=str(master_file)) == error(
        "'file' and 'data' are mutually exclusive")
    assert add(qmp, "s0", data="a*b", format="base64") == error(
        "Base64 data contains invalid characters")
    assert add(qmp, "s0", data="x", format="hex") == error(
        "Parameter 'format' does not accept value 'hex'")
    assert add(qmp, "s0", data=3) == error("Invalid parameter type for 'data', expected: string")
    missing = tmp_path / "missing"
    assert add(qmp, "s0", file=str(missing)) == error(
        f"Unable to read {missing}: Failed to open file \u201c{missing}\u201d: "
        "No such file or directory")
    assert add(qmp, "s0", file=str(tmp_path)) == error(
        f"Unable to read {tmp_path}: Error reading file \u201c{tmp_path}\u201d: Is a directory")
    assert add(qmp, "1s", data="x") == error("Parameter 'id' expects an identifier")
    iv = b64(IV)
    ct = b64(encrypt(MASTER, IV, b"secret"))
    assert add(qmp, "s0", data=ct, keyid="nokey", iv=iv, format="base64") == error(
        "No secret with id 'nokey'")
    assert add(qmp, "s0", data=ct, keyid="s0", iv=iv, format="base64") == error(
        "Secret with id 's0' has no data")
    ok(add(qmp, "short", data="0123456789"))
    assert add(qmp, "s0", data=ct, keyid="short", iv=iv, format="base64") == error(
        "Key should be 32 bytes in length")
    ok(qmp.cmd("object-add", {"qom-type": "authz-simple", "id": "authz0", "identity": "x"}))
    assert add(qmp, "s0", data=ct, keyid="authz0", iv=iv, format="base64") == error(
        "Object with id 'authz0' is not a secret")
    ok(add(qmp, "master", file=str(master_file)))
    assert add(qmp, "s0", data=ct, keyid="master", format="base64") == error(
        "IV is required to decrypt secret")
    assert add(qmp, "s0", data=ct, keyid="master", iv="AAAA", format="base64") == error(
        "IV should be 16 bytes in length not 3")
    assert add(qmp, "s0", data=b64(b"x" * 20), keyid="master", iv=iv, format="base64") == error(
        "Length 20 must be a multiple of block size 16")
    # A wrong key: QEMU only looks at the last byte (the padding's length); make sure it is
    # more than 16 by decrypting with openssl first.
    wrong = bytes(32)
    last = subprocess.run(["openssl", "enc", "-d", "-aes-256-cbc", "-nopad", "-K", wrong.hex(),
                           "-iv", IV.hex()], input=base64.b64decode(ct), capture_output=True,
                          check=True).stdout[-1]
    assert last > 16, "pick another wrong key for this test"
    ok(add(qmp, "wrong", data=b64(wrong), format="base64"))
    assert add(qmp, "s0", data=ct, keyid="wrong", iv=iv, format="base64") == error(
        f"Incorrect number of padding bytes ({last}) found on decrypted data")
    assert add(qmp, "master", data="x") == error(
        "attempt to add duplicate property 'master' to object (type 'container')")
    assert add(qmp, "s0", data="x", loaded=True) == error(
        "Property 'secret.loaded' is not writable")
    assert qmp.cmd("object-del", {"id": "s0"}) == error("object 's0' not found")
    ok(add(qmp, "s0", data=ct, keyid="master", iv=iv, format="base64"))


@pytest.mark.parametrize("arg, text", [
    ("secret,id=s0", "Either 'file' or 'data' must be provided"),
    ("secret,id=s0,data=x,file=/etc/hostname", "'file' and 'data' are mutually exclusive"),
    ("secret,id=s0,data=x,format=hex", "Parameter 'format' does not accept value 'hex'"),
    ("secret,id=s0,data=x,keyid=k,iv=AAAAAAAAAAAAAAAAAAAAAA==", "No secret with id 'k'"),
    ("secret,id=s0,file=/nonexistent",
     "Unable to read /nonexistent: Failed to open file \u201c/nonexistent\u201d: "
     "No such file or directory"),
])
@thinblk_only
def test_object_option_secret_texts(daemons, arg, text):
    d = daemons.start_raw(["--object", arg], wait=False)
    assert d.wait() == 1
    assert f"--object: {text}" in d.stderr()


@thinblk_only
def test_object_option_libvirt_style(daemons, tmp_path, master_file):
    """libvirt's arguments: a master key file, then a disk secret encrypted with it; the
    secret's bytes appear nowhere in the daemon's output, even at debug level."""
    plaintext = b"AQBk+BJrDWnVBxAAC7qpby+D9vy4FwpVdw8pLw=="
    ct = b64(encrypt(MASTER, IV, plaintext))
    d = daemons.start(args=["-v", "-v",
                            "--object", f"secret,id=masterKey0,format=raw,file={master_file}",
                            "--object", f"secret,id=virtio-disk0-secret0,data={ct},"
                                        f"keyid=masterKey0,iv={b64(IV)},format=base64"])
    q = d.negotiated()
    ok(q.cmd("object-del", {"id": "virtio-disk0-secret0"}))
    ok(q.cmd("object-del", {"id": "masterKey0"}))
    assert plaintext.decode() not in d.stderr()
    assert MASTER.hex() not in d.stderr()


def test_raw_ciphertext_file(qmp, tmp_path, master_file):
    """format=raw with keyid: the file holds the ciphertext's bytes themselves."""
    path = tmp_path / "ct.bin"
    path.write_bytes(encrypt(MASTER, IV, os.urandom(40)))
    ok(add(qmp, "master", file=str(master_file)))
    ok(add(qmp, "s0", file=str(path), keyid="master", iv=b64(IV)))
