#!/usr/bin/python3
"""Make the seeds of fuzz/corpus/vhost: programs in fuzz-vhost's opcode stream (see the
header comment of fuzz/fuzz-vhost.c) that set a ring up and submit requests, good and bad.

  read, write, flush, get-id, discard, write-zeroes   one valid request each on queue 0
  read-scattered       a read into three data descriptors (the bounce buffer)
  indirect             a write then a read through an indirect table
  queue1-no-event-idx  a read on queue 1 without EVENT_IDX and without protocol features
  read-only            a write and a discard on the read-only export
  chunked              the read sent 3 bytes per send()
  stop-in-flight       a write kicked, then GET_VRING_BASE, a new SET_MEM_TABLE and
                       RESET_OWNER before it is back
  raw-messages         every request by hand, GET_CONFIG and SET_CONFIG included
  bad-*                broken rings and messages: a descriptor loop, a head past the ring, a
                       buffer outside memory, nested and unnegotiated indirect tables, no
                       status byte, past the end of the disk, an unknown type, an avail index
                       running ahead, nine fds, a pipe as memory, a wrong version, an
                       unknown request, a ring outside memory
  backend-req-fd       SET_BACKEND_REQ_FD with an eventfd (acked, then replaced), then without

Usage: fuzz/make-vhost-seeds.py [DIR] (default: fuzz/corpus/vhost next to this script).
"""
import os
import struct
import sys

QVA = 0x7f0000000000
NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ = 0, 1, 4, 8, 11, 13
(GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE, SET_LOG_BASE, SET_LOG_FD,
 SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_KICK,
 SET_VRING_CALL, SET_VRING_ERR, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
 SET_VRING_ENABLE) = range(1, 19)
SET_BACKEND_REQ_FD = 21
GET_CONFIG, SET_CONFIG = 24, 25
V, NEED_REPLY = 1, 8
# sel bits of SETUP
NO_INDIRECT, NO_EVENT_IDX, NO_PROTOCOL, INFLIGHT = 2, 4, 8, 16


def setup(sel=0, lognum=4):
    return b'\x04' + bytes([sel, lognum])


def mem(off, data):
    out = b''
    while data:
        k = data[:255]
        out += b'\x01' + struct.pack('<HB', off, len(k)) + k
        off += len(k)
        data = data[255:]
    return out


def desc(i, addr, length, flags=0, nxt=0):
    return b'\x05' + bytes([i]) + struct.pack('<QIHH', addr, length, flags, nxt)


def raw_desc(addr, length, flags=0, nxt=0):
    return struct.pack('<QIHH', addr, length, flags, nxt)


def avail(head, q=0):
    return b'\x06' + bytes([q]) + struct.pack('<H', head)


def kick(q=0):
    return b'\x02' + bytes([q])


RUN = b'\x03'


def infl(off, data):
    return b'\x07' + struct.pack('<HB', off, len(data)) + data


def msg(request, payload=b'', flags=V, fdsel=0, size=None):
    if size is None:
        size = len(payload)
    return b'\x00' + bytes([fdsel]) + struct.pack('<III', request, flags, size) + payload


def outhdr(t, sector=0):
    return struct.pack('<IIQ', t, 0, sector)


def request(t, data_len, sector=0, q=0, data_writable=None, payload=b''):
    """Header at 0x1000, data at 0x2000, status at 0x3f00; descriptors 0..2 of queue q's
    table (queue 0's table only is reachable with DESC, so queue 1's goes through MEM)."""
    if data_writable is None:
        data_writable = t in (T_IN, T_GET_ID)
    base = q * 0x800
    ds = [raw_desc(0x1000, 16, NEXT, 1)]
    if data_len:
        ds.append(raw_desc(0x2000, data_len, NEXT | (WRITE if data_writable else 0), 2))
    ds.append(raw_desc(0x3f00, 1, WRITE))
    if not data_len:
        ds[0] = raw_desc(0x1000, 16, NEXT, 1)
    out = mem(base, b''.join(ds)) + mem(0x1000, outhdr(t, sector))
    if payload:
        out += mem(0x2000, payload)
    return out + avail(0, q) + kick(q) + RUN


def seeds():
    s = {}
    s['read'] = b'\x00' + setup() + request(T_IN, 512, sector=3)
    s['write'] = b'\x00' + setup() + request(T_OUT, 1024, sector=8, payload=b'\xab' * 64)
    s['flush'] = b'\x00' + setup() + request(T_FLUSH, 0)
    s['get-id'] = b'\x00' + setup() + request(T_GET_ID, 20)
    s['discard'] = b'\x00' + setup() + request(T_DISCARD, 16,
                                               payload=struct.pack('<QII', 8, 16, 0))
    s['write-zeroes'] = b'\x00' + setup() + request(T_WZ, 16,
                                                    payload=struct.pack('<QII', 0, 8, 1))
    s['read-scattered'] = (b'\x00' + setup() +
                           desc(0, 0x1000, 16, NEXT, 1) + desc(1, 0x2000, 100, NEXT | WRITE, 2) +
                           desc(2, 0x2100, 312, NEXT | WRITE, 3) +
                           desc(3, 0x2400, 100, NEXT | WRITE, 4) + desc(4, 0x3f00, 1, WRITE) +
                           mem(0x1000, outhdr(T_IN, 1)) + avail(0) + kick() + RUN)
    table_w = (raw_desc(0x1000, 16, NEXT, 1) + raw_desc(0x2000, 512, NEXT, 2) +
               raw_desc(0x3f00, 1, WRITE))
    table_r = (raw_desc(0x1010, 16, NEXT, 1) + raw_desc(0x2800, 512, NEXT | WRITE, 2) +
               raw_desc(0x3f01, 1, WRITE))
    s['indirect'] = (b'\x00' + setup() + mem(0x3000, table_w) + mem(0x3100, table_r) +
                     mem(0x1000, outhdr(T_OUT, 5) + outhdr(T_IN, 5)) +
                     mem(0x2000, b'\x5a' * 32) +
                     desc(0, 0x3000, 48, INDIRECT) + desc(1, 0x3100, 48, INDIRECT) +
                     avail(0) + avail(1) + kick() + RUN)
    s['queue1-no-event-idx'] = (b'\x00' + setup(1 | NO_EVENT_IDX | NO_PROTOCOL, 3) +
                                request(T_IN, 1024, sector=2, q=1))
    s['read-only'] = (b'\x01' + setup() + request(T_OUT, 512) +
                      mem(0x1000, outhdr(T_DISCARD)) + mem(0x2000, struct.pack('<QII', 0, 8, 0)) +
                      avail(0) + kick() + RUN)
    s['chunked'] = b'\x84' + setup() + request(T_IN, 512)
    m = struct.pack('<II', 1, 0) + struct.pack('<QQQQ', 0, 16384, QVA, 0)
    s['stop-in-flight'] = (b'\x00' + setup() + desc(0, 0x1000, 16, NEXT, 1) +
                           desc(1, 0x2000, 4096, NEXT, 2) + desc(2, 0x3f00, 1, WRITE) +
                           mem(0x1000, outhdr(T_OUT, 100)) + avail(0) + kick() +
                           msg(GET_VRING_BASE, struct.pack('<II', 0, 0)) +
                           msg(SET_MEM_TABLE, m, fdsel=1) + msg(RESET_OWNER) + RUN)
    addr = struct.pack('<IIQQQQ', 0, 0, QVA, QVA + 0x600, QVA + 0x400, 0)
    s['raw-messages'] = (b'\x00' +
                         msg(GET_FEATURES) + msg(SET_FEATURES, struct.pack('<Q', 0x1ffffffff)) +
                         msg(GET_PROTOCOL_FEATURES) +
                         msg(SET_PROTOCOL_FEATURES, struct.pack('<Q', 0x209)) +
                         msg(SET_OWNER) + msg(GET_QUEUE_NUM) +
                         msg(GET_CONFIG, struct.pack('<III', 0, 60, 0) + bytes(60)) +
                         msg(SET_CONFIG, struct.pack('<III', 0, 4, 0) + bytes(4)) +
                         msg(SET_MEM_TABLE, m, flags=V | NEED_REPLY, fdsel=1) +
                         msg(SET_VRING_NUM, struct.pack('<II', 0, 8)) +
                         msg(SET_VRING_BASE, struct.pack('<II', 0, 0)) +
                         msg(SET_VRING_ADDR, addr) +
                         msg(SET_VRING_CALL, struct.pack('<Q', 0), fdsel=4) +
                         msg(SET_VRING_ERR, struct.pack('<Q', 0x100)) +
                         msg(SET_VRING_KICK, struct.pack('<Q', 0), fdsel=2) +
                         msg(SET_VRING_ENABLE, struct.pack('<II', 0, 1), flags=V | NEED_REPLY) +
                         request(T_GET_ID, 20) +
                         msg(GET_VRING_BASE, struct.pack('<II', 0, 0)) +
                         msg(SET_VRING_KICK, struct.pack('<Q', 0x100)) +
                         msg(SET_LOG_BASE, struct.pack('<Q', 0)))
    good = b'\x00' + setup()
    s['bad-loop'] = (good + desc(0, 0x1000, 16, NEXT, 1) + desc(1, 0x2000, 8, NEXT, 0) +
                     avail(0) + kick() + RUN)
    s['bad-head'] = good + avail(200) + kick() + RUN
    s['bad-outside'] = (good + desc(0, 0x1000, 16, NEXT, 1) + desc(1, 0x3ff0, 0x20, WRITE) +
                        avail(0) + kick() + RUN)
    s['bad-nested-indirect'] = (good + mem(0x3000, raw_desc(0x3000, 16, INDIRECT)) +
                                desc(0, 0x3000, 16, INDIRECT) + avail(0) + kick() + RUN)
    s['bad-indirect-not-negotiated'] = (b'\x00' + setup(NO_INDIRECT) + mem(0x3000, table_w) +
                                        desc(0, 0x3000, 48, INDIRECT) + avail(0) + kick() + RUN)
    s['bad-indirect-loop'] = (good + mem(0x3000, raw_desc(0x1000, 16, NEXT, 1) +
                                     raw_desc(0x2000, 16, NEXT, 0)) +
                              desc(0, 0x3000, 32, INDIRECT) + avail(0) + kick() + RUN)
    s['bad-no-status'] = (good + desc(0, 0x1000, 16) + mem(0x1000, outhdr(T_IN)) +
                          avail(0) + kick() + RUN)
    s['bad-past-end'] = good + request(T_IN, 512, sector=2048)
    s['bad-type'] = good + request(77, 0)
    s['bad-avail-ahead'] = good + mem(0x402, struct.pack('<H', 500)) + kick() + RUN
    s['bad-nine-fds'] = b'\x00' + msg(SET_MEM_TABLE, m, fdsel=6) + msg(GET_FEATURES)
    s['bad-pipe-memory'] = (b'\x00' + msg(SET_PROTOCOL_FEATURES, struct.pack('<Q', 8)) +
                            msg(SET_MEM_TABLE, m, flags=V | NEED_REPLY, fdsel=7) +
                            msg(GET_QUEUE_NUM))
    s['bad-version'] = b'\x00' + msg(GET_FEATURES, flags=2)
    s['bad-request'] = b'\x00' + msg(99) + msg(GET_FEATURES)
    s['bad-size'] = b'\x00' + msg(SET_FEATURES, b'\x00' * 4) + msg(GET_FEATURES)
    s['bad-ring-outside'] = (b'\x00' + setup() +
                             msg(SET_VRING_ADDR, struct.pack('<IIQQQQ', 0, 0, QVA + 16376,
                                                             QVA, QVA, 0)) + kick() + RUN)
    # A write taken before a restart (head 0 marked in queue 0's inflight entries): handled
    # again when the ring of 64 starts; then one whose region's used index is ahead of the
    # ring's (a crash between the two), so the last batch's head is cleared instead.
    taken = (mem(0x1000, outhdr(T_OUT, 4)) + mem(0x2000, b'\x77' * 512) +
             desc(0, 0x1000, 16, NEXT, 1) + desc(1, 0x2000, 512, NEXT, 2) +
             desc(2, 0x3f00, 1, WRITE) + avail(0) + infl(16, b'\x01'))
    s['inflight-resubmit'] = b'\x00' + taken + setup(INFLIGHT, 6) + RUN
    s['inflight-torn'] = (b'\x00' + taken + infl(0, struct.pack('<QHHHH', 0, 1, 64, 0, 1)) +
                          setup(INFLIGHT, 6) + RUN)
    # The back-end channel: an eventfd (not a socket: sends to it fail), then none (refused).
    s['backend-req-fd'] = (b'\x00' + msg(SET_PROTOCOL_FEATURES, struct.pack('<Q', 0x28)) +
                           msg(SET_BACKEND_REQ_FD, flags=V | NEED_REPLY, fdsel=4) +
                           msg(SET_BACKEND_REQ_FD, fdsel=4) + msg(SET_BACKEND_REQ_FD) +
                           msg(GET_FEATURES))
    return s


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(
        os.path.abspath(__file__)), 'corpus', 'vhost')
    os.makedirs(d, exist_ok=True)
    for i, (name, data) in enumerate(seeds().items()):
        assert len(data) <= 4096, name
        with open(os.path.join(d, 'seed-%02d-%s' % (i, name)), 'wb') as f:
            f.write(data)


if __name__ == '__main__':
    main()
