"""The thin-provisioning stack around a guest: a qcow2 image on a loop device whose backing file
starts small, the thinblkd command line that serves it over NBD, and thinblk-agent's
configuration. Shared by tests/integration/test_agent_guest.py and scripts/demo.py.

    store = LoopStore(dir / "backing.img", initial=32 << 20, virtual_size=4 << 30)
    argv = thinblkd_argv(thinblkd, store.dev, qmp_sock, nbd_sock)
    write_agent_config(path, {"d0": qmp_sock}, [AgentDisk("disk0", "d0", chunk="32M")])
    ...
    store.close()

Needs root (losetup) and qemu-img.
"""

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


class LoopStore:
    """A sparse backing file of INITIAL bytes attached as a loop device, with a qcow2 image of
    VIRTUAL_SIZE made on the device by qemu-img. grow() is what management does by hand."""

    def __init__(self, backing, initial, virtual_size):
        self.backing = Path(backing)
        with open(self.backing, "wb") as f:
            f.truncate(initial)
        self.dev = subprocess.run(["losetup", "--find", "--show", str(self.backing)],
                                  check=True, capture_output=True, text=True).stdout.strip()
        try:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.dev,
                            str(virtual_size)], check=True)
        except BaseException:
            self.close()
            raise

    def size(self):
        """The backing file's size: the allocation management has granted."""
        return self.backing.stat().st_size

    def device_size(self):
        """The loop device's capacity, as the kernel sees it."""
        with open(self.dev, "rb") as f:
            return f.seek(0, os.SEEK_END)

    def grow(self, by):
        """Grow the backing file by BY bytes and tell the loop driver (losetup -c)."""
        with open(self.backing, "r+b") as f:
            f.truncate(self.size() + by)
        subprocess.run(["losetup", "-c", self.dev], check=True)
        return self.size()

    def close(self):
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev])
            self.dev = None


def thinblkd_argv(thinblkd, dev, qmp_sock, nbd_sock, name="disk0", vhost_sock=None):
    """thinblkd serving the qcow2 image on block device DEV as the NBD export NAME (device NAME,
    format node NAME, protocol node proto0), with a QMP monitor on QMP_SOCK. With VHOST_SOCK,
    the export is a vhost-user-blk one on that socket instead (NBD_SOCK is then unused)."""
    if vhost_sock:
        export = ["--export", f"type=vhost-user-blk,id={name},node-name={name},addr.type=unix,"
                              f"addr.path={vhost_sock},writable=on"]
    else:
        export = ["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                  "--export", f"type=nbd,id={name},node-name={name},name={name},writable=on"]
    return [str(thinblkd),
            "--chardev", f"socket,id=mon0,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=mon0",
            "--blockdev", f"driver=host_device,node-name=proto0,filename={dev}",
            "--blockdev", f"driver=qcow2,node-name={name},file=proto0"] + export


@dataclass
class AgentDisk:
    """A [disk NAME] section of thinblk-agent's configuration. None: the agent's default."""
    device: str
    daemon: str
    method: str = "loop"
    hook: str = None
    chunk: str = None
    watermark: str = None
    cap: str = None


def write_agent_config(path, daemons, disks, agent=None):
    """Writes thinblk-agent's configuration file: DAEMONS {name: qmp socket}, DISKS a list of
    AgentDisk, AGENT a dict of [agent] keys. Returns PATH."""
    lines = ["[agent]"] + [f"{k} = {v}" for k, v in (agent or {}).items()]
    for name, sock in daemons.items():
        lines += [f"[daemon {name}]", f"socket = {sock}"]
    for i, d in enumerate(disks):
        lines += [f"[disk {d.device if len(disks) == 1 else f'{d.daemon}-{d.device}'}]",
                  f"daemon = {d.daemon}", f"device = {d.device}", f"method = {d.method}"]
        for key in ("hook", "chunk", "watermark", "cap"):
            v = getattr(d, key)
            if v is not None:
                lines.append(f"{key} = {v}")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def agent_argv(agent, config):
    """thinblk-agent's command line for a configuration file."""
    return [str(agent), "--config", str(config), "-v"]
