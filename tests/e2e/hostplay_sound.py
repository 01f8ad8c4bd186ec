"""Run inside a guest that plays the host (``inhost python /tmp/hostplay_sound.py``).

The ALSA backend on a real ALSA card: snd-aloop, whose two ends are cross-wired
(what is played on ``hw:Loopback,0,0`` is recorded on ``hw:Loopback,1,0`` and the
other way round).  vhost-device-sound runs with ``--backend alsa`` on
``hw:Loopback,0,0`` (``VHD_SOUND_ALSA_DEVICE``), driven by our front-end:

1. the device plays 1 s of a 1 kHz sine; this script records the other end with
   pyalsaaudio: the tone's peak is at 1 kHz;
2. this script plays a 1 kHz sine into the other end; the device captures 1 s:
   the peak is at 1 kHz.

Prints ``check <name> ok`` per check and ``sound-alsa-ok``; exits non-zero with
the reason otherwise.
"""

from __future__ import annotations

import os
import struct
import sys
import threading

import alsaaudio
import device_drivers  # tests/integration, on PYTHONPATH in the guest
from device_drivers import VhostUserDeviceDriver
from test_sound_daemon import FRAME, PERIOD, RATE, from_first_sound, peak_frequency, sine

from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

device_drivers.TIMEOUT = 120.0
OTHER_END = "hw:Loopback,1,0"
S_OK = 0x8000


def control(drv: VhostUserDeviceDriver, request: bytes) -> int:
    _head, (out,) = drv.add_request(0, readable=[request], writable=[4])
    drv.kick(0)
    return int(struct.unpack("<I", drv.read(out, 4))[0])


def start(drv: VhostUserDeviceDriver, sid: int) -> None:
    params = struct.pack("<IIIIIBBBx", 0x0101, sid, 4 * PERIOD, PERIOD, 0, 2, 5, 7)  # S16 48 kHz
    for req in (params, struct.pack("<II", 0x0102, sid), struct.pack("<II", 0x0104, sid)):
        status = control(drv, req)
        if status != S_OK:
            raise SystemExit(f"control {req[:4].hex()} on stream {sid}: status {status:#x}")


def stream(drv: VhostUserDeviceDriver, index: int, sid: int, periods: int, data: bytes | None) -> bytes:
    """Up to 4 messages in flight, buffers reused; what capture got, in order."""
    fe, mock = drv.fe, drv.rings[index].mock
    slots = [(mock.alloc(4), mock.alloc(PERIOD), mock.alloc(8)) for _ in range(4)]
    for hdr, _, _ in slots:
        fe.memory.write(hdr, struct.pack("<I", sid))
    free, inflight, got = list(range(4)), {}, {}
    sent = done = 0
    while done < periods:
        while free and sent < periods:
            slot = free.pop()
            hdr, buf, status = slots[slot]
            flag = 0
            if data is not None:
                fe.memory.write(buf, data[sent * PERIOD : (sent + 1) * PERIOD])
            else:
                flag = VIRTQ_DESC_F_WRITE
            descs = [
                RawDesc(hdr, 4, 0, 0),
                RawDesc(buf, PERIOD, flag, 0),
                RawDesc(status, 8, VIRTQ_DESC_F_WRITE, 0),
            ]
            inflight[mock.add_chain(descs)] = (slot, sent)
            sent += 1
        fe.kick(index)
        for head, _ in fe.wait_used(index, 1, 120.0):
            slot, seq = inflight.pop(head)
            _, buf, status = slots[slot]
            code = struct.unpack("<I", fe.memory.read(status, 4))[0]
            if code != S_OK:
                raise SystemExit(f"I/O message {seq}: status {code:#x}")
            if data is None:
                got[seq] = fe.memory.read(buf, PERIOD)
            free.append(slot)
            done += 1
    return b"".join(got[i] for i in sorted(got))


def pcm(kind: int) -> alsaaudio.PCM:
    """The loopback's other end, 48 kHz stereo S16, 4 periods of 10 ms."""
    return alsaaudio.PCM(
        kind,
        alsaaudio.PCM_NORMAL,
        rate=RATE,
        channels=2,
        format=alsaaudio.PCM_FORMAT_S16_LE,
        periodsize=PERIOD // FRAME,
        periods=4,
        device=OTHER_END,
    )


def main() -> int:
    os.environ["VHD_SOUND_ALSA_DEVICE"] = "hw:Loopback,0,0"
    drv = VhostUserDeviceDriver(
        ["vhost-device-sound", "--backend", "alsa"], "/tmp/snd.sock", socket_flag="--socket", num_queues=4
    )
    try:
        # 1. The device plays; the other end records.
        rec = pcm(alsaaudio.PCM_CAPTURE)
        recorded: list[bytes] = []
        stop = threading.Event()

        def record() -> None:
            while not stop.is_set():
                n, data = rec.read()
                if n > 0:
                    recorded.append(data)

        t = threading.Thread(target=record, daemon=True)
        t.start()
        start(drv, 0)
        stream(drv, 2, 0, 100, sine(100 * PERIOD // FRAME))
        stop.set()
        t.join(10)
        rec.close()
        loud = from_first_sound(b"".join(recorded))
        peak = peak_frequency(loud[: RATE * FRAME // 2]) if len(loud) >= RATE * FRAME // 5 else 0
        if peak != 1000:
            print(f"playback: {len(loud)} bytes of tone recorded, peak {peak} Hz")
            return 1
        print("check alsa-playback-peak ok")
        # 2. The other end plays; the device records.
        play = pcm(alsaaudio.PCM_PLAYBACK)
        stop.clear()
        feed = sine(RATE * 3)

        def player() -> None:
            pos = 0
            while not stop.is_set() and pos < len(feed):
                play.write(feed[pos : pos + PERIOD])
                pos += PERIOD

        t = threading.Thread(target=player, daemon=True)
        t.start()
        start(drv, 1)
        captured = stream(drv, 3, 1, 100, None)
        stop.set()
        t.join(10)
        play.close()
        loud = from_first_sound(captured)
        peak = peak_frequency(loud[: RATE * FRAME // 2]) if len(loud) >= RATE * FRAME // 5 else 0
        if peak != 1000:
            print(f"capture: peak {peak} Hz")
            return 1
        print("check alsa-capture-peak ok")
    finally:
        drv.close()
    print(f"sound-alsa-ok python={sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
