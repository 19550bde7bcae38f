"""HE-FedAvg without Flower: party → aggregator → key holder in one process."""

import dataclasses

import numpy as np
import pytest
import torch

from fedhe.crypto import PublicContext, encrypt, generate_keys
from fedhe.crypto.tensor import COMPLEX
from fedhe.errors import PolicyError, ProtocolError, ShapeError, ValueRangeError
from fedhe.keyholder import KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.learning import ModelSpec, build_model
from fedhe.tasks import aggregate

N_PARTIES = 5
BOUND = 1e4


def _job(tmp_path, layout, *, encrypted=True, min_parties=3, rounds=2):
    keyholder = KeyHolder(tmp_path / "kh")
    declaration = aggregate.declare(
        f"job-{'he' if encrypted else 'plain'}",
        outputs={aggregate.OUTPUT: (rounds, layout)},
        min_parties=min_parties,
        encrypted=encrypted,
    )
    public = keyholder.declare_job(declaration)
    return keyholder, declaration.job_id, (PublicContext.from_bytes(public) if public else None)


def _updates(rng, shapes, n=N_PARTIES):
    return {f"party-{i}": [rng.normal(size=s) for s in shapes] for i in range(n)}


def _request(parties, contributions, total, round_=0):
    """The aggregator's request for its sum, with the tags of the parties it summed (each
    party tags its own contribution for (output, round); a plaintext twin carries none)."""
    summed = {p: contributions[p] for p in total.contributors}
    request = parties.request(aggregate.OUTPUT, summed, round_, total=total.tensor)
    assert set(request.tags) == (set(total.contributors) if parties.encrypted else set())
    return request


def _run(keyholder, job_id, context, layout, updates, samples):
    parties = TaggedParties(keyholder, job_id, sorted(updates))  # registered (encrypted job)
    contributions = {
        p: aggregate.party_contribution(u, samples[p], layout, context, sum_bound=BOUND)
        for p, u in updates.items()
    }
    total = aggregate.aggregator_sum(contributions, layout, context, sum_bound=BOUND, min_parties=3)
    decrypted = aggregate.keyholder_decrypt_sum(keyholder, _request(parties, contributions, total))
    return aggregate.average_update(decrypted, layout), total


def _fedavg(layout, updates, samples, parties):
    n = sum(samples[p] for p in parties)
    return sum(samples[p] * layout.flatten(updates[p]) for p in parties) / n


def test_encrypted_fedavg_matches_the_plaintext_twin(tmp_path, rng):
    shapes = [(300, 20), (20,), (7000,)]  # 13,020 values: four ciphertexts per party
    layout = aggregate.Layout.of([np.zeros(s) for s in shapes])
    updates = _updates(rng, shapes)
    samples = {p: int(rng.integers(20, 200)) for p in updates}
    he = _run(*_job(tmp_path / "he", layout), layout, updates, samples)
    plain = _run(*_job(tmp_path / "plain", layout, encrypted=False), layout, updates, samples)
    (he_avg, he_n), (plain_avg, plain_n) = he[0], plain[0]
    expected = _fedavg(layout, updates, samples, list(updates))
    assert plain_n == sum(samples.values())
    np.testing.assert_allclose(layout.flatten(plain_avg), expected, rtol=1e-12)
    # Flooding noise (σ = 2^-15 at scale 2^35) and CKKS noise, divided by Σn ≥ 100.
    np.testing.assert_allclose(layout.flatten(he_avg), expected, rtol=0, atol=1e-5)
    assert abs(he_n - plain_n) < 0.01


def test_torch_state_dict_is_accepted(tmp_path):
    model = build_model(ModelSpec(30, 2, (8,)), seed=0)
    state = model.state_dict()
    layout = aggregate.Layout.of(state)
    assert layout.names == tuple(state) and layout.n_params == sum(
        v.numel() for v in state.values()
    )
    keyholder, job_id, context = _job(tmp_path, layout)
    updates = {
        f"p{i}": {k: torch.full_like(v, 0.01 * i) for k, v in state.items()} for i in range(3)
    }
    (avg, _), _ = _run(keyholder, job_id, context, layout, updates, {p: 10 for p in updates})
    for name in state:
        np.testing.assert_allclose(avg[name], 0.01, atol=1e-5)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda good, other_ctx: b"\x00garbage",
        lambda good, other_ctx: good[: len(good) // 3],
        lambda good, other_ctx: encrypt(other_ctx, np.ones(len_of(good))).to_bytes(),
    ],
    ids=["garbage", "truncated", "foreign-context"],
)
def test_a_bad_contribution_is_excluded_and_the_round_goes_on(tmp_path, rng, corrupt):
    shapes = [(50,)]
    layout = aggregate.Layout.of([np.zeros(50)])
    keyholder, job_id, context = _job(tmp_path, layout)
    updates = _updates(rng, shapes)
    parties = TaggedParties(keyholder, job_id, sorted(updates))
    samples = {p: 10 + i for i, p in enumerate(updates)}
    contributions = {
        p: aggregate.party_contribution(u, samples[p], layout, context, sum_bound=BOUND)
        for p, u in updates.items()
    }
    other = generate_keys(context.params).public()
    contributions["party-2"] = corrupt(contributions["party-2"], other)
    total = aggregate.aggregator_sum(contributions, layout, context, sum_bound=BOUND, min_parties=3)
    assert "party-2" in total.rejected and "party-2" not in total.contributors
    # The key holder verifies the sum of the accepted contributions against their tags only.
    request = _request(parties, contributions, total)
    assert "party-2" not in request.tags and "party-2" not in request.contributors
    decrypted = aggregate.keyholder_decrypt_sum(keyholder, request)
    avg, n = aggregate.average_update(decrypted, layout)
    good = [p for p in updates if p != "party-2"]
    assert round(n) == sum(samples[p] for p in good)
    np.testing.assert_allclose(
        layout.flatten(avg), _fedavg(layout, updates, samples, good), atol=1e-5
    )


def len_of(_good: bytes) -> int:
    return 52  # 50 update values + n + count


def test_too_few_valid_contributions_stop_the_round(tmp_path, rng):
    layout = aggregate.Layout.of([np.zeros(10)])
    _, _, context = _job(tmp_path, layout)
    contributions = {
        f"p{i}": aggregate.party_contribution(
            [rng.normal(size=10)], 5, layout, context, sum_bound=BOUND
        )
        for i in range(2)
    }
    contributions["p2"] = b"junk"
    with pytest.raises(ProtocolError, match=r"only 2 valid contributions.*min_parties=3"):
        aggregate.aggregator_sum(contributions, layout, context, sum_bound=BOUND, min_parties=3)


def test_key_holder_refuses_a_sum_the_aggregator_inflates(tmp_path, rng):
    """Claiming more contributors than summed is caught: by the tags when the extra party's
    contribution is missing, by the count slot when a registered party's valid tag covers a
    contribution that does not count itself (Enc(0))."""
    layout = aggregate.Layout.of([np.zeros(10)])
    keyholder, job_id, context = _job(tmp_path, layout, min_parties=2)
    parties = TaggedParties(keyholder, job_id, ("p0", "p1", "p9"))
    contributions = {
        f"p{i}": aggregate.party_contribution(
            [rng.normal(size=10)], 5, layout, context, sum_bound=BOUND
        )
        for i in range(2)
    }
    total = aggregate.aggregator_sum(contributions, layout, context, sum_bound=BOUND, min_parties=2)
    honest = _request(parties, contributions, total)
    claimed = dataclasses.replace(honest, contributors=("p0", "p1", "p9"))
    with pytest.raises(PolicyError, match="carries no tag from p9"):
        aggregate.keyholder_decrypt_sum(keyholder, claimed)
    # p9 tags an encryption of zeros (no count of its own) and the aggregator adds it.
    contributions["p9"] = encrypt(
        context, np.zeros(layout.size), sum_bound=BOUND, packing=COMPLEX
    ).to_bytes()
    inflated = aggregate.aggregator_sum(
        contributions, layout, context, sum_bound=BOUND, min_parties=2
    )
    assert inflated.contributors == ("p0", "p1", "p9")
    with pytest.raises(PolicyError, match="count slot does not hold the 3 contributions"):
        aggregate.keyholder_decrypt_sum(keyholder, _request(parties, contributions, inflated))
    assert [e["decision"] for e in keyholder.audit.entries()[-2:]] == ["refused", "refused"]
    # The honest sum over the two parties is still released (refusals release nothing).
    released = aggregate.keyholder_decrypt_sum(keyholder, honest)
    assert round(released[layout.count_index]) == 2


def test_party_refuses_bad_updates(tmp_path):
    layout = aggregate.Layout.of([np.zeros(3)])
    _, _, context = _job(tmp_path, layout)
    with pytest.raises(ValueRangeError, match="NaN"):
        aggregate.party_contribution(
            [np.array([1.0, np.nan, 0])], 5, layout, context, sum_bound=BOUND
        )
    with pytest.raises(ValueRangeError, match="exceeds the bound"):
        aggregate.party_contribution([np.full(3, 1e4)], 5, layout, context, sum_bound=BOUND)
    with pytest.raises(ShapeError, match=r"shape \(4,\)"):
        aggregate.party_contribution([np.zeros(4)], 5, layout, context, sum_bound=BOUND)
    with pytest.raises(ValueRangeError, match="positive integer"):
        aggregate.party_contribution([np.zeros(3)], 0, layout, context, sum_bound=BOUND)


def test_contribution_travels_at_the_level_its_bound_needs(tmp_path, rng):
    layout = aggregate.Layout.of([np.zeros(10)])
    _, _, context = _job(tmp_path, layout)
    big = context.params.max_abs_at(1) * 4
    data = aggregate.party_contribution([rng.normal(size=10)], 5, layout, context, sum_bound=big)
    with pytest.raises(ProtocolError):  # the aggregator expects level 1 for a small bound
        aggregate.aggregator_sum(
            {"a": data, "b": data, "c": data}, layout, context, sum_bound=BOUND, min_parties=1
        )
    total = aggregate.aggregator_sum({"a": data}, layout, context, sum_bound=big, min_parties=1)
    assert total.contributors == ("a",)
