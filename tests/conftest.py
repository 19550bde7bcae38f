"""Shared fixtures: one key pair per test session (keygen is the slow part of CKKS tests)."""

from __future__ import annotations

import numpy as np
import pytest

from fedhe.crypto import AGGREGATION_PARAMS, CKKSParams, generate_keys

# A small parameter set (N=4096, one data prime) keeps the crypto tests fast.
SMALL_PARAMS = CKKSParams(4096, (54, 55), 32)


@pytest.fixture(scope="session")
def secret():
    return generate_keys(SMALL_PARAMS)


@pytest.fixture(scope="session")
def public(secret):
    return secret.public()


@pytest.fixture(scope="session")
def agg_secret():
    return generate_keys(AGGREGATION_PARAMS)


@pytest.fixture(scope="session")
def agg_public(agg_secret):
    return agg_secret.public()


@pytest.fixture(autouse=True)
def keyholder_state_in_tmp(tmp_path, monkeypatch):
    """Simulated key holders keep their secret keys under the test's own temporary folder."""
    monkeypatch.setenv("FEDHE_STATE_ROOT", str(tmp_path / "keyholder-state"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
