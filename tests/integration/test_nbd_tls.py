"""NBD over TLS (NBD_OPT_STARTTLS, doc/proto.md) with tls-creds-x509 (with a CRL and DH
parameters), tls-creds-psk, authz-simple, authz-list and authz-listfile, as qemu-storage-daemon 7.2 offers them, against real clients: nbdinfo and
nbdcopy (libnbd's nbds+unix:// and nbds:// URIs), qemu-io with its own tls-creds-x509 object,
Python's ssl module for the hand-made ones.

Every refusal (plaintext, wrong CA, expired certificate, wrong PSK, wrong DN, garbage inside
or instead of the TLS session) is checked for the client's error and for the daemon serving
a good client afterwards. The CA and certificates are made once per session with certtool.
"""

import json
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest

from conftest import AGAINST_QEMU, TIMEOUT, error, ok
from test_nbd_protocol import (OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_LIST, OPT_STARTTLS,
                               REP_ACK, REP_ERR_POLICY, RawNBD)

pytestmark = [pytest.mark.skipif(AGAINST_QEMU, reason="thinblkd's NBD server"),
              pytest.mark.skipif(not shutil.which("certtool"), reason="certtool (gnutls-bin)")]

REP_ERR_TLS_REQD = (1 << 31) + 5
MiB = 1 << 20
PSK_USER, PSK_KEY = "alice", "9a6cd9b7b36a2b8d5c3e8f5a1a4b6c7d"


# ---- certificates --------------------------------------------------------------------------

def certtool(*args):
    subprocess.run(["certtool", *map(str, args)], check=True, capture_output=True)


def make_ca(path, cn):
    (path / "ca.info").write_text(f"cn = {cn}\nca\ncert_signing_key\ncrl_signing_key\n"
                                  "expiration_days = 30\n")
    certtool("--generate-privkey", "--outfile", path / "ca-key.pem")
    certtool("--generate-self-signed", "--load-privkey", path / "ca-key.pem",
             "--template", path / "ca.info", "--outfile", path / "ca-cert.pem")


def make_cert(ca, out_dir, role, template):
    """out_dir/{role}-cert.pem and {role}-key.pem signed by ca, out_dir/ca-cert.pem the
    real CA (which the peer must be checked against)."""
    out_dir.mkdir()
    (out_dir / "t.info").write_text(template)
    certtool("--generate-privkey", "--outfile", out_dir / f"{role}-key.pem")
    certtool("--generate-certificate", "--load-ca-certificate", ca / "ca-cert.pem",
             "--load-ca-privkey", ca / "ca-key.pem", "--load-privkey", out_dir / f"{role}-key.pem",
             "--template", out_dir / "t.info", "--outfile", out_dir / f"{role}-cert.pem")


CLIENT = "cn = client1\norganization = Test\ntls_www_client\nsigning_key\nencryption_key\n"
# As GnuTLS's gnutls_x509_crt_get_dn() gives it (QEMU's call): the RDNs in certificate order.
CLIENT_DN = "O=Test,CN=client1"


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = root / "ca", root / "other-ca"
    ca.mkdir(), other_ca.mkdir()
    make_ca(ca, "Test CA")
    make_ca(other_ca, "Other CA")
    make_cert(ca, root / "server", "server",
              "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
              "tls_www_server\nsigning_key\nencryption_key\nexpiration_days = 30\n")
    make_cert(ca, root / "client", "client", CLIENT + "expiration_days = 30\n")
    make_cert(other_ca, root / "wrong-ca", "client", CLIENT + "expiration_days = 30\n")
    make_cert(ca, root / "expired", "client",
              CLIENT + 'activation_date = "2019-01-01 00:00:00"\n'
                       'expiration_date = "2020-01-01 00:00:00"\n')
    for d in ("server", "client", "wrong-ca", "expired"):
        shutil.copy(ca / "ca-cert.pem", root / d / "ca-cert.pem")
    psk = root / "psk"
    psk.mkdir()
    (psk / "keys.psk").write_text(f"{PSK_USER}:{PSK_KEY}\n")
    (psk / "wrong.psk").write_text(f"{PSK_USER}:{'00' * 16}\n")
    return root


# ---- the daemon ------------------------------------------------------------------------------

class TLSServer:
    def __init__(self, daemon, sock, rundir, port=None):
        self.daemon, self.sock, self.rundir, self.port = daemon, sock, rundir, port

    def uri(self, query, user=""):
        if self.port:
            return f"nbds://{user}127.0.0.1:{self.port}/disk?{query}"
        return f"nbds+unix://{user}/disk?socket={self.sock}&{query}"

    def raw(self):
        if self.port:
            c = RawNBD.__new__(RawNBD)
            c.sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            c.handle, c.structured = 0, False
            return c
        return RawNBD(self.sock)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(daemon, port):
    """The monitor socket comes before the command line's NBD server: wait for a connect."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert daemon.running(), daemon.stderr()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
            return
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"port {port} not listening in {TIMEOUT}s"
            time.sleep(0.01)  # polling interval while waiting for the listener


def start(daemons, tmp_path, objects, nbd_opts, inet=False):
    rundir = daemons.rundir()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    sock, mon = rundir / "nbd.sock", rundir / "mon.sock"
    port = free_port() if inet else None
    addr = (f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}" if inet
            else f"addr.type=unix,addr.path={sock}")
    args = ["-v", "--chardev", f"socket,id=m0,path={mon},server=on,wait=off",
            "--monitor", "m0"]
    for o in objects:
        args += ["--object", o]
    args += ["--blockdev", f"driver=file,node-name=f0,filename={image}",
             "--nbd-server", f"{addr},{nbd_opts}",
             "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"]
    d = daemons.start_raw(args, sockets=[mon] if inet else [mon, sock], rundir=rundir)
    if inet:
        wait_for_port(d, port)
    return TLSServer(d, sock, rundir, port)


def x509(pki, verify="on"):
    return f"tls-creds-x509,id=tls0,dir={pki / 'server'},endpoint=server,verify-peer={verify}"


@pytest.fixture(params=["unix", "inet"])
def server(request, daemons, tmp_path, pki):
    return start(daemons, tmp_path, [x509(pki)], "tls-creds=tls0",
                 inet=request.param == "inet")


def nbdinfo(uri):
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                          timeout=TIMEOUT)


def assert_serves(server, pki):
    assert server.daemon.running()
    r = nbdinfo(server.uri(f"tls-certificates={pki / 'client'}"))
    assert r.returncode == 0 and r.stdout.strip() == str(64 * MiB), r.stderr


def assert_refused(server, pki, uri):
    r = nbdinfo(uri)
    assert r.returncode != 0, r.stdout
    assert_serves(server, pki)
    return r.stderr


# ---- serving ---------------------------------------------------------------------------------

def test_nbdcopy_writes_and_reads_back(server, pki, tmp_path):
    src, back = tmp_path / "src", tmp_path / "back"
    src.write_bytes(bytes(range(256)) * (16 * MiB // 256))
    uri = server.uri(f"tls-certificates={pki / 'client'}")
    subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=TIMEOUT)
    subprocess.run(["nbdcopy", uri, str(back)], check=True, timeout=TIMEOUT)
    assert back.read_bytes()[:16 * MiB] == src.read_bytes()


def test_qemu_io_with_its_tls_creds(server, pki):
    addr = (f"server.type=inet,server.host=127.0.0.1,server.port={server.port}" if server.port
            else f"server.type=unix,server.path={server.sock},tls-hostname=localhost")
    r = subprocess.run(
        ["qemu-io", "--object", f"tls-creds-x509,id=c0,dir={pki / 'client'},endpoint=client",
         "--image-opts", f"driver=nbd,{addr},export=disk,tls-creds=c0",
         "-c", "write -P 0x5a 1M 3M", "-c", "read -P 0x5a 1M 3M"],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


# ---- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("option", [OPT_GO, OPT_LIST, 0x4242])
def test_options_before_starttls_need_tls(server, pki, option):
    c = server.raw().greeting()
    (rtype, msg), = c.option(option, RawNBD.info_data("disk") if option == OPT_GO else b"")
    assert rtype == REP_ERR_TLS_REQD
    assert msg == f"Option 0x{option:x} not permitted before TLS".encode()
    assert c.option(OPT_ABORT) == [(REP_ACK, b"")]
    assert_serves(server, pki)


def test_export_name_before_starttls_closes(server, pki):
    c = server.raw().greeting()
    c.send_option(OPT_EXPORT_NAME, b"disk")
    c.assert_closed()
    assert_serves(server, pki)


def test_plaintext_libnbd_client_is_refused(server, pki):
    uri = (f"nbd://127.0.0.1:{server.port}/disk" if server.port
           else f"nbd+unix:///disk?socket={server.sock}")
    err = assert_refused(server, pki, uri)
    assert "server requires TLS encryption first" in err, err


def test_client_of_another_ca_is_refused(server, pki):
    assert_refused(server, pki, server.uri(f"tls-certificates={pki / 'wrong-ca'}"))


def test_expired_client_certificate_is_refused(server, pki):
    assert_refused(server, pki, server.uri(f"tls-certificates={pki / 'expired'}"))


def test_client_without_certificate_is_refused(server, pki, tmp_path):
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    shutil.copy(pki / "client" / "ca-cert.pem", only_ca)
    assert_refused(server, pki, server.uri(f"tls-certificates={only_ca}"))


def tls_wrap(c, pki, certs="client"):
    """STARTTLS on raw connection c, then the TLS handshake with Python's ssl module."""
    assert c.option(OPT_STARTTLS) == [(REP_ACK, b"")]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki / "client" / "ca-cert.pem")
    ctx.load_cert_chain(pki / certs / "client-cert.pem", pki / certs / "client-key.pem")
    c.sock = ctx.wrap_socket(c.sock)
    return c


def assert_tls_closed(c):
    try:
        data = c.sock.recv(1 << 16)
    except (ConnectionError, ssl.SSLError):
        data = b""
    assert data == b"", data[:64]


def test_hand_made_tls_client_is_served(server, pki):
    c = tls_wrap(server.raw().greeting(), pki)
    size, _ = c.go()
    assert size == 64 * MiB
    c.check_alive()


def test_garbage_inside_the_session_is_dropped(server, pki):
    c = tls_wrap(server.raw().greeting(), pki)
    c.send(b"\xde\xad\xbe\xef" * 64)  # no option magic
    assert_tls_closed(c)
    assert_serves(server, pki)


def test_garbage_instead_of_the_tls_handshake_is_dropped(server, pki):
    c = server.raw().greeting()
    assert c.option(OPT_STARTTLS) == [(REP_ACK, b"")]
    c.send(b"GET / HTTP/1.0\r\n\r\n" * 8)
    c.assert_closed()
    assert_serves(server, pki)


def test_plaintext_sent_with_starttls_is_not_taken_into_the_session(server, pki):
    c = server.raw().greeting()
    c.send(struct.pack(">QII", 0x49484156454F5054, OPT_STARTTLS, 0)
           + struct.pack(">QII", 0x49484156454F5054, OPT_LIST, 0))
    c.assert_closed()
    assert_serves(server, pki)


def test_second_starttls_inside_the_session_is_invalid(server, pki):
    c = tls_wrap(server.raw().greeting(), pki)
    (rtype, _), = c.option(OPT_STARTTLS)
    assert rtype == (1 << 31) + 3  # NBD_REP_ERR_INVALID
    c.go()
    c.check_alive()


def test_server_without_tls_refuses_starttls(daemons, tmp_path, pki):
    s = start(daemons, tmp_path, [], "max-connections=4")
    c = s.raw().greeting()
    (rtype, _), = c.option(OPT_STARTTLS)
    assert rtype == REP_ERR_POLICY


def test_verify_peer_off_takes_a_client_without_certificate(daemons, tmp_path, pki):
    s = start(daemons, tmp_path, [x509(pki, verify="off")], "tls-creds=tls0")
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    shutil.copy(pki / "client" / "ca-cert.pem", only_ca)
    r = nbdinfo(s.uri(f"tls-certificates={only_ca}"))
    assert r.returncode == 0, r.stderr


# ---- PSK -------------------------------------------------------------------------------------

@pytest.fixture
def psk_server(daemons, tmp_path, pki):
    return start(daemons, tmp_path,
                 [f"tls-creds-psk,id=tls0,dir={pki / 'psk'},endpoint=server"], "tls-creds=tls0")


def test_psk_client_is_served(psk_server, pki, tmp_path):
    back = tmp_path / "back"
    uri = psk_server.uri(f"tls-psk-file={pki / 'psk' / 'keys.psk'}", user=f"{PSK_USER}@")
    subprocess.run(["nbdcopy", uri, str(back)], check=True, timeout=TIMEOUT)
    assert back.stat().st_size == 64 * MiB


def test_wrong_psk_is_refused(psk_server, pki):
    r = nbdinfo(psk_server.uri(f"tls-psk-file={pki / 'psk' / 'wrong.psk'}",
                               user=f"{PSK_USER}@"))
    assert r.returncode != 0
    assert nbdinfo(psk_server.uri(f"tls-psk-file={pki / 'psk' / 'keys.psk'}",
                                  user=f"{PSK_USER}@")).returncode == 0


# ---- authorization ---------------------------------------------------------------------------

def test_authz_simple_lets_the_named_client_in(daemons, tmp_path, pki):
    s = start(daemons, tmp_path, [x509(pki), "authz-simple,id=auth0,identity=" + CLIENT_DN.replace(",", ",,")],
              "tls-creds=tls0,tls-authz=auth0")
    assert_serves(s, pki)


def test_authz_simple_with_another_dn_refuses(daemons, tmp_path, pki):
    s = start(daemons, tmp_path, [x509(pki), "authz-simple,id=auth0,identity=CN=someone"],
              "tls-creds=tls0,tls-authz=auth0")
    r = nbdinfo(s.uri(f"tls-certificates={pki / 'client'}"))
    assert r.returncode != 0
    assert f"refused: Identity '{CLIENT_DN}' is not authorized" in s.daemon.stderr()
    assert s.daemon.running()


def test_authz_simple_of_psk_username(daemons, tmp_path, pki):
    s = start(daemons, tmp_path,
              [f"tls-creds-psk,id=tls0,dir={pki / 'psk'},endpoint=server",
               "authz-simple,id=auth0,identity=bob"], "tls-creds=tls0,tls-authz=auth0")
    r = nbdinfo(s.uri(f"tls-psk-file={pki / 'psk' / 'keys.psk'}", user=f"{PSK_USER}@"))
    assert r.returncode != 0
    assert f"refused: Identity '{PSK_USER}' is not authorized" in s.daemon.stderr()


@pytest.mark.parametrize("rules, allowed", [
    ("policy=deny,rules.0.match=*CN=client1,rules.0.policy=allow,rules.0.format=glob", True),
    ("policy=allow,rules.0.match=O=Test,,CN=client1,rules.0.policy=deny", False),
    ("rules.0.match=*CN=other,rules.0.policy=allow,rules.0.format=glob", False),
])
def test_authz_list_first_matching_rule_decides(daemons, tmp_path, pki, rules, allowed):
    s = start(daemons, tmp_path, [x509(pki), f"authz-list,id=auth0,{rules}"],
              "tls-creds=tls0,tls-authz=auth0")
    r = nbdinfo(s.uri(f"tls-certificates={pki / 'client'}"))
    assert (r.returncode == 0) == allowed, r.stderr
    assert s.daemon.running()


# ---- objects: QEMU 7.2's texts ---------------------------------------------------------------

def test_object_add_and_del_texts(daemon, pki):
    q = daemon.negotiated()
    def add(**args):
        return q.cmd("object-add", args)

    server = str(pki / "server")
    ok(add(**{"qom-type": "tls-creds-x509", "id": "t0", "dir": server, "endpoint": "server"}))
    assert add(**{"qom-type": "tls-creds-x509", "id": "t0", "dir": server}) == error(
        "attempt to add duplicate property 't0' to object (type 'container')")
    assert add(**{"qom-type": "tls-creds-x509", "id": "t1", "dir": "/nonexistent",
                  "endpoint": "server"}) == error(
        "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory")
    assert add(**{"qom-type": "tls-creds-psk", "id": "t1", "dir": server,
                  "endpoint": "server"}) == error(
        f"Unable to access credentials {server}/keys.psk: No such file or directory")
    assert add(**{"qom-type": "tls-creds-x509", "id": "t1", "dir": server,
                  "endpoint": "bogus"}) == error(
        "Parameter 'endpoint' does not accept value 'bogus'")
    assert add(**{"qom-type": "tls-creds-x509", "id": "t1", "dir": server,
                  "verify-peer": "yes"}) == error(
        "Invalid parameter type for 'verify-peer', expected: boolean")
    assert add(**{"qom-type": "authz-simple", "id": "a0"}) == error(
        "Parameter 'identity' is missing")
    ok(add(**{"qom-type": "authz-simple", "id": "a0", "identity": "CN=x"}))
    ok(add(**{"qom-type": "tls-creds-x509", "id": "client0", "dir": server}))
    def start(creds):
        return q.cmd("nbd-server-start", {
            "addr": {"type": "unix", "data": {"path": str(daemon.rundir / "n.sock")}},
            "tls-creds": creds})

    assert start("nope") == error("No TLS credentials with id 'nope'")
    assert start("a0") == error("Object with id 'a0' is not TLS credentials")
    assert start("client0") == error("Expected TLS credentials for a server endpoint")
    ok(start("t0"))
    # As QEMU 7.2: deleting credentials in use succeeds; the server keeps them.
    ok(q.cmd("object-del", {"id": "t0"}))
    assert q.cmd("object-del", {"id": "t0"}) == error("object 't0' not found")
    ok(q.cmd("nbd-server-stop"))


@pytest.mark.parametrize("arg, text", [
    ("tls-creds-x509,id=t0,endpoint=server", "Missing 'dir' property value"),
    ("tls-creds-x509,id=t0,dir=/nonexistent,endpoint=server",
     "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"),
    ("tls-creds-x509,id=t0,dir=/tmp,endpoint=bogus",
     "Parameter 'endpoint' does not accept value 'bogus'"),
    ("foo,id=t0", "Parameter 'qom-type' does not accept value 'foo'"),
])
def test_object_option_texts(daemons, arg, text):
    d = daemons.start_raw(["--object", arg], wait=False)
    assert d.wait() == 1
    assert f"--object: {text}" in d.stderr()


# ---- revocation (ca-crl.pem) and DH parameters (dh-params.pem) -------------------------------

OTHER_CLIENT = "cn = client2\norganization = Test\ntls_www_client\nsigning_key\nencryption_key\n"


@pytest.fixture(scope="session")
def crl_pki(pki, tmp_path_factory):
    """server/: the server's files plus a ca-crl.pem revoking revoked/'s client certificate
    (CN=client2); dh/: the server's files plus dh-params.pem."""
    root = tmp_path_factory.mktemp("crl")
    ca = pki / "ca"
    make_cert(ca, root / "revoked", "client", OTHER_CLIENT + "expiration_days = 30\n")
    shutil.copy(ca / "ca-cert.pem", root / "revoked" / "ca-cert.pem")
    shutil.copytree(pki / "server", root / "server")
    (root / "crl.info").write_text("crl_next_update = 30\ncrl_number = 1\n")
    certtool("--generate-crl", "--load-ca-privkey", ca / "ca-key.pem",
             "--load-ca-certificate", ca / "ca-cert.pem",
             "--load-certificate", root / "revoked" / "client-cert.pem",
             "--template", root / "crl.info", "--outfile", root / "server" / "ca-crl.pem")
    shutil.copytree(pki / "server", root / "dh")
    certtool("--get-dh-params", "--bits", "2048", "--outfile", root / "dh" / "dh-params.pem")
    shutil.copytree(pki / "psk", root / "psk-dh")
    shutil.copy(root / "dh" / "dh-params.pem", root / "psk-dh")
    return root


def test_revoked_client_certificate_is_refused(daemons, tmp_path, pki, crl_pki):
    s = start(daemons, tmp_path,
              [f"tls-creds-x509,id=tls0,dir={crl_pki / 'server'},endpoint=server"],
              "tls-creds=tls0")
    r = nbdinfo(s.uri(f"tls-certificates={crl_pki / 'revoked'}"))
    assert r.returncode != 0, r.stdout
    assert "revoked" in s.daemon.stderr(), s.daemon.stderr()
    assert_serves(s, pki)  # client1, not on the list


def test_revoked_client_is_served_without_the_crl(daemons, tmp_path, pki, crl_pki):
    """The other half of the test above: the same certificate is good without ca-crl.pem."""
    s = start(daemons, tmp_path, [x509(pki)], "tls-creds=tls0")
    r = nbdinfo(s.uri(f"tls-certificates={crl_pki / 'revoked'}"))
    assert r.returncode == 0, r.stderr


def test_revoked_client_of_qemu_io_is_refused(daemons, tmp_path, pki, crl_pki):
    s = start(daemons, tmp_path,
              [f"tls-creds-x509,id=tls0,dir={crl_pki / 'server'},endpoint=server"],
              "tls-creds=tls0")
    def qemu_io(certs):
        return subprocess.run(
            ["qemu-io", "--object", f"tls-creds-x509,id=c0,dir={certs},endpoint=client",
             "--image-opts", f"driver=nbd,server.type=unix,server.path={s.sock},"
             "tls-hostname=localhost,export=disk,tls-creds=c0", "-c", "read 0 64k"],
            capture_output=True, text=True, timeout=TIMEOUT)
    r = qemu_io(crl_pki / "revoked")
    assert r.returncode != 0 or "read 65536/65536" not in r.stdout, r.stdout + r.stderr
    r = qemu_io(pki / "client")
    assert r.returncode == 0 and "read 65536/65536" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("creds, certs", [("dh", "client"), ("psk-dh", None)])
def test_dh_params_are_loaded_and_clients_served(daemons, tmp_path, pki, crl_pki, creds, certs):
    kind = "x509" if certs else "psk"
    s = start(daemons, tmp_path,
              [f"tls-creds-{kind},id=tls0,dir={crl_pki / creds},endpoint=server"],
              "tls-creds=tls0")
    if certs:
        assert_serves(s, pki)
    else:
        r = nbdinfo(s.uri(f"tls-psk-file={pki / 'psk' / 'keys.psk'}", user=f"{PSK_USER}@"))
        assert r.returncode == 0, r.stderr


def test_bad_crl_and_dh_params_texts(daemon, pki, tmp_path):
    """QEMU 7.2's texts (checked against qemu-storage-daemon): a missing ca-crl.pem or
    dh-params.pem is fine, an unloadable one fails object-add."""
    q = daemon.negotiated()
    dirs = {}
    for name, files in [("badcrl", {"ca-crl.pem": "garbage\n"}),
                        ("emptycrl", {"ca-crl.pem": ""}),
                        ("danglingcrl", {}),
                        ("baddh", {"dh-params.pem": "garbage\n"})]:
        d = dirs[name] = tmp_path / name
        shutil.copytree(pki / "server", d)
        for f, text in files.items():
            (d / f).write_text(text)
    (dirs["danglingcrl"] / "ca-crl.pem").symlink_to(tmp_path / "nonexistent")
    dirs["dircrl"] = tmp_path / "dircrl"
    shutil.copytree(pki / "server", dirs["dircrl"])
    (dirs["dircrl"] / "ca-crl.pem").mkdir()
    dirs["dirdh"] = tmp_path / "dirdh"
    shutil.copytree(pki / "server", dirs["dirdh"])
    (dirs["dirdh"] / "dh-params.pem").mkdir()
    psk = tmp_path / "psk"
    shutil.copytree(pki / "psk", psk)
    (psk / "dh-params.pem").write_text("garbage\n")
    nokeys = tmp_path / "nokeys"
    nokeys.mkdir()
    (nokeys / "dh-params.pem").write_text("garbage\n")

    def add(kind, d, endpoint="server"):
        return q.cmd("object-add", {"qom-type": f"tls-creds-{kind}", "id": "t0", "dir": str(d),
                                    "endpoint": endpoint})

    assert add("x509", dirs["badcrl"]) == error(
        f"Cannot load CRL '{dirs['badcrl']}/ca-crl.pem': Base64 decoding error.")
    assert add("x509", dirs["emptycrl"]) == error(
        f"Cannot load CRL '{dirs['emptycrl']}/ca-crl.pem': Base64 decoding error.")
    assert add("x509", dirs["dircrl"]) == error(
        f"Cannot load CRL '{dirs['dircrl']}/ca-crl.pem': Error while reading file.")
    # A name that leads nowhere is a missing file (ENOENT), as in QEMU: skipped.
    ok(add("x509", dirs["danglingcrl"]))
    ok(q.cmd("object-del", {"id": "t0"}))
    assert add("x509", dirs["baddh"]) == error(
        f"Unable to load DH parameters from {dirs['baddh']}/dh-params.pem: "
        "Base64 unexpected header error.")
    assert add("x509", dirs["dirdh"]) == error(
        f"Error reading file “{dirs['dirdh']}/dh-params.pem”: Is a directory")
    assert add("psk", psk) == error(
        f"Unable to load DH parameters from {psk}/dh-params.pem: "
        "Base64 unexpected header error.")
    assert add("psk", nokeys) == error(
        f"Unable to access credentials {nokeys}/keys.psk: No such file or directory")
    # A client endpoint loads nothing here (QEMU checks no server file either).
    ok(add("x509", dirs["badcrl"], endpoint="client"))


# ---- authz-listfile --------------------------------------------------------------------------

def rules_json(*rules, policy="deny"):
    return json.dumps({"policy": policy, "rules": [
        {"match": m, "policy": p, "format": f} for m, p, f in rules]})


def listfile_server(daemons, tmp_path, pki, text, refresh="off"):
    path = tmp_path / "acl" / "rules.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    s = start(daemons, tmp_path,
              [x509(pki), f"authz-listfile,id=auth0,filename={path},refresh={refresh}"],
              "tls-creds=tls0,tls-authz=auth0")
    return s, path


@pytest.mark.parametrize("text, allowed", [
    (rules_json((CLIENT_DN, "allow", "exact")), True),
    (rules_json(("*CN=client1", "allow", "glob")), True),
    (rules_json((CLIENT_DN, "deny", "exact"), policy="allow"), False),
    (rules_json(("*CN=other", "allow", "glob")), False),
    ('{"rules": []}', False),           # policy defaults to deny
    ('{"policy": "allow"}', True),
])
def test_authz_listfile_allows_and_denies_by_dn(daemons, tmp_path, pki, text, allowed):
    s, _ = listfile_server(daemons, tmp_path, pki, text)
    r = nbdinfo(s.uri(f"tls-certificates={pki / 'client'}"))
    assert (r.returncode == 0) == allowed, r.stderr
    if not allowed:
        assert f"refused: Identity '{CLIENT_DN}' is not authorized" in s.daemon.stderr()
    assert s.daemon.running()


def wait_for_outcome(s, pki, served):
    """Connect until the client is (or is not) served: a refresh happens on the daemon's loop
    some time after the file changed. Bounded by TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        r = nbdinfo(s.uri(f"tls-certificates={pki / 'client'}"))
        if (r.returncode == 0) == served:
            return
        assert time.monotonic() < deadline, f"still {'refused' if served else 'served'}: {r}"


def test_authz_listfile_refresh_takes_new_rules(daemons, tmp_path, pki):
    s, path = listfile_server(daemons, tmp_path, pki, rules_json(), refresh="on")
    assert nbdinfo(s.uri(f"tls-certificates={pki / 'client'}")).returncode != 0
    path.write_text(rules_json((CLIENT_DN, "allow", "exact")))       # rewritten in place
    wait_for_outcome(s, pki, served=True)
    # A file that no longer loads leaves no list: nobody is let in (QEMU's fail-closed), and
    # the reason is logged.
    path.write_text("nope")
    wait_for_outcome(s, pki, served=False)
    assert "JSON parse error, invalid keyword 'nope'" in s.daemon.stderr(), s.daemon.stderr()
    # Replaced by a rename, as editors and configuration tools do.
    tmp = path.with_name("rules.json.new")
    tmp.write_text(rules_json(("O=Test,CN=*", "allow", "glob")))
    tmp.rename(path)
    wait_for_outcome(s, pki, served=True)
    assert s.daemon.running()


def test_authz_listfile_object_add_and_del(daemons, pki, tmp_path):
    d = daemons.start(args=["-v"])
    q = d.negotiated()
    good = tmp_path / "good.json"
    good.write_text(rules_json((CLIENT_DN, "allow", "exact")))
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(MiB)

    def add(**args):
        return q.cmd("object-add", {"qom-type": "authz-listfile", "id": "a0", **args})

    ok(add(filename=str(good)))
    assert add(filename=str(good)) == error(
        "attempt to add duplicate property 'a0' to object (type 'container')")
    ok(q.cmd("object-del", {"id": "a0"}))
    ok(add(filename=str(good), refresh=False))
    ok(q.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "t0",
                            "dir": str(pki / "server"), "endpoint": "server"}))
    sock = d.rundir / "n.sock"
    ok(q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                                  "tls-creds": "t0", "tls-authz": "a0"}))
    ok(q.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)}))
    ok(q.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0",
                                  "name": "disk"}))
    uri = f"nbds+unix:///disk?socket={sock}&tls-certificates={pki / 'client'}"
    r = nbdinfo(uri)
    assert r.returncode == 0 and r.stdout.strip() == str(MiB), r.stderr
    # As with the other authz objects, the server looks the id up at each connection.
    ok(q.cmd("object-del", {"id": "a0"}))
    assert nbdinfo(uri).returncode != 0
    assert "No authorization object with id 'a0'" in d.stderr(), d.stderr()


@pytest.mark.parametrize("content, text", [
    (None, "Unable to read '{f}': Failed to open file “{f}”: No such file or directory"),
    ("[1]", "File '{f}' must contain a JSON object"),
    ('{"policy": "allow", "rules": [', "JSON parse error, premature EOI"),
    ("nope", "JSON parse error, invalid keyword 'nope'"),
    ('{"policy": "maybe"}', "Parameter 'policy' does not accept value 'maybe'"),
    ('{"rules": [{"match": "x"}]}', "Parameter 'rules[0].policy' is missing"),
    ('{"rules": [{"match": "x", "policy": "allow", "format": "regex"}]}',
     "Parameter 'format' does not accept value 'regex'"),
    ('{"bogus": 1}', "Parameter 'bogus' is unexpected"),
])
def test_authz_listfile_bad_file_texts(daemon, tmp_path, content, text):
    q = daemon.negotiated()
    f = tmp_path / "rules.json"
    if content is not None:
        f.write_text(content)
    assert q.cmd("object-add", {"qom-type": "authz-listfile", "id": "a0",
                                "filename": str(f)}) == error(text.format(f=f))
    # Nothing was created: the id is free.
    assert q.cmd("object-del", {"id": "a0"}) == error("object 'a0' not found")


def test_authz_listfile_argument_texts(daemon, tmp_path):
    q = daemon.negotiated()
    assert q.cmd("object-add", {"qom-type": "authz-listfile", "id": "a0"}) == error(
        "Parameter 'filename' is missing")
    assert q.cmd("object-add", {"qom-type": "authz-listfile", "id": "a0",
                                "filename": "/x", "refresh": "yes"}) == error(
        "Invalid parameter type for 'refresh', expected: boolean")


def test_authz_listfile_bad_file_on_the_command_line(daemons, tmp_path):
    f = tmp_path / "rules.json"
    f.write_text("[]")
    d = daemons.start_raw(["--object", f"authz-listfile,id=a0,filename={f}"], wait=False)
    assert d.wait() == 1
    assert f"--object: File '{f}' must contain a JSON object" in d.stderr()
