"""A party clips its model update to ±clip per coordinate: the aggregator's bound on the
encrypted sum (clip·Σnᵢ, `aggregator/fedavg.py`) holds only because of it."""

from __future__ import annotations

import numpy as np
import pytest

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.crypto import load_tensor
from fedhe.crypto.tensor import PLAIN_KIND
from fedhe.tasks import aggregate
from tests.framed import tensor_frame
from tests.inprocess import InProcessGrid

CLIP = 1.0  # the smallest clip a job accepts
# One round of full-batch steps this large moves about half the weights of the breast-cancer
# model by more than CLIP (measured: 13-19 of 31 per party), so the clip must bite.
LR = 5.0


@pytest.fixture(scope="module")
def clipped_round(tmp_path_factory):
    """One FedAvg round, encrypted and its plaintext twin: the grid's log, and every update
    sum the aggregator averaged (the encrypted job's as decrypted)."""
    out = tmp_path_factory.mktemp("clip")
    config = JobConfig.of(
        parties=3, min_parties=3, rounds=1, clip=CLIP, lr=LR, out=str(out), plaintext_twin=True
    )
    grid = InProcessGrid(config.num_nodes)
    averaged: list[tuple[np.ndarray, aggregate.Layout]] = []
    average_update = aggregate.average_update

    def recording(decrypted_sum: np.ndarray, layout: aggregate.Layout):
        averaged.append((np.array(decrypted_sum), layout))
        return average_update(decrypted_sum, layout)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "keyholder-state"))
        patch.setattr(aggregate, "average_update", recording)
        run_job(grid, config)
    return grid, averaged


def _twin_updates(grid: InProcessGrid) -> list[tuple[np.ndarray, float]]:
    """Each party's Δwᵢ and nᵢ, as its plaintext-twin contribution nᵢ·Δwᵢ ‖ nᵢ ‖ 1 reached the
    aggregator."""
    updates = []
    for direction, message in grid.log:
        if direction != "received" or message.metadata.message_type != protocol.TRAIN:
            continue
        contribution = protocol.payload_of(message.content)["contribution"]
        header, _ = tensor_frame(contribution)
        if header["kind"] == PLAIN_KIND:
            values = load_tensor(contribution, None).values
            n = values[-2]
            updates.append((values[:-2] / n, n))
    return updates


def test_each_party_sends_its_update_clipped_to_clip(clipped_round):
    grid, _ = clipped_round
    updates = _twin_updates(grid)
    assert len(updates) == 3
    for delta, _ in updates:
        assert np.max(np.abs(delta)) <= CLIP * (1 + 1e-12), np.max(np.abs(delta))
        assert np.sum(np.isclose(np.abs(delta), CLIP, rtol=1e-12)) >= 5  # the clip did bite


def test_the_decrypted_sum_is_the_sum_of_clipped_updates(clipped_round):
    grid, averaged = clipped_round
    updates = _twin_updates(grid)
    n_params = len(updates[0][0])
    expected = sum(n * delta for delta, n in updates) / sum(n for _, n in updates)
    assert np.sum(np.isclose(np.abs(expected), CLIP, rtol=1e-9)) >= 1  # all parties at the clip
    sums = [s for s, layout in averaged if layout.n_params == n_params]
    assert len(sums) == 2  # the encrypted job's decrypted sum and the twin's
    for decrypted in sums:
        mean_update = decrypted[:n_params] / decrypted[n_params]
        assert np.max(np.abs(mean_update)) <= CLIP + 1e-4
        np.testing.assert_allclose(mean_update, expected, atol=1e-4)
