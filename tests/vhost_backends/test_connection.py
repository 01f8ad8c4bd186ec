"""Framing, fd passing and errno mapping of vhost_backends.connection."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from vhost_backends.connection import Connection
from vhost_backends.protocol import messages as m
from vhost_backends.protocol.codes import FrontendReq
from vhost_backends.protocol.errors import (
    Disconnected,
    IncorrectFds,
    InvalidMessage,
    OversizedMessage,
    PartialMessage,
)


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = Connection(a, timeout=1.0)
    frontend = Connection(b, timeout=1.0)
    yield backend, frontend
    backend.close()
    frontend.close()


def test_message_with_fd_roundtrip(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    efd = os.eventfd(0)
    try:
        frontend.send(FrontendReq.SET_VRING_KICK, m.pack_u64(1), [efd])
    finally:
        os.close(efd)
    msg = backend.recv_message()
    assert msg.request == FrontendReq.SET_VRING_KICK and len(msg.fds) == 1
    fd = msg.take_fd(0)
    msg.close_fds()  # nothing left to close
    os.eventfd_write(fd, 1)
    os.close(fd)


def test_wrong_fd_count_closes_every_fd(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(2)]
    # GET_FEATURES takes no fd.
    frontend.send(FrontendReq.GET_FEATURES, b"", fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(IncorrectFds, match="GET_FEATURES carries 2 fds, expected 0"):
        backend.recv_message()
    assert open_fds() == before


def test_missing_fd_refused(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    frontend.send(FrontendReq.SET_VRING_CALL, m.pack_u64(0))
    with pytest.raises(IncorrectFds):
        backend.recv_message()


def test_too_many_fds_truncated_and_closed(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(40)]
    frontend.send(FrontendReq.SET_MEM_TABLE, m.MEMORY_TABLE_HEADER.pack(40, 0) + bytes(40 * 32), fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(IncorrectFds, match="truncated"):
        backend.recv_message()
    assert open_fds() == before


def test_eof_between_messages_is_disconnected(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    frontend.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(Disconnected):
        backend.recv_message()


def test_truncated_header_is_partial(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    frontend.send_raw(m.pack_header(FrontendReq.GET_FEATURES, 0)[:7])
    frontend.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(PartialMessage, match="7 of 12"):
        backend.recv_message()


def test_disconnect_mid_payload_is_partial_and_closes_fds(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    before = open_fds()
    efd = os.eventfd(0)
    frontend.send_raw(m.pack_header(FrontendReq.SET_VRING_KICK, 8) + b"\0\0\0", [efd])
    os.close(efd)
    frontend.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(PartialMessage, match="3 of 8 payload"):
        backend.recv_message()
    assert open_fds() == before


def test_oversized_payload_refused_before_reading(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    frontend.send_raw(struct.pack("<III", FrontendReq.SET_MEM_TABLE, 1, 1 << 20))
    with pytest.raises(OversizedMessage):
        backend.recv_message()


def test_invalid_header_refused(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    frontend.send_raw(struct.pack("<III", 77, 1, 0))
    with pytest.raises(InvalidMessage, match="unknown request code 77"):
        backend.recv_message()


def test_stalled_payload_times_out_as_partial() -> None:
    a, b = socket.socketpair()
    backend = Connection(a, timeout=0.05)
    try:
        b.sendall(m.pack_header(FrontendReq.SET_FEATURES, 8) + b"\0")
        with pytest.raises(PartialMessage, match="timed out"):
            backend.recv_message()
    finally:
        backend.close()
        b.close()


def test_send_to_closed_peer_is_disconnected(pair: tuple[Connection, Connection]) -> None:
    backend, frontend = pair
    frontend.close()
    with pytest.raises(Disconnected):
        for _ in range(3):
            backend.send(FrontendReq.GET_FEATURES, m.pack_u64(0), reply=True)
