"""vhost-device-vsock: a vhost-user virtio-vsock device backend, one or many VMs per process.

Same flags as rust-vmm's ``vhost-device-vsock`` (``vhost-device-vsock/src/main.rs``),
in three mutually exclusive forms, read in this order of precedence:

* ``--config FILE``: YAML with a top-level ``vms:`` list of maps whose keys are
  guest_cid, socket, uds_path, forward_cid, forward_listen (``"9001+9002"``),
  tx_buffer_size, queue_size, groups (``"a+b"``).  Keys may also be spelt with
  ``-`` as upstream's README shows (upstream's own parser refuses them);
* ``--vm key=value,...``, repeatable, one per VM, the same keys (``_`` or ``-``);
* the plain flags ``--guest-cid --socket --uds-path|--forward-cid ...`` for one VM.

Each VM needs exactly one of ``uds_path`` (hybrid vsock over Unix sockets: host
programs connect to it and write ``CONNECT <port>\\n``, answered ``OK <host
port>\\n``; guest connections to port P reach ``<uds_path>_<P>``) and
``forward_cid`` (AF_VSOCK).  CIDs and vhost-user sockets must be unique.  Every VM
is served on its own vhost-user socket and thread, in one process, so VMs that
share a group reach each other by CID.  Bad arguments print one ``error:`` line on
stderr and exit non-zero (upstream prints to stdout and exits 0).

``VHD_VSOCK_TX_NAP_US`` in the environment (default 15, 0 to 1000; 0: off): after
a tx drain that took stream data, how long the thread serving a VM waits for the
guest's next packets, its kicks still off, before it asks for a kick again; any
other work for that thread ends the wait at once.

Example::

    vhost-device-vsock --vm guest-cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock \\
                       --vm guest-cid=5,socket=/tmp/vhost5.socket,uds-path=/tmp/vm5.vsock
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._common import (
    U32_MAX,
    ConfigError,
    add_version_argument,
    run_main,
    serve,
    uint,
    verbatim_socket_path,
)

__all__ = ["Config", "VmConfig", "build_parser", "env_nogil", "env_tx_nap_us", "main", "parse_vm", "run"]

PROG = "vhost-device-vsock"
DEFAULT_GUEST_CID = 3
DEFAULT_TX_BUFFER_SIZE = 64 * 1024
DEFAULT_QUEUE_SIZE = 1024
DEFAULT_GROUP = "default"
#: The tx nap (``virtio_devices.vsock.TX_NAP_US`` and ``TX_NAP_US_MAX``; a test
#: checks they agree: the device layer is not imported to parse arguments).
DEFAULT_TX_NAP_US = 15
MAX_TX_NAP_US = 1000
#: Largest split virtqueue (VIRTIO 1.2 §2.7).
MAX_QUEUE_SIZE = 32768

#: The plain flags: each conflicts with --vm and --config (upstream's clap attributes).
_PLAIN = (
    "guest_cid",
    "socket",
    "uds_path",
    "forward_cid",
    "forward_listen",
    "tx_buffer_size",
    "queue_size",
    "groups",
)
_KEYS = frozenset(_PLAIN)

_VM_HELP = """Device parameters corresponding to a VM in the form of comma separated
key=value pairs. The allowed keys are: guest_cid, socket, uds_path, forward_cid,
forward_listen, tx_buffer_size, queue_size and groups (also spelt with '-').
uds_path and (forward_cid, forward_listen) are mutually exclusive. Example:
--vm guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,
tx-buffer-size=65536,queue-size=1024,groups=group1+group2. Multiple instances of
this argument can be provided to configure devices for multiple guests."""


@dataclass(frozen=True)
class VmConfig:
    """One VM: upstream's ``VsockConfig``."""

    guest_cid: int
    socket: str
    uds_path: str | None
    forward_cid: int | None
    forward_listen: tuple[int, ...]
    tx_buffer_size: int
    queue_size: int
    groups: tuple[str, ...]

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str) -> VmConfig:
        """A VM from ``key: value`` pairs (``--vm`` or one ``vms:`` entry of ``--config``).

        Raises:
            ConfigError: an unknown key, a bad value, no socket, or not exactly one
                of uds_path / forward_cid; the message names ``where``.
        """
        norm: dict[str, Any] = {}
        for key, value in values.items():
            k = str(key).replace("-", "_")
            if k not in _KEYS:
                raise ConfigError(f"{where}: invalid key {key!r} (allowed: {', '.join(_PLAIN)})")
            norm[k] = value
        if norm.get("socket") in (None, ""):
            raise ConfigError(f"{where}: required key 'socket' not found")
        uds, fwd = norm.get("uds_path"), norm.get("forward_cid")
        if (uds is None) == (fwd is None):
            raise ConfigError(f"{where}: exactly one of uds_path or forward_cid is required")
        if uds is not None and norm.get("forward_listen") is not None:
            raise ConfigError(f"{where}: forward_listen needs forward_cid, not uds_path")
        return cls(
            guest_cid=_number(norm.get("guest_cid", DEFAULT_GUEST_CID), 64, f"{where}: guest_cid"),
            socket=verbatim_socket_path(str(norm["socket"])),
            uds_path=None if uds is None else str(uds),
            forward_cid=None if fwd is None else _number(fwd, 32, f"{where}: forward_cid"),
            forward_listen=_ports(norm.get("forward_listen"), f"{where}: forward_listen"),
            tx_buffer_size=_number(
                norm.get("tx_buffer_size", DEFAULT_TX_BUFFER_SIZE), 32, f"{where}: tx_buffer_size"
            ),
            queue_size=_number(norm.get("queue_size", DEFAULT_QUEUE_SIZE), 64, f"{where}: queue_size"),
            groups=_groups(norm.get("groups", DEFAULT_GROUP), f"{where}: groups"),
        )

    def check(self, where: str) -> None:
        """Values that cannot work (upstream accepts some and fails later, or never).

        Raises:
            ConfigError: a reserved CID, a zero buffer, a queue size that is not a
                power of two up to 32768.
        """
        # VIRTIO 1.2 §5.10.4: CIDs 0, 1 and 2 are reserved; 0xFFFFFFFF is VMADDR_CID_ANY.
        if self.guest_cid <= 2 or self.guest_cid >= U32_MAX:
            raise ConfigError(f"{where}: guest_cid must be 3..{U32_MAX - 1}, not {self.guest_cid}")
        if self.tx_buffer_size == 0:
            raise ConfigError(f"{where}: tx_buffer_size must be at least 1, not 0")
        q = self.queue_size
        if q == 0 or q > MAX_QUEUE_SIZE or q & (q - 1):
            raise ConfigError(f"{where}: queue_size must be a power of two up to {MAX_QUEUE_SIZE}, not {q}")


def _number(value: Any, bits: int, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an unsigned integer, not {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip()
        if not text.isascii() or not text.isdigit():
            raise ConfigError(f"{what} must be an unsigned integer, not {value!r}")
        n = int(text)
    if n < 0 or n >= 1 << bits:
        raise ConfigError(f"{what} must fit in u{bits}, not {n}")
    return n


def _ports(value: Any, what: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (_number(value, 32, what),)
    parts = [p for p in str(value).strip().split("+")]
    return tuple(_number(p, 32, what) for p in parts)


def _groups(value: Any, what: str) -> tuple[str, ...]:
    names = [str(v) for v in value] if isinstance(value, list) else str(value).strip().split("+")
    if any(not n for n in names):
        raise ConfigError(f"{what}: empty group name in {value!r}")
    return tuple(names)


def parse_vm(text: str) -> dict[str, str]:
    """``key=value,...`` of one ``--vm`` into a dict (values still text).

    Raises:
        argparse.ArgumentTypeError: a pair without ``=`` (clap: "Bad argument"), a
            key given twice.
    """
    out: dict[str, str] = {}
    for pair in text.strip().split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"bad argument {pair!r}: expected key=value")
        if key.replace("-", "_") in {k.replace("-", "_") for k in out}:
            raise argparse.ArgumentTypeError(f"key {key!r} given twice")
        out[key] = value
    return out


parse_vm.__name__ = "vm"


class _Seen(argparse.Action):
    """Store the value and remember the flag was given (clap's conflicts ignore defaults)."""

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, opt: Any = None
    ) -> None:
        setattr(ns, self.dest, values)
        ns._given = (*getattr(ns, "_given", ()), self.dest)


class _VsockParser(argparse.ArgumentParser):
    """argparse with upstream's conflicts and its ``--socket`` required in plain mode
    (usage errors: exit 2, as clap's)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, rest = super().parse_known_args(args, namespace)
        given: tuple[str, ...] = getattr(ns, "_given", ())
        if ns.vm:
            given = (*given, "vm")
        flag = {d: "--" + d.replace("_", "-") for d in (*_PLAIN, "vm", "config")}
        for other in ("config", "vm"):
            if other in given:
                for d in given:
                    if d in _PLAIN:
                        self.error(f"the argument '{flag[d]}' cannot be used with '{flag[other]}'")
        if "config" in given and "vm" in given:
            self.error("the argument '--vm' cannot be used with '--config'")
        if "uds_path" in given:
            for d in ("forward_cid", "forward_listen"):
                if d in given:
                    self.error(f"the argument '--uds-path' cannot be used with '{flag[d]}'")
        if "config" not in given and "vm" not in given and "socket" not in given:
            self.error("the following required arguments were not provided: --socket <SOCKET>")
        return ns, rest


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-vsock``, flag for flag as upstream's ``VsockArgs``."""
    p = _VsockParser(prog=PROG, description=(__doc__ or "").strip().splitlines()[0])
    add_version_argument(p)
    p.set_defaults(_given=())
    p.add_argument(
        "--guest-cid",
        type=uint(64),
        default=DEFAULT_GUEST_CID,
        action=_Seen,
        help="Context identifier of the guest which uniquely identifies the device for its lifetime "
        f"[default: {DEFAULT_GUEST_CID}]",
    )
    p.add_argument(
        "--socket",
        action=_Seen,
        help="Unix socket to which a hypervisor connects to and sets up the control path with the device",
    )
    p.add_argument(
        "--uds-path", action=_Seen, help="Unix socket to which a host-side application connects to"
    )
    p.add_argument(
        "--forward-cid", type=uint(32), action=_Seen, help="The vsock CID to forward connections from guest"
    )
    p.add_argument(
        "--forward-listen", action=_Seen, help="The vsock ports to forward connections from host (p1+p2+...)"
    )
    p.add_argument(
        "--tx-buffer-size",
        type=uint(32),
        default=DEFAULT_TX_BUFFER_SIZE,
        action=_Seen,
        help=f"The size of the buffer used for the TX virtqueue [default: {DEFAULT_TX_BUFFER_SIZE}]",
    )
    p.add_argument(
        "--queue-size",
        type=uint(64),
        default=DEFAULT_QUEUE_SIZE,
        action=_Seen,
        help=f"The size of the vring queue [default: {DEFAULT_QUEUE_SIZE}]",
    )
    p.add_argument(
        "--groups",
        default=DEFAULT_GROUP,
        action=_Seen,
        help="The list of group names to which the device belongs (g1+g2+...). A group is a set of "
        f"devices that allow sibling communication between their guests [default: {DEFAULT_GROUP}]",
    )
    p.add_argument("--vm", type=parse_vm, action="append", metavar="VM", help=_VM_HELP)
    p.add_argument("--config", action=_Seen, metavar="CONFIG", help="Load from a given configuration file")
    return p


def _load_yaml(path: str) -> list[VmConfig]:
    import yaml  # noqa: PLC0415 - only --config needs it

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path!r}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path!r}: not YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("vms"), list) or not doc["vms"]:
        raise ConfigError(f"--config {path!r}: needs a top-level 'vms:' list with at least one VM")
    vms = []
    for i, entry in enumerate(doc["vms"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"--config {path!r}: vms[{i}] must be a map of keys, not {entry!r}")
        vms.append(VmConfig.from_mapping(entry, f"--config {path} vms[{i}]"))
    return vms


@dataclass(frozen=True)
class Config:
    """The validated VMs of one ``vhost-device-vsock`` process."""

    vms: tuple[VmConfig, ...]
    #: The tx nap of every VM (µs), from ``VHD_VSOCK_TX_NAP_US``.
    tx_nap_us: int = DEFAULT_TX_NAP_US
    #: Whether the VMs' kicks may be served without the GIL (``VHD_VSOCK_NOGIL``).
    nogil: bool = True

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        """``--config`` first, else the ``--vm`` list, else the plain flags (upstream's order).

        Raises:
            ConfigError: a bad file or value, no backend, two VMs with one CID,
                one vhost-user socket or one uds_path; ``VHD_VSOCK_TX_NAP_US`` not
                a number of microseconds from 0 to 1000; ``VHD_VSOCK_NOGIL`` not
                0 or 1.
        """
        tx_nap_us = env_tx_nap_us()
        nogil = env_nogil()
        given: tuple[str, ...] = getattr(ns, "_given", ())
        if "config" in given:
            vms = _load_yaml(ns.config)
        elif ns.vm:
            vms = [VmConfig.from_mapping(dict(v), f"--vm #{i + 1}") for i, v in enumerate(ns.vm)]
        else:
            plain = {d: getattr(ns, d) for d in _PLAIN if getattr(ns, d) is not None}
            vms = [VmConfig.from_mapping(plain, "arguments")]
        seen_cid: dict[int, int] = {}
        seen_path: dict[str, int] = {}
        for i, vm in enumerate(vms):
            where = f"VM #{i + 1}"
            vm.check(where)
            if vm.guest_cid in seen_cid:
                raise ConfigError(
                    f"{where}: guest_cid {vm.guest_cid} already used by VM #{seen_cid[vm.guest_cid] + 1}"
                )
            seen_cid[vm.guest_cid] = i
            for path in (vm.socket, vm.uds_path):
                if path is None:
                    continue
                real = os.path.abspath(path)
                if real in seen_path:
                    raise ConfigError(f"{where}: path {path!r} already used by VM #{seen_path[real] + 1}")
                seen_path[real] = i
        return cls(tuple(vms), tx_nap_us, nogil)


def env_tx_nap_us(env: Mapping[str, str] | None = None) -> int:
    """``VHD_VSOCK_TX_NAP_US`` from the environment (``env``, else the process's):
    how long, in µs, the device waits after a tx drain that took stream data for
    the driver's next packets before it asks for a kick again (0: never);
    ``DEFAULT_TX_NAP_US`` when unset or empty.

    Raises:
        ConfigError: not a whole number from 0 to ``MAX_TX_NAP_US``.
    """
    text = (os.environ if env is None else env).get("VHD_VSOCK_TX_NAP_US", "").strip()
    if not text:
        return DEFAULT_TX_NAP_US
    if not text.isascii() or not text.isdigit() or int(text) > MAX_TX_NAP_US:
        raise ConfigError(
            f"VHD_VSOCK_TX_NAP_US must be a number of microseconds from 0 to {MAX_TX_NAP_US}, not {text!r}"
        )
    return int(text)


def env_nogil(env: Mapping[str, str] | None = None) -> bool:
    """``VHD_VSOCK_NOGIL`` from the environment (``env``, else the process's):
    ``0`` serves every kick with the GIL (to compare), ``1``, unset or empty lets
    the steady state of a host-to-guest stream be served without it.

    Raises:
        ConfigError: neither 0 nor 1.
    """
    text = (os.environ if env is None else env).get("VHD_VSOCK_NOGIL", "").strip()
    if text not in ("", "0", "1"):
        raise ConfigError(f"VHD_VSOCK_NOGIL must be 0 or 1, not {text!r}")
    return text != "0"


def run(config: Config) -> int:
    """Open every VM's host side once, then serve all VMs' sockets until SIGINT/SIGTERM.

    Raises:
        ConfigError: a host side cannot be opened (a uds_path in use, no AF_VSOCK).
    """
    from virtio_devices.hosts.vsock import UnixHost, VsockError, VsockForwardHost, VsockHost  # noqa: PLC0415
    from virtio_devices.vsock import VsockDevice, VsockRegistry  # noqa: PLC0415

    hosts: list[VsockHost] = []
    try:
        for vm in config.vms:
            try:
                if vm.uds_path is not None:
                    hosts.append(UnixHost(vm.uds_path))
                else:
                    assert vm.forward_cid is not None
                    hosts.append(VsockForwardHost(vm.forward_cid, list(vm.forward_listen)))
            except (VsockError, OSError) as e:
                raise ConfigError(f"guest_cid {vm.guest_cid}: {e}") from e
        registry = VsockRegistry()

        def device_factory(index: int) -> VsockDevice:
            vm = config.vms[index]
            return VsockDevice(
                vm.guest_cid,
                hosts[index],
                tx_buffer_size=vm.tx_buffer_size,
                queue_size=vm.queue_size,
                groups=vm.groups,
                registry=registry,
                tx_nap_us=config.tx_nap_us,
                nogil=config.nogil,
            )

        return serve(PROG, [vm.socket for vm in config.vms], device_factory)
    finally:
        for host in hosts:
            host.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-vsock`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
