"""The virtio-scsi device (VIRTIO 1.2 §5.6): one target, one LUN per disk image.

Queues (§5.6.2): 0 control, 1 event, 2.. requests (:data:`REQUEST_QUEUES` of them,
served independently; QEMU's ``num_queues`` picks how many the guest uses).

Request queue (§5.6.6.1): the device-readable part starts with ``virtio_scsi_cmd_req``
(lun[8], id, task_attr, prio, crn, cdb[32]), then the data-out; the device-writable
part starts with ``virtio_scsi_cmd_resp`` (sense_len, resid, status_qualifier,
status, response, sense[96]), then the data-in.  The used length is the response
header plus the data-in written (§2.7.8).  READ and WRITE(10/16) of the common
shape go through the compiled engine (:mod:`._engine`): one io_uring SQE per
request, submitted on the loop thread once per drain, completed from the ring's
eventfd in one call per batch.  Every other command that touches the image runs on
a worker thread (:meth:`VirtioDevice.run_in_worker`): the payload goes between the
image fd and guest memory with ``preadv``/``pwritev`` and the GIL released.  Either
way a slow disk never holds up the vhost-user connection or the other queues.

Response codes (§5.6.6.1.1): OK with the SCSI status and sense; OVERRUN when the
CDB asks for more data than the data-in/data-out buffers hold; BAD_TARGET for a
target other than 0 or a LUN in another format than single-level; FAILURE for a
request whose header is short, or whose device-readable descriptors do not all
come before the device-writable ones (§2.7.4.2; nothing of it is acted on), when
a response header fits at all.

Control queue (§5.6.6.2): task management functions are answered after every request
in flight has completed (ABORT TASK, ABORT TASK SET, LOGICAL UNIT RESET, I_T NEXUS
RESET, CLEAR TASK SET, QUERY TASK/TASK SET: FUNCTION COMPLETE; CLEAR ACA:
FUNCTION REJECTED); asynchronous-notification query and subscribe get
``event_actual`` 0.  Upstream never completes them.

Event queue (§5.6.6.3): no events are sent (no hot-plug), so its buffers stay in
the avail ring: nothing is popped.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Sequence

from virtio_queue import DescriptorChain, GuestMemory, InvalidAvailRingIndex, Queue, Reader, Writer

from ..base import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    EventLoop,
    Interrupt,
    Park,
    TimerHandle,
    VirtioDevice,
)
from ..errors import MalformedRequest
from ..hosts.images import DiskImage
from ._engine import Engine, ReapPump, RequestPump
from .emulation import (
    BLOCK_SHIFT,
    BLOCK_SIZE,
    CHECK_CONDITION,
    GOOD,
    MAX_TRANSFER_BLOCKS,
    REPORT_LUNS_WLUN,
    SPACE_ALLOCATION_FAILED,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    BlockIO,
    CheckCondition,
    LogicalUnit,
    Sense,
    Target,
)

__all__ = [
    "MAX_QUEUE_SIZE",
    "QUEUE_SIZE",
    "REQUEST_QUEUES",
    "VIRTIO_ID_SCSI",
    "ScsiDevice",
    "parse_lun",
]

log = logging.getLogger(__name__)

#: What the engine hands back for a request it did not finish (:meth:`Engine.reap`).
EngineRest = tuple[int, DescriptorChain, bool, bool, int, int, int, int, int]

VIRTIO_ID_SCSI = 8
#: Upstream's queue size: what the config space's seg_max and cmd_per_lun are
#: derived from.
QUEUE_SIZE = 128
#: The largest ring accepted (QEMU's VIRTQUEUE_MAX_SIZE).  vhost-user gives the
#: back-end no say in a ring's size: the front-end sets it.  QEMU 10.0 offers the
#: guest 1024-entry rings on vhost-user-scsi-pci whatever ``virtqueue_size`` says
#: (SeaBIOS then uses 256, Linux 1024), so refusing rings above 128, as upstream
#: does, fails the connection before the guest boots.
MAX_QUEUE_SIZE = 1024
#: Request queues offered (upstream: 1).
REQUEST_QUEUES = 4
VIRTIO_SCSI_F_HOTPLUG = 1 << 0
VIRTIO_SCSI_F_CHANGE = 1 << 2

CDB_SIZE = 32
SENSE_SIZE = 96
#: virtio_scsi_cmd_req: lun[8], id u64, task_attr u8, prio u8, crn u8, cdb[32].
REQ_HEADER = 8 + 8 + 3 + CDB_SIZE
#: virtio_scsi_cmd_resp: sense_len u32, resid u32, status_qualifier u16, status u8,
#: response u8, sense[96].
RESP_HEADER = 12 + SENSE_SIZE
_RESP = struct.Struct(f"<IIHBB{SENSE_SIZE}s")

# Response codes (§5.6.6.1).
S_OK = 0
S_OVERRUN = 1
S_BAD_TARGET = 3
S_FAILURE = 9
# Control queue (§5.6.6.2).
T_TMF = 0
T_AN_QUERY = 1
T_AN_SUBSCRIBE = 2
TMF_ABORT_TASK = 0
TMF_ABORT_TASK_SET = 1
TMF_CLEAR_ACA = 2
TMF_CLEAR_TASK_SET = 3
TMF_I_T_NEXUS_RESET = 4
TMF_LOGICAL_UNIT_RESET = 5
TMF_QUERY_TASK = 6
TMF_QUERY_TASK_SET = 7
S_FUNCTION_COMPLETE = 0
S_FUNCTION_REJECTED = 11
_TMF_REQ = struct.Struct("<II8sQ")  # type, subtype, lun, id
_AN_REQ = struct.Struct("<I8sI")  # type, lun, event_requested
#: How long a task management function waits for the requests in flight, and how
#: often it looks.
TMF_WAIT_S = 30.0
TMF_POLL_S = 0.002
#: The engine's ring: room for every request queue's entries in flight at once.
ENGINE_ENTRIES = 512


def parse_lun(lun: bytes) -> tuple[int, int] | None:
    """``(target, lun)`` of a virtio-scsi LUN field (§5.6.6.1), or None if malformed.

    Accepted: the REPORT LUNS well-known LUN as upstream spells it (``c1 01 00..``),
    and ``01 <target> <single-level LUN> 00 00 00 00`` where the LUN uses flat space
    (01b, what Linux sends), peripheral device addressing on bus 0 (00b), or is the
    REPORT LUNS well-known LUN (``c1 01``).
    """
    if lun == b"\xc1\x01\x00\x00\x00\x00\x00\x00":
        return 0, REPORT_LUNS_WLUN
    if lun[0] != 1 or any(lun[4:8]):
        return None
    method = lun[2] >> 6
    if method == 1:
        return lun[1], ((lun[2] & 0x3F) << 8) | lun[3]
    if method == 0 and lun[2] == 0:
        return lun[1], lun[3]
    if lun[2] == 0xC1 and lun[3] == 0x01:
        return lun[1], REPORT_LUNS_WLUN
    return None


def _io_sense(err: OSError, write: bool) -> Sense:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return SPACE_ALLOCATION_FAILED
    return WRITE_ERROR if write else UNRECOVERED_READ_ERROR


def _answer_fault(index: int, chain: DescriptorChain, respond: Callable[[Writer], int]) -> int:
    """A request queue's chain that failed: ``respond`` fills its response header
    when the chain has room for one; used length 0 otherwise, on the control and
    event queues, or when guest memory is unusable too (nothing to say)."""
    if index < 2:
        return 0
    try:
        writer = chain.writer()
        if writer.available_bytes() < RESP_HEADER:
            return 0
        return respond(writer)
    except Exception:
        return 0


class ScsiDevice(VirtioDevice):
    """virtio-scsi over disk images (upstream's ``VhostUserScsiBackend``).

    ``images[k]`` is LUN k of target 0.  ``read_only`` reports and enforces write
    protection on every LUN (upstream only reports it); ``solid_state`` reports a
    non-rotating medium (VPD page B1h).  The images are shared with every other
    device made from them (one per front-end connection) and are not closed here.
    ``use_engine=False`` serves every request in Python, ``inline_writes=False``
    sends every write through the ring (the engine's A/B twins); ``fixed_max``
    bounds the guest RAM the engine registers for O_DIRECT transfers (bytes; 0:
    none; None: the engine's default, 16 GiB).
    """

    device_id = VIRTIO_ID_SCSI
    name = "scsi"
    queue_sizes = (MAX_QUEUE_SIZE,) * (2 + REQUEST_QUEUES)
    # Upstream's bits (no NOTIFY_ON_EMPTY), and CHANGE: QEMU's vhost-user-scsi-pci
    # acks it unless ``param_change=off`` whether offered or not, and a back-end must
    # refuse bits it never offered.  We never send a parameter change event, which
    # CHANGE allows (§5.6.6.3.3: the device "may" report them).
    features = (
        VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_SCSI_F_HOTPLUG
        | VIRTIO_SCSI_F_CHANGE
    )
    has_config = True

    def __init__(
        self,
        images: Sequence[DiskImage],
        *,
        read_only: bool = False,
        solid_state: bool = False,
        serials: Sequence[str] | None = None,
        use_engine: bool = True,
        inline_writes: bool = True,
        fixed_max: int | None = None,
    ) -> None:
        super().__init__()
        self.images = list(images)
        units = [
            LogicalUnit(
                k,
                img.size >> BLOCK_SHIFT,
                read_only=read_only or img.read_only,
                solid_state=solid_state,
                serial=serials[k] if serials else LogicalUnit.serial_for(img.name, k),
            )
            for k, img in enumerate(self.images)
        ]
        self.target = Target(units)
        # Task management functions waiting for the requests in flight.
        self._tmf_held: list[tuple[DescriptorChain, Writer, float]] = []
        self._tmf_timer: TimerHandle | None = None
        #: The io_uring engine of READ/WRITE(10/16), made at the first activation;
        #: None where io_uring is unavailable (everything takes the Python path).
        self._engine: Engine | None = None
        self._engine_tried = not use_engine
        self._inline_writes = inline_writes
        #: The engine's ``fixed_max`` (guest RAM registered for O_DIRECT), or its default.
        self._fixed_max = fixed_max
        self._engine_loop: EventLoop | None = None
        #: The engine's eventfd served in compiled code (:class:`~._engine.ReapPump`).
        self._reaper: ReapPump | None = None

    # -- config space (§5.6.4) -------------------------------------------------------
    def config_space(self) -> bytes:
        """``virtio_scsi_config``: upstream's values, ``num_queues`` = our request queues."""
        return struct.pack(
            "<IIIIIIIHHI",
            REQUEST_QUEUES,
            QUEUE_SIZE - 2,  # seg_max: the header descriptors take two
            MAX_TRANSFER_BLOCKS,  # max_sectors
            QUEUE_SIZE,  # cmd_per_lun
            16,  # event_info_size
            SENSE_SIZE,
            CDB_SIZE,
            0,  # max_channel
            255,  # max_target
            16383,  # max_lun
        )

    # -- lifecycle -------------------------------------------------------------------
    def activate(
        self, memory: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, loop: EventLoop
    ) -> None:
        """Start the device; the engine (made once) watches its eventfd on ``loop``."""
        super().activate(memory, queues, interrupt, loop)
        if not self._engine_tried:
            self._engine_tried = True
            try:
                self._engine = Engine(
                    [img.fd for img in self.images],
                    [u.blocks for u in self.target.units],
                    [u.read_only for u in self.target.units],
                    ENGINE_ENTRIES,
                    self._inline_writes,
                    [img.direct_fd for img in self.images],
                )
            except OSError as e:
                log.warning("scsi: io_uring unavailable (%s): every request on the Python path", e)
            else:
                if self._fixed_max is not None:
                    self._engine.fixed_max = self._fixed_max
        if self._engine is not None:
            # The compiled signallers only (vhost-user's call fds): a drain calls
            # them partway, where another transport's Python callback that
            # raised would leave the drain's refused chains unserved.
            signaller = getattr(interrupt, "signaller", None)
            self._engine.attach(
                queues, [signaller(i) for i in range(len(queues))] if signaller is not None else None
            )
            # Completions are finished in compiled code (ReapPump) where the loop
            # serves pumps; _on_engine runs for what needs Python.
            self._reaper = ReapPump(self._engine, self)
            loop.add_reader(self._engine.fd, self._on_engine, pump=self._reaper)
            # The engine's wait for completions ends when the loop has other work.
            fileno = getattr(loop, "fileno", None)
            self._engine.loop_fd = int(fileno()) if fileno is not None else -1
            self._engine_loop = loop

    # -- queues ----------------------------------------------------------------------
    def compiled_served(self) -> tuple[int, int]:
        """Drains the request queues' kick pumps finished without Python count in
        the engine."""
        engine = getattr(self, "_engine", None)
        return (engine.pumped_chains, engine.pumped_bytes) if engine is not None else (0, 0)

    def kick_pump(self, index: int) -> RequestPump | None:
        """A request queue's kicks go to the engine without this class's Python
        frame (:class:`~._engine.RequestPump`): ``process_queue`` runs only for
        what the engine hands over."""
        if index < 2 or self._engine is None:
            return None
        return RequestPump(self._engine, index, self)

    def process_queue(self, index: int) -> None:
        """Drain control and request queues; leave event buffers in the avail ring.

        A request queue goes to the engine in one call (:meth:`Engine.serve`): it
        pops every chain, serves READ/WRITE(10/16), submits, and finishes what
        completed at once (page-cache hits, inline writes); the chains it does not
        serve come back and go through :meth:`handle_chain` under the framework's
        error policy, in order.
        """
        if index == 1:
            return
        engine = self._engine
        if index == 0 or engine is None or self.broken is not None or not self.active:
            self.process_chains(index)
            return
        try:
            served, nbytes, signal, rest, refused, bad = engine.serve(index)
        except InvalidAvailRingIndex:
            self.queues[index].ready = False
            raise
        if served:
            self.chains_served += served
            self.bytes_served += nbytes
        if signal:
            self._signal(signal)
        if refused or bad or rest:
            self._engine_slow(index, refused, bad, rest)

    def _signal(self, signal: int) -> None:
        """Notify the queues whose bit is set (the engine asked needs_notification)."""
        interrupt = self.interrupt
        if interrupt is None:
            return
        index = 0
        while signal:
            if signal & 1:
                interrupt.signal_used(index)
            signal >>= 1
            index += 1

    def _engine_slow(
        self, index: int, refused: list[DescriptorChain], bad: int, rest: list[EngineRest]
    ) -> None:
        """What :meth:`Engine.serve` left: out-of-range heads (dropped, logged), the
        chains it does not serve (the Python path, in order, under the framework's
        error policy) and the requests it did not finish."""
        if bad:
            err = MalformedRequest(f"scsi q{index}: {bad} head index(es) out of range")
            self._log_guest_fault(index, err)
        queue = self.queues[index]
        served = 0
        for chain in refused:
            used = self._call(self.handle_chain, index, chain)
            if used is not None:
                assert not isinstance(used, Park)  # scsi never parks
                queue.add_used(chain.head_index, used)
                self.chains_served += 1
                self.bytes_served += used
                served += 1
        if served:
            self.notify(index)
        for item in rest:
            self._engine_rest(item)

    def _on_engine(self) -> None:
        """The engine's eventfd: finish what completed, one notification per queue."""
        engine = self._engine
        if engine is None or not self.active:
            return
        # Where the loop does not serve pumps, the pump's compiled reap first.
        reaper = self._reaper
        if reaper is not None and not reaper.pump():
            return
        served, nbytes, signal, rest = engine.reap()
        if served:
            self.chains_served += served
            self.bytes_served += nbytes
        if signal:
            self._signal(signal)
        for item in rest:
            self._engine_rest(item)

    def _engine_rest(self, item: EngineRest) -> None:
        """An engine request that did not move its whole transfer: an error is
        answered now (CHECK CONDITION with the sense of the error); a short
        transfer goes on from where it stopped on a worker, as the Python path's."""
        index, chain, write, fua, lun, lba, blocks, moved, err = item
        io = BlockIO("write" if write else "read", lba, blocks, fua)
        if err == errno.EINVAL and self.images[lun].direct_fd >= 0:
            # O_DIRECT refused this transfer (a device with larger sectors):
            # the Python path does it again through the page cache.
            err = moved = 0
        unit = self.target.unit(lun)
        assert unit is not None
        reader, writer = chain.reader(), chain.writer()
        reader.consume(REQ_HEADER)
        data_in = writer.split_at(RESP_HEADER)
        if err:
            e = OSError(err, os.strerror(err))
            log.error("scsi LUN %d: %s at lba %d failed: %s", lun, io.op, io.lba, e)
            room = data_in.available_bytes() + reader.available_bytes()
            self.complete(index, chain.head_index, _check(writer, _io_sense(e, io.op == "write"), room))
            return
        used = self._block_io(
            index, chain, unit=unit, io=io, reader=reader, writer=writer, data_in=data_in, start=moved
        )
        if used is not None:
            self.complete(index, chain.head_index, used)

    def wait_completions(self, index: int, timeout: float) -> bool:
        """Wait for the engine's requests of queue ``index`` and finish them (the
        in-process test kit's stand-in for the loop); False if none is in flight.
        Returns once a reap took one of them, or ``timeout`` seconds passed: a
        wake-up whose reap found nothing (the eventfd counted a completion an
        earlier reap had already taken) waits again."""
        engine = self._engine
        if engine is None or not engine.in_flight(index):
            return False
        before = engine.in_flight(index)
        deadline = time.monotonic() + timeout
        while engine.in_flight(index) == before:
            left = deadline - time.monotonic()
            if left <= 0 or not engine.wait(left):
                break
            self._on_engine()
        return True

    def handle_chain(self, index: int, chain: DescriptorChain) -> int | None:
        """Serve a control request (``index`` 0) or a SCSI command (``index`` >= 2).

        Raises:
            MalformedRequest: the request or response header does not fit its buffers
                (§5.6.6.1: the driver MUST put the header first); answered with
                FAILURE when the response header fits (:meth:`guest_fault`).
            InvalidChain: a device-readable descriptor follows a device-writable one
                (VIRTIO 1.2 §2.7.4.2: the driver MUST put the readable part first);
                answered the same way, before any of the request is acted on.
        """
        # Reader and Writer would serve such a chain as if it were in order (each
        # sees one direction); the spec makes it the driver's error, so it is
        # refused before a byte of it reaches the image (upstream executes it).
        chain.check_order()
        if index == 0:
            return self._control(chain)
        engine = self._engine
        if engine is not None:
            used = engine.submit(index, chain)
            if used >= 0:
                return used or None  # queued (0), or an inline write done
        reader, writer = chain.reader(), chain.writer()
        if writer.available_bytes() < RESP_HEADER:
            raise MalformedRequest(
                f"scsi q{index}: device-writable part of {writer.available_bytes()} bytes, "
                f"response header needs {RESP_HEADER}"
            )
        if reader.available_bytes() < REQ_HEADER:
            raise MalformedRequest(
                f"scsi q{index}: device-readable part of {reader.available_bytes()} bytes, "
                f"request header needs {REQ_HEADER}"
            )
        header = reader.read(REQ_HEADER)
        data_in = writer.split_at(RESP_HEADER)
        addr = parse_lun(header[:8])
        if addr is None or addr[0] != 0:
            return _respond(writer, S_BAD_TARGET, data_in.available_bytes())
        cdb = header[19:]
        try:
            result = self.target.execute(addr[1], cdb)
        except CheckCondition as cc:
            return _check(writer, cc.sense, data_in.available_bytes())
        if isinstance(result, BlockIO):
            unit = self.target.unit(addr[1])
            assert unit is not None
            return self._block_io(
                index, chain, unit=unit, io=result, reader=reader, writer=writer, data_in=data_in
            )
        room = data_in.available_bytes()
        if len(result) > room:
            # §5.6.6.1: the allocation length asks for more than the data-in holds.
            return _respond(writer, S_OVERRUN, 0)
        data_in.write(result)
        return _respond(writer, S_OK, room - len(result)) + len(result)

    def guest_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
        """A malformed request: FAILURE in the response header when it fits, else 0."""
        super().guest_fault(index, chain, err)
        return _answer_fault(index, chain, lambda writer: _respond(writer, S_FAILURE, 0))

    def host_fault(self, index: int, chain: DescriptorChain, err: Exception) -> int:
        """A host error outside the I/O itself: CHECK CONDITION, HARDWARE ERROR."""
        super().host_fault(index, chain, err)
        return _answer_fault(index, chain, lambda writer: _check(writer, Sense(0x4, 0x44, 0x00), 0))

    # -- block I/O on a worker ---------------------------------------------------------
    def _block_io(
        self,
        index: int,
        chain: DescriptorChain,
        *,
        unit: LogicalUnit,
        io: BlockIO,
        reader: Reader,
        writer: Writer,
        data_in: Writer,
        start: int = -1,
    ) -> int | None:
        image = self.images[unit.lun]
        room_in = data_in.available_bytes()
        have_out = reader.available_bytes()
        nbytes = io.blocks << BLOCK_SHIFT
        op = io.op
        if op == "read" and nbytes > room_in:
            return _respond(writer, S_OVERRUN, 0)
        if op == "write" and nbytes > have_out:
            return _respond(writer, S_OVERRUN, 0)
        if op in ("unmap", "write_same") and io.data_out > have_out:
            return _respond(writer, S_OVERRUN, 0)
        if op == "unmap":
            try:
                ranges = unit.unmap_ranges(reader.read(io.data_out))
            except CheckCondition as cc:
                return _check(writer, cc.sense, room_in)
            if not ranges:
                return _respond(writer, S_OK, room_in)
        else:
            ranges = [(io.lba, io.blocks)]
        if nbytes == 0 and op in ("read", "write"):
            return _respond(writer, S_OK, room_in if op == "read" else 0)
        fd = image.fd
        offset = io.lba << BLOCK_SHIFT
        # Residual (§5.6.6.1): the data buffers' size minus what was transferred.
        room = room_in + have_out
        moved = nbytes if op == "write" else io.data_out
        # Page-cache hits are served here, on the loop thread, without blocking:
        # preadv2/pwritev2 with RWF_NOWAIT move what they can without waiting for
        # the disk (EAGAIN ends them short) and a worker does the rest.  A worker
        # hop costs a thread wake-up and a loop wake-up per request, more than the
        # copy itself when the data is cached (benches/scsi_table.py, engine A/B).
        # ``start`` >= 0: the engine moved that much already; the rest on a worker.
        if start < 0:
            start = 0
            if op == "read" or (op == "write" and not io.fua):
                start = self._nowait(image, data_in if op == "read" else reader, nbytes, offset, op == "read")
        if start == nbytes and op in ("read", "write"):
            if op == "read":
                return _respond(writer, S_OK, room - nbytes) + nbytes
            return _respond(writer, S_OK, room - moved)

        def job() -> int:
            try:
                if op == "read":
                    done = start
                    while done < nbytes:
                        n = data_in.read_from_fd(fd, nbytes - done, offset + done)
                        if n <= 0:
                            # The image shrank under us: never read past its end.
                            return _check(writer, UNRECOVERED_READ_ERROR, room - done) + done
                        done += n
                    return _respond(writer, S_OK, room - done) + done
                if op == "write":
                    done = start
                    while done < nbytes:
                        n = reader.write_to_fd(fd, nbytes - done, offset + done)
                        if n <= 0:
                            raise OSError(errno.EIO, f"pwritev at {offset + done} wrote nothing")
                        done += n
                    if io.fua:
                        image.sync()  # SBC-4 §5.40: FUA, on stable storage before GOOD
                elif op == "sync":
                    image.sync()
                elif op == "write_same":
                    block = bytes(BLOCK_SIZE) if io.ndob else reader.read(BLOCK_SIZE)
                    if block.count(0) == BLOCK_SIZE:
                        image.discard(offset, nbytes, unmap=io.unmap)
                    else:
                        image.fill(offset, nbytes, block)
                else:  # unmap
                    for lba, blocks in ranges:
                        image.discard(lba << BLOCK_SHIFT, blocks << BLOCK_SHIFT, unmap=True)
                return _respond(writer, S_OK, room - moved)
            except OSError as e:
                log.error("scsi LUN %d: %s at lba %d failed: %s", unit.lun, op, io.lba, e)
                return _check(writer, _io_sense(e, op != "read"), room)

        self.run_in_worker(index, chain, job)
        return None

    def _nowait(
        self, image: DiskImage, stream: Reader | Writer, nbytes: int, offset: int, reading: bool
    ) -> int:
        """Move what the page cache allows without blocking; returns the bytes moved.

        A file system that refuses RWF_NOWAIT for a direction (EOPNOTSUPP) is not
        asked again for it; any other error is left for the worker to meet and report.
        """
        if not (image.nowait_read if reading else image.nowait_write):
            return 0
        try:
            if reading:
                assert isinstance(stream, Writer)
                return stream.read_from_fd(image.fd, nbytes, offset, os.RWF_NOWAIT)
            assert isinstance(stream, Reader)
            return stream.write_to_fd(image.fd, nbytes, offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                if reading:
                    image.nowait_read = False
                else:
                    image.nowait_write = False
            return 0

    # -- control queue -------------------------------------------------------------------
    def _control(self, chain: DescriptorChain) -> int | None:
        reader, writer = chain.reader(), chain.writer()
        if reader.available_bytes() < 4:
            raise MalformedRequest(f"scsi control: request of {reader.available_bytes()} bytes, type needs 4")
        req = reader.read(min(reader.available_bytes(), _TMF_REQ.size))
        (kind,) = struct.unpack_from("<I", req)
        if kind == T_TMF:
            if len(req) < _TMF_REQ.size or writer.available_bytes() < 1:
                raise MalformedRequest(
                    f"scsi control: TMF of {len(req)} bytes / response {writer.available_bytes()}, "
                    f"needs {_TMF_REQ.size} / 1"
                )
            _, subtype, lun, _tag = _TMF_REQ.unpack(req)
            addr = parse_lun(lun)
            if addr is None or addr[0] != 0:
                return writer.write(bytes([S_BAD_TARGET]))
            if subtype == TMF_CLEAR_ACA:
                return writer.write(bytes([S_FUNCTION_REJECTED]))
            # Every command runs to its end once started; a TMF reports after all
            # in flight have completed, so the driver never sees one after the TMF.
            # The loop is not held meanwhile: the TMF waits, polled by a timer.
            if not self._requests_in_flight():
                return writer.write(bytes([S_FUNCTION_COMPLETE]))
            self._tmf_held.append((chain, writer, time.monotonic() + TMF_WAIT_S))
            self._arm_tmf()
            return None
        if kind in (T_AN_QUERY, T_AN_SUBSCRIBE):
            if len(req) < _AN_REQ.size or writer.available_bytes() < 5:
                raise MalformedRequest(
                    f"scsi control: AN request of {len(req)} bytes / response {writer.available_bytes()}, "
                    f"needs {_AN_REQ.size} / 5"
                )
            addr = parse_lun(req[4:12])
            response = S_OK if addr is not None and addr[0] == 0 else S_BAD_TARGET
            # No asynchronous events are supported: event_actual 0 (§5.6.6.2).
            return writer.write(struct.pack("<IB", 0, response))
        raise MalformedRequest(f"scsi control: request type {kind}")

    def _requests_in_flight(self) -> bool:
        jobs, engine = self._jobs, self._engine
        if engine is not None and engine.in_flight():
            return True
        return jobs is not None and any(jobs.in_flight(i) for i in range(2, self.num_queues))

    def _arm_tmf(self) -> None:
        if self._tmf_timer is None and self.loop is not None:
            self._tmf_timer = self.loop.call_later(TMF_POLL_S, self._on_tmf_timer)

    def _on_tmf_timer(self) -> None:
        """Answer the held TMFs once no request is in flight (or their time is up)."""
        self._tmf_timer = None
        if not self._tmf_held:
            return
        if self._requests_in_flight():
            if time.monotonic() < min(deadline for _, _, deadline in self._tmf_held):
                self._arm_tmf()
                return
            log.warning("scsi: task management answered with requests still running")
        self._answer_tmfs()

    def _answer_tmfs(self) -> None:
        held, self._tmf_held = self._tmf_held, []
        for chain, writer, _ in held:
            writer.write(bytes([S_FUNCTION_COMPLETE]))
            self.complete(0, chain.head_index, 1)

    def quiesce(self, index: int) -> None:
        """Give queue ``index`` back; on the control queue, held TMFs are answered
        first (a chain the device keeps must not be lost to the driver)."""
        engine = self._engine
        if engine is not None and self.active:
            # Requests in the kernel complete first: a chain must not be lost to
            # the driver, and guest memory must stay untouched after this.
            deadline = time.monotonic() + TMF_WAIT_S
            while engine.in_flight(index) and time.monotonic() < deadline:
                self.wait_completions(index, TMF_WAIT_S)
            # The guest RAM registered for O_DIRECT is unpinned once nothing is
            # in flight: a table that removed regions must not keep their pages.
            engine.release_fixed()
        if index == 0 and self._tmf_held and self.active:
            self._answer_tmfs()
        super().quiesce(index)

    def reset(self) -> None:
        """Cancel the TMF timer, then the framework's reset (which quiesces every queue)."""
        if self._tmf_timer is not None:
            self._tmf_timer.cancel()
            self._tmf_timer = None
        try:
            super().reset()
        finally:
            self._tmf_held = []
            if self._engine_loop is not None and self._engine is not None:
                self._engine_loop.remove_reader(self._engine.fd)
                e = self._engine
                log.info(
                    "scsi engine so far: %d reads, %d writes inline, %d requests on io_uring, %d on threads, "
                    "%d notifications within a drain, %d drains preempted after one",
                    e.inline_reads,
                    e.inline_writes,
                    e.ring_requests,
                    e.pool_requests,
                    e.early_signals,
                    e.early_preempted,
                )
            self._engine_loop = None


def _respond(writer: Writer, response: int, resid: int) -> int:
    """Write a response header with no sense; returns its size."""
    writer.write(_RESP.pack(0, resid, 0, GOOD, response, b""))
    return RESP_HEADER


def _check(writer: Writer, sense: Sense, resid: int) -> int:
    """Write CHECK CONDITION with fixed-format sense (SPC-5 §4.4.3); returns its size."""
    data = sense.fixed()
    writer.write(_RESP.pack(len(data), resid, 0, CHECK_CONDITION, S_OK, data))
    return RESP_HEADER
