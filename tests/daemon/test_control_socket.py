"""The control socket on an embedded runtime: owner-only modes, a peer of another uid
refused (by the modes, and by the peer-credential check when the modes are loosened),
the frame format and its faults, and the requests (status, tree, kill, restart)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from daemon_helpers import POLICY, poll

import erllama_py
from erllama_py.daemon import messages as m
from erllama_py.daemon.control_client import ControlError, SocketControl
from erllama_py.daemon.control_ops import Control
from erllama_py.daemon.control_server import (
    Peer,
    bind_control_socket,
    control_child_spec,
    peer_refusal,
)
from erllama_py.errors import ConfigError
from erllama_py.runtime import Runtime

NOBODY = 65534


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    root = tmp_path_factory.mktemp("control")
    # Not under pytest's folder (0700): another uid must be able to reach the socket's
    # folder once a test loosens its modes.
    top = Path(tempfile.mkdtemp(prefix="erllama-ctl-", dir="/tmp"))
    runtime = erllama_py.start({
        "cache": {"tiers": [{"kind": "ram", "quota_mb": 16}]},
        "policy": POLICY,
        "daemon": {"log_file": str(root / "log" / "x.log"),
                   "control_socket": str(top / "run" / "control.sock")},
        "models": [{"name": "stub", "backend": "stub", "n_ctx": 512, "n_batch": 64,
                    "stub": {"n_vocab": 1000}}],
    })  # fmt: skip
    runtime.attach(control_child_spec(Control(runtime), runtime.config.daemon.control_socket))
    yield runtime
    runtime.stop()
    shutil.rmtree(top)


@pytest.fixture
def path(rt: Runtime) -> Path:
    return rt.config.daemon.control_socket


@pytest.fixture
def control(path: Path) -> Iterator[SocketControl]:
    with SocketControl(path) as c:
        yield c


def test_the_socket_is_0600_in_a_0700_folder(path: Path) -> None:
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_folder_others_can_enter_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(ConfigError, match=r"daemon.control_socket: .* owner-only \(0700\)"):
        bind_control_socket(folder / "c.sock")


def test_a_live_socket_is_not_taken_over(path: Path) -> None:
    with pytest.raises(ConfigError, match="in use by another daemon"):
        bind_control_socket(path)


def _as_nobody(path: Path) -> int:
    """In a forked child running as uid nobody: 10 if connecting is denied, 20 if the daemon
    answers with a refusal, 30 if it answers anything else."""
    pid = os.fork()
    if pid == 0:  # the child: only calls already imported, then _exit
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            try:
                sock.connect(str(path))
            except PermissionError:
                code = 10
            else:
                with contextlib.suppress(OSError):  # the daemon may have hung up already
                    m.send_message(sock, m.StatusRequest())
                reply = m.recv_message(sock)
                refused = isinstance(reply, m.ErrorReply) and reply.kind == "PermissionError"
                code = 20 if refused and "is not the daemon's uid" in reply.message else 30
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_another_uid_is_refused_by_the_modes_and_by_its_credentials(path: Path) -> None:
    assert os.getuid() == 0, "this test switches to uid nobody, which needs root"
    assert _as_nobody(path) == 10
    top = path.parent.parent
    try:  # loosen the modes: the peer-credential check alone must refuse it
        top.chmod(0o711)
        path.parent.chmod(0o711)
        path.chmod(0o666)
        assert _as_nobody(path) == 20
    finally:
        path.chmod(0o600)
        path.parent.chmod(0o700)
        top.chmod(0o700)


def test_peer_refusal_names_the_uids() -> None:
    assert peer_refusal(Peer(pid=1, uid=os.getuid(), gid=0), os.getuid()) is None
    refusal = peer_refusal(Peer(pid=42, uid=1234, gid=0), 0)
    assert refusal == "peer uid 1234 (pid 42) is not the daemon's uid 0"


def test_frames_are_a_big_endian_length_and_a_msgpack_map() -> None:
    body = m.encode(m.KillRequest("model:x/worker"))
    assert msgpack.unpackb(body) == {"v": 1, "type": "kill", "name": "model:x/worker"}
    left, right = socket.socketpair()
    with left, right:
        m.send_message(left, m.KillRequest("model:x/worker"))
        assert right.recv(4) == struct.pack(">I", len(body))
        assert right.recv(len(body)) == body


def test_every_message_round_trips() -> None:
    status = m.StatusReply(
        pid=1, started_at=2.0, uptime_s=3.0, url="http://h:1", ready=True,
        models=[m.ModelSummary("a", "loaded", "idle", 0, 1, 9, "running", 2)],
        tiers=[m.TierSummary("ram", "ram", 1, 2, 3)], worker_restarts=2,
    )  # fmt: skip
    for message in (
        m.StatusRequest(), m.TreeRequest(), m.ChildRequest("x"), m.ModelsRequest(),
        m.CountersRequest(), m.RowsRequest("disk"), m.RowsRequest(), m.CacheCheckRequest(),
        m.CacheGcRequest(), m.KillRequest("x"), m.RestartRequest("x"), status,
        m.TreeReply({"id": "r"}), m.ChildReply("x", None), m.ModelsReply([]),
        m.CountersReply({"a": 1}), m.RowsReply([{"k": 1}]), m.CacheCheckReply(["bad"]),
        m.CacheGcReply(3), m.KillReply("x", "process", 5, None, 0),
        m.RestartReply("x", {"pid": 6}), m.ErrorReply("E", "why"),
    ):  # fmt: skip
        assert m.decode(m.encode(message)) == message


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xc1", "not a msgpack message"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"v": 2, "type": "status"}), "version 2 is not 1"),
        (msgpack.packb({"v": 1, "type": "format_disk"}), "unknown message type"),
        (msgpack.packb({"v": 1, "type": "kill", "nam": "x"}), "bad fields for kill"),
    ],
)
def test_a_bad_message_is_a_protocol_error(body: bytes, why: str) -> None:
    with pytest.raises(m.ProtocolError, match=why):
        m.decode(body)


def test_the_daemon_answers_a_bad_frame_with_an_error_and_hangs_up(path: Path) -> None:
    for frame in (struct.pack(">I", m.MAX_FRAME + 1), struct.pack(">I", 1) + b"\xc1"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            sock.connect(str(path))
            sock.sendall(frame)
            reply = m.recv_message(sock)
            assert isinstance(reply, m.ErrorReply) and reply.kind == "ProtocolError", reply
            assert m.recv_message(sock) is None


def test_status_tree_and_rows(control: SocketControl, rt: Runtime) -> None:
    status = control.call(m.StatusRequest(), m.StatusReply)
    assert status.pid == os.getpid() and status.ready and status.url is None
    assert [(s.name, s.status) for s in status.models] == [("stub", "loaded")]
    tree = control.call(m.TreeRequest(), m.TreeReply).tree
    assert tree["name"] == "erllama_sup"
    assert "control" in [c["id"] for c in tree["children"]]
    rt.complete("stub", list(range(1, 40)), max_tokens=2)
    rt.cache.wait_idle()
    rows = control.call(m.RowsRequest("ram"), m.RowsReply).rows
    assert rows and {r["tier"] for r in rows} == {"ram"}
    assert control.call(m.RowsRequest("disk"), m.RowsReply).rows == []
    assert control.call(m.CacheCheckRequest(), m.CacheCheckReply).problems == []


def test_kill_an_actor_and_restart_a_child(control: SocketControl, rt: Runtime) -> None:
    name = "model:stub/actor"
    before = control.call(m.ChildRequest(name), m.ChildReply).node
    assert before is not None and before["state"] == "running"
    killed = control.call(m.KillRequest(name), m.KillReply)
    assert killed.kind == "actor" and killed.restarts == before["restarts"]

    def back() -> dict[str, object] | None:
        node = control.call(m.ChildRequest(name), m.ChildReply).node
        running = node is not None and node["state"] == "running"
        return node if running and node["restarts"] == before["restarts"] + 1 else None

    node = poll(back, "the actor is restarted")
    assert node["thread"] != before["thread"]
    assert rt.complete("stub", [1, 2, 3], max_tokens=2).usage.completion_tokens == 2

    restarted = control.call(m.RestartRequest("cache_ram"), m.RestartReply).node
    assert restarted is not None and restarted["state"] == "running"


def test_refused_requests_are_one_error_each(control: SocketControl) -> None:
    with pytest.raises(ControlError, match="no child named 'nope'"):
        control.call(m.KillRequest("nope"), m.KillReply)
    with pytest.raises(ControlError, match="dynamic child"):
        control.call(m.RestartRequest("model:stub"), m.RestartReply)
    with pytest.raises(ControlError, match="root supervisor"):
        control.call(m.KillRequest("erllama_sup"), m.KillReply)
    # The connection still serves after refusals.
    assert control.call(m.StatusRequest(), m.StatusReply).ready
