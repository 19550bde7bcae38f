"""Encrypted MLP inference: querier → aggregator → key holder → querier, in one process."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedhe.crypto import MAX_LOG_Q_128, KeyRequest, PublicContext, decrypt, generate_keys
from fedhe.crypto.circuit import Circuit
from fedhe.errors import (
    ChannelError,
    InvalidCiphertextError,
    ParameterError,
    ShapeError,
    ValueRangeError,
)
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.learning import ModelSpec, build_model, get_weights
from fedhe.tasks import aggregate, check_declaration, keyholder_release, mlp
from tests.conftest import SMALL_PARAMS


def _weights(sizes, seed=0):
    rng = np.random.default_rng(seed)
    weights = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        weights[f"{2 * i}.weight"] = rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)
        weights[f"{2 * i}.bias"] = rng.normal(size=n_out) * 0.1
    return weights


@pytest.fixture(scope="module")
def digits_net():
    model = mlp.HEModel.from_weights(_weights([64, 32, 10]), "relu-poly")
    params = model.params()
    layout = model.single_layout(params.slots)
    secret = generate_keys(params, KeyRequest(relin=True, rotations=layout.steps))
    return model, secret, secret.public(), layout


def test_batched_logits_match_the_plaintext_network(digits_net):
    model, secret, public, _ = digits_net
    X = np.random.default_rng(1).normal(size=(300, 64))
    inputs = mlp.querier_encrypt_batch(public.encryption_only(), X)
    mask, rho = mlp.querier_mask(public, (10, inputs.shape[1]))
    out = mlp.aggregator_batched(model, public, inputs.to_bytes(), mask.to_bytes())
    logits = mlp.querier_unmask_batched(decrypt(secret, out), rho, len(X))
    np.testing.assert_allclose(logits, model.logits(X), atol=1e-2)
    assert np.mean(mlp.predict(logits) == mlp.predict(model.logits(X))) >= 0.99


def test_single_sample_logits_match_the_plaintext_network(digits_net):
    model, secret, public, layout = digits_net
    x = np.random.default_rng(2).normal(size=64)
    inputs = mlp.querier_encrypt_single(public.encryption_only(), x, layout)
    mask, rho = mlp.querier_mask(public, (public.params.slots,))
    out = mlp.aggregator_single(model, public, inputs.to_bytes(), mask.to_bytes())
    logits = mlp.querier_unmask_single(decrypt(secret, out), rho, 10)
    np.testing.assert_allclose(logits, model.logits(x[None])[0], atol=1e-2)
    assert layout.steps == (1, 2, 4, 8, 16, 32, 128, 256, 512, 1024, 2048)


def test_the_keyholder_sees_only_masked_logits(tmp_path, digits_net):
    """The key holder decrypts logits + ρ and seals them to the querier: the aggregator relays
    bytes it cannot read, and only the querier (who holds ρ) gets the logits."""
    model, _, _, layout = digits_net
    keyholder = KeyHolder(tmp_path, declaration_check=check_declaration)
    # The training job registered the parties; the inference job names it as its parent.
    training = aggregate.declare(
        "train",
        outputs={aggregate.OUTPUT: (3, aggregate.Layout.of(_weights([64, 32, 10])))},
        min_parties=2,
        params=SMALL_PARAMS,
        task=mlp.TASK,
    )
    keyholder.declare_job(training)
    parties = TaggedParties(keyholder, "train", ("party-0", "party-1"))
    declaration = aggregate.declare(
        "inf",
        outputs={mlp.OUTPUT: (2, None)},
        min_parties=2,
        params=model.params(),
        task=mlp.INFERENCE_TASK,
        meta={"querier": "party-0", "parent": "train"},
    )
    keys = KeyRequest(relin=True, rotations=layout.steps)
    public = PublicContext.from_bytes(keyholder.declare_job(declaration, keys))
    X = np.random.default_rng(3).normal(size=(5, 64))
    inputs = mlp.querier_encrypt_batch(public.encryption_only(), X)
    mask, rho = mlp.querier_mask(public.encryption_only(), (10, inputs.shape[1]))
    out = mlp.aggregator_batched(model, public, inputs.to_bytes(), mask.to_bytes())
    request = DecryptionRequest("inf", mlp.OUTPUT, ("party-0", "party-1"), out.to_bytes())
    seen = keyholder.decrypt_unverified(request).values  # what the key holder decrypts
    assert np.min(np.abs(seen[:, :5].T - model.logits(X))) > 1.0  # ρ covers every logit
    released = keyholder_release(keyholder, request)  # the same ciphertext: replayed
    assert set(released) == {"sealed"}
    opened = parties.open("inf", mlp.OUTPUT, 0, "party-0", released["sealed"])
    np.testing.assert_array_equal(opened, seen)
    np.testing.assert_allclose(
        mlp.querier_unmask_batched(opened, rho, 5), model.logits(X), atol=1e-2
    )
    with pytest.raises(ChannelError):  # sealed to the querier alone
        parties.open("inf", mlp.OUTPUT, 0, "party-1", released["sealed"])


def test_torch_training_model_and_encrypted_model_compute_the_same_function():
    for name in ("square", "relu-poly", "silu-poly"):
        torch_model = build_model(ModelSpec(8, 3, (5,), name), seed=0)
        he_model = mlp.HEModel.from_weights(get_weights(torch_model), name)
        X = np.random.default_rng(4).normal(size=(20, 8))
        with torch.no_grad():
            expected = torch_model(torch.as_tensor(X)).numpy()
        np.testing.assert_allclose(he_model.logits(X), expected, rtol=1e-10, atol=1e-12)


def test_polynomial_activations_approximate_their_targets_on_the_interval():
    x = np.linspace(-mlp.POLY_INTERVAL, mlp.POLY_INTERVAL, 101)
    assert np.max(np.abs(mlp.ACTIVATIONS["relu-poly"](x) - np.maximum(x, 0))) < 0.5
    assert np.max(np.abs(mlp.ACTIVATIONS["silu-poly"](x) - x / (1 + np.exp(-x)))) < 0.5
    assert mlp.ACTIVATIONS["square"](x) == pytest.approx(x**2)
    with pytest.raises(ParameterError, match="cannot be evaluated under encryption"):
        mlp.activation("relu")


def test_parameters_follow_the_depth_and_stay_128_bit_secure():
    shallow = mlp.inference_params(mlp.depth_of(1))
    assert shallow.poly_modulus_degree == 8192 and shallow.depth == 3
    assert mlp.inference_params(mlp.depth_of(2)).poly_modulus_degree == 16384
    for depth in range(1, 26):
        params = mlp.inference_params(depth)
        assert params.depth == depth
        assert sum(params.coeff_mod_bit_sizes) <= MAX_LOG_Q_128[params.poly_modulus_degree]
    with pytest.raises(ParameterError, match="does not fit any 128-bit"):
        mlp.inference_params(mlp.depth_of(20))


def test_two_hidden_layers_run_batched_but_not_single():
    model = mlp.HEModel.from_weights(_weights([6, 5, 4, 3], seed=5), "square")
    with pytest.raises(ParameterError, match="one hidden layer"):
        model.single_layout(4096)
    secret = generate_keys(model.params(), KeyRequest(relin=True))
    public = secret.public()
    X = np.random.default_rng(6).normal(size=(7, 6))
    inputs = mlp.querier_encrypt_batch(public, X)
    mask, rho = mlp.querier_mask(public, (3, inputs.shape[1]))
    out = mlp.aggregator_batched(model, public, inputs.to_bytes(), mask.to_bytes())
    logits = mlp.querier_unmask_batched(decrypt(secret, out), rho, 7)
    np.testing.assert_allclose(logits, model.logits(X), atol=1e-2)


def test_bad_inputs_are_refused_before_encryption_or_evaluation(digits_net):
    model, _, public, _ = digits_net
    with pytest.raises(ShapeError, match=r"\(n, 64\)"):
        mlp.check_inputs(np.zeros((2, 63)), 64)
    with pytest.raises(ValueRangeError, match="NaN"):
        mlp.check_inputs(np.full((1, 64), np.nan), 64)
    with pytest.raises(ValueRangeError, match="standardize"):
        mlp.check_inputs(np.full((1, 64), 1e4), 64)
    X = np.zeros((3, 64))
    low = mlp.querier_mask(public, (64, public.params.slots))[0]  # right shape, wrong level
    mask = mlp.querier_mask(public, (10, public.params.slots))[0]
    with pytest.raises(InvalidCiphertextError, match="primes"):
        mlp.aggregator_batched(model, public, low.to_bytes(), mask.to_bytes())
    inputs = mlp.querier_encrypt_batch(public, X)
    wrong_mask = mlp.querier_mask(public, (9, public.params.slots))[0]
    with pytest.raises(ShapeError):
        mlp.aggregator_batched(model, public, inputs.to_bytes(), wrong_mask.to_bytes())


def test_only_the_aggregator_context_carries_evaluation_keys(digits_net):
    _, _, public, layout = digits_net
    querier = PublicContext.from_bytes(public.encryption_only().to_bytes())
    assert not querier.raw.has_relin_keys() and querier.keys.rotations == ()
    assert querier.fingerprint == public.fingerprint
    assert len(public.encryption_only().to_bytes()) * 10 < len(public.to_bytes())
    assert not PublicContext.from_bytes(public.to_bytes()).raw.has_secret_key()
    cipher = Circuit(querier).ciphers(mlp.querier_encrypt_single(querier, np.zeros(64), layout))[0]
    with pytest.raises(ParameterError, match="rotation keys"):
        Circuit(querier).rotate_sum(cipher, (1,))
