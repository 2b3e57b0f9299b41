#!/usr/bin/python3
"""qmp-events.py SOCKET [OUT]: log a QMP monitor's events, one JSON object a line.

Connects to the Unix socket SOCKET (retrying for up to 30 s until something listens), sends
qmp_capabilities, then writes every event to OUT (default stdout) as it arrives, with one member
added: "recv", the wall-clock time (seconds, float) at which this process read it. The event's own
"timestamp" is the server's wall clock when it emitted the event, in microseconds: compare those
with other wall-clock stamps. A line {"ready": true} is written (and flushed) once negotiated, so
a caller can wait for it. Exits 0 at EOF (the server went away) or on SIGTERM/SIGINT.

Standard library only (used by bench/thin.sh and scripts/demo.py).
"""

import json
import signal
import socket
import sys
import time


def connect(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)   # polling interval while the server starts


def messages(sock):
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line), time.time()


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[0])
    out = open(sys.argv[2], "w") if len(sys.argv) == 3 else sys.stdout
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = connect(sys.argv[1])
    msgs = messages(sock)
    greeting, _ = next(msgs)
    if "QMP" not in greeting:
        sys.exit(f"qmp-events: not a QMP greeting: {greeting!r}")
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    for msg, recv in msgs:
        if "return" in msg or "error" in msg:
            if "error" in msg:
                sys.exit(f"qmp-events: qmp_capabilities failed: {msg!r}")
            out.write('{"ready": true}\n')
        elif "event" in msg:
            msg["recv"] = recv
            out.write(json.dumps(msg) + "\n")
        out.flush()


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError, ConnectionResetError):
        pass
