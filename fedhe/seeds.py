"""Seeds derived from the job's seed: one independent stream per (round, party, purpose).

`numpy.random.SeedSequence` mixes the job seed (its entropy) with a spawn key through a hash,
so distinct keys give unrelated streams however large the round or party numbers grow (a
hand-combined ``seed·1000 + round·100 + party`` collides from 100 parties or 10 rounds on).
The same inputs give the same seed on every node: the HE run and its plaintext twin draw the
same batches and train alike.
"""

from __future__ import annotations

import numpy as np

from fedhe.config import ConfigError

# What a seed is for: part of the spawn key, so one round's training and batch sampling of one
# party draw unrelated streams. Append new purposes; never renumber (runs would change).
TRAIN = 0  # local training: torch's shuffling and initialisation
BATCH = 1  # the mini-batch of a gradient round


def derive_seed(job_seed: int, *, round_: int, party: int, purpose: int) -> int:
    """A 64-bit seed for `purpose` in round `round_` of party `party` (all ≥ 0)."""
    key = (int(job_seed), int(round_), int(party), int(purpose))
    if min(key) < 0:
        raise ConfigError(
            f"seeds derive from non-negative integers, got seed {job_seed}, round {round_}, "
            f"party {party}, purpose {purpose}: set the job's seed to 0 or more."
        )
    sequence = np.random.SeedSequence(key[0], spawn_key=key[1:])
    return int(sequence.generate_state(1, dtype=np.uint64)[0])
