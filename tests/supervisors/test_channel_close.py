"""Closing a channel from another thread while a call is inside it (a supervisor handling a
child's exit while a client waits for its reply)."""

from __future__ import annotations

import socket
import threading

import pytest

from supervisors._channel import Channel

WAIT_S = 10.0  # generous: only a hang (the old behaviour) would reach it


def test_a_close_from_another_thread_ends_a_blocked_receive_and_later_calls_fail() -> None:
    ours, peer = socket.socketpair()
    channel = Channel(ours)
    outcome: list[BaseException] = []

    def receive() -> None:
        try:
            channel.recv()
        except (EOFError, OSError) as exc:
            outcome.append(exc)

    reader = threading.Thread(target=receive)
    reader.start()
    channel.close()  # the peer is still open: only the shutdown can end the read
    reader.join(WAIT_S)
    try:
        assert not reader.is_alive(), "the blocked receive outlived the close"
        assert len(outcome) == 1
        # The descriptors are closed now; a call after the close must not reach a socket
        # that reused their numbers.
        successor_ours, successor_peer = socket.socketpair()
        successor_peer.sendall(b"\x00\x00\x00\x04junk")
        with pytest.raises(OSError):
            channel.recv()
        with pytest.raises(OSError):
            channel.send("hello")
        assert successor_ours.recv(8, socket.MSG_PEEK) == b"\x00\x00\x00\x04junk"
        successor_ours.close()
        successor_peer.close()
    finally:
        peer.close()
