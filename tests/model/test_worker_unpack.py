"""A restore and its first token in one worker call, and never a token from unchecked bytes.

`WorkerClient.unpack` with a `check` runs it (the payload's checksum) while the worker
restores and sends the worker its verdict; with `then` the worker samples the first token
in the same call, but only once the verdict says the bytes are sound. Run on a real
worker process, on the stub and on the tiny llama model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from erllama_py.cache.payload import has_checksum, payload_checksum
from erllama_py.errors import CHECKSUM_MISMATCH, CacheFormatError
from erllama_py.model.arena import Arena, ArenaSlice
from erllama_py.model.backend import Prefill
from erllama_py.model.client import WorkerClient, start_worker, wait_until_dead
from erllama_py.model.protocol import GenerateOp, SamplerSpec, WorkerSpec
from erllama_py.params import SamplingParams

PROMPT = [5, 9, 17, 3, 44, 21, 8, 2, 30, 12, 7, 19]
GREEDY = SamplerSpec(SamplingParams(temperature=0.0))


@pytest.fixture(params=["stub", "tiny"])
def client(request: pytest.FixtureRequest, tiny_model_path: Path) -> Iterator[WorkerClient]:
    if request.param == "stub":
        spec = WorkerSpec("w", backend="stub", n_ctx=256, n_batch=64, n_seq_max=4)
    else:
        spec = WorkerSpec(
            "w", model_path=str(tiny_model_path), n_ctx=512, n_batch=256, n_seq_max=4, n_threads=2
        )
    process, info = start_worker(spec)
    try:
        yield WorkerClient("w", process, info)
    finally:
        process.channel.close()
        if not wait_until_dead(process, 10.0):
            process.kill()
            process.wait(5.0)


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena(segment_bytes=64 * 1024 * 1024, max_segments=1)
    yield a
    a.close()


def _packed(client: WorkerClient, arena: Arena) -> tuple[ArenaSlice, int]:
    client.step([Prefill(0, PROMPT)])
    slot = client.pack(0, arena)
    return slot, payload_checksum(slot.view()[: slot.size])


def _check(slot: ArenaSlice, checksum: int) -> Callable[[], bool]:
    return lambda: has_checksum(slot.view()[: slot.size], checksum)


def test_a_verified_restore_samples_the_first_token_in_the_same_call(
    client: WorkerClient, arena: Arena
) -> None:
    slot, checksum = _packed(client, arena)
    (reference,) = client.step([GenerateOp(0, GREEDY)])
    assert reference is not None and reference.sampler is not None

    then = GenerateOp(1, GREEDY)
    unpacked = client.unpack(1, slot, slot.size, check=_check(slot, checksum), then=then)

    assert unpacked.verified and unpacked.n_tokens == len(PROMPT)
    assert unpacked.first is not None and unpacked.first.token == reference.token
    assert unpacked.first.sampler is not None  # created with the token, as a step would
    assert client.seq_len(1) == len(PROMPT)
    # The restored sequence decodes on as the one it came from.
    follow = client.step(
        [
            GenerateOp(0, reference.sampler, reference.token),
            GenerateOp(1, unpacked.first.sampler, unpacked.first.token),
        ]
    )
    assert follow[0] is not None and follow[1] is not None
    assert follow[0].token == follow[1].token


def test_bytes_without_their_checksum_are_cleared_and_nothing_is_sampled(
    client: WorkerClient, arena: Arena
) -> None:
    slot, checksum = _packed(client, arena)
    client.step([Prefill(1, PROMPT[:4])])  # what the sequence held before: gone either way

    then = GenerateOp(1, GREEDY)
    unpacked = client.unpack(1, slot, slot.size, check=_check(slot, checksum ^ 1), then=then)

    assert not unpacked.verified
    assert unpacked.first is None  # no token, and no sampler created for one
    assert client.seq_len(1) == 0
    # The payload itself was sound: with its checksum it restores.
    assert client.unpack(1, slot, slot.size, check=_check(slot, checksum)).n_tokens == len(PROMPT)


def test_a_check_that_raises_counts_as_failed_and_the_worker_stays_in_step(
    client: WorkerClient, arena: Arena
) -> None:
    slot, _checksum = _packed(client, arena)

    def broken() -> bool:
        raise BufferError("the view went away")

    unpacked = client.unpack(1, slot, slot.size, check=broken, then=GenerateOp(1, GREEDY))

    assert not unpacked.verified and unpacked.first is None
    assert client.seq_len(1) == 0
    assert client.seq_len(0) == len(PROMPT)  # the next calls are answered in order


def test_a_changed_payload_that_no_longer_parses_is_reported_as_a_checksum_mismatch(
    client: WorkerClient, arena: Arena
) -> None:
    slot, checksum = _packed(client, arena)
    view = slot.view()
    view[0] ^= 0xFF  # the header's magic: the restore itself refuses it
    del view

    then = GenerateOp(1, GREEDY)
    with pytest.raises(CacheFormatError) as refused:
        client.unpack(1, slot, slot.size, check=_check(slot, checksum), then=then)
    assert refused.value.reason == CHECKSUM_MISMATCH
    assert client.seq_len(1) == 0
    with pytest.raises(CacheFormatError) as unchecked:  # without a checksum: the parse error
        client.unpack(1, slot, slot.size)
    assert unchecked.value.reason != CHECKSUM_MISMATCH
