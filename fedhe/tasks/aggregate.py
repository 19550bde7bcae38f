"""Secure aggregation (HE-FedAvg), party → aggregator → key holder, without Flower.

Each party sends one tensor ``Enc(n_i·Δw_i ‖ n_i ‖ 1)``: its sample-weighted update, its sample
count, and a 1 that counts contributors. The aggregator sums whatever arrived and validated;
the key holder decrypts only that sum, and only if the count slot matches the contributors the
aggregator names and they are at least `min_parties`. The aggregator then divides by Σn_i.
With `context=None` the same steps run in the clear: the plaintext twin.

Packing: COMPLEX (two values per slot, CKKS precision, ~2^-25 of the bound) or QUANTIZED (four
per slot in integer lanes, `lanes_for`: half the bytes and encryption time, each value rounded
to a step of about 2^-17 of the bound; the sample count and the contributor count stay exact).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedhe.crypto import (
    AGGREGATION_PARAMS,
    CKKSParams,
    PlainTensor,
    PublicContext,
    Tensor,
    check_values,
    load_tensor,
)
from fedhe.crypto import encrypt as encrypt_tensor
from fedhe.crypto.lanes import Lanes
from fedhe.crypto.tensor import COMPLEX, QUANTIZED
from fedhe.errors import FedHEError, ParameterError, ProtocolError, ShapeError, ValueRangeError
from fedhe.keyholder import DecryptionRequest, JobDeclaration, KeyHolder, OutputSpec

TASK = "aggregate"
OUTPUT = "update_sum"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the arrays in one update, flattened in order, then n and a count."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, Any] | Sequence[Any]) -> Layout:
        named = _named_arrays(arrays)
        return cls(tuple(named), tuple(tuple(a.shape) for a in named.values()))

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return self.n_params + 2

    @property
    def weight_index(self) -> int:
        return self.n_params

    @property
    def count_index(self) -> int:
        return self.n_params + 1

    def flatten(self, arrays: Mapping[str, Any] | Sequence[Any]) -> np.ndarray:
        named = _named_arrays(arrays)
        if tuple(named) != self.names:
            raise ShapeError(
                f"update has arrays {list(named)}, the job expects {list(self.names)}."
            )
        for name, shape in zip(self.names, self.shapes, strict=True):
            if tuple(named[name].shape) != shape:
                raise ShapeError(
                    f"array {name!r} has shape {tuple(named[name].shape)}, the job expects {shape}."
                )
        return np.concatenate([named[n].ravel() for n in self.names]) if self.names else np.zeros(0)

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Layout:
        return cls(tuple(data["names"]), tuple(tuple(int(x) for x in s) for s in data["shapes"]))


def declare(
    job_id: str,
    *,
    outputs: Mapping[str, tuple[int, Layout | int | None]],
    min_parties: int,
    encrypted: bool = True,
    params: CKKSParams = AGGREGATION_PARAMS,
    task: str = TASK,
    meta: Mapping[str, Any] | None = None,
) -> JobDeclaration:
    """The job as the key holder must know it: each output kind, its budget and its layout.

    A FedAvg run declares ``{OUTPUT: (rounds, model_layout)}``; other sums (feature moments
    for standardization, say) are further output kinds with their own budget. An int instead
    of a layout declares a plain tensor of that size, with no sample-count slots, None a
    tensor of any size. `task` names the job kind whose rules the key holder applies
    (`fedhe.tasks.check_declaration`); `meta` adds task settings the key holder needs.
    """
    return JobDeclaration(
        job_id=job_id,
        task=task,
        outputs={kind: _output_spec(budget, layout) for kind, (budget, layout) in outputs.items()},
        min_parties=min_parties,
        params=params if encrypted else None,
        meta={
            "layouts": {
                kind: layout.to_dict()
                for kind, (_, layout) in outputs.items()
                if isinstance(layout, Layout)
            },
            **(meta or {}),
        },
    )


def _output_spec(budget: int, layout: Layout | int | None) -> OutputSpec:
    if isinstance(layout, Layout):
        return OutputSpec(budget=budget, count_index=layout.count_index, size=layout.size)
    return OutputSpec(budget=budget, size=None if layout is None else int(layout))


# -- party --------------------------------------------------------------------------------------


def party_contribution(
    update: Mapping[str, Any] | Sequence[Any],
    n_samples: int,
    layout: Layout,
    context: PublicContext | None,
    *,
    sum_bound: float,
    n_terms: int = 1,
    min_scale_bits: int | None = None,
    packing: str = COMPLEX,
    parties: int | None = None,
) -> bytes:
    """Encrypt ``n_i·Δw_i ‖ n_i ‖ 1`` (or keep it plain for the twin) as bytes for the aggregator.

    `update` is a torch `state_dict`, a mapping of arrays, or a list of numpy arrays.
    `sum_bound` bounds every coordinate of the sum over all parties; it fixes the ciphertext
    level (the fewer primes, the fewer bytes), and every party must use the same. With
    `n_terms` > 1 each party checks its own share against `sum_bound / n_terms`; with 1 the
    caller guarantees the sum (e.g. |Δw| clipped to c and sum_bound = c·Σn_i).
    `min_scale_bits` asks for more precision (aggregator and parties must agree on it too).
    QUANTIZED `packing` needs `parties`, how many contributions the sum may hold (`lanes_for`).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 1:
        raise ValueRangeError(f"n_samples must be a positive integer, got {n_samples!r}.")
    vector = np.concatenate([layout.flatten(update) * n_samples, [float(n_samples), 1.0]])
    check_values(vector, sum_bound / max(n_terms, 1))  # both twins refuse the same input
    if context is None:
        return PlainTensor(vector).to_bytes()
    return encrypt_tensor(
        context,
        vector,
        sum_bound=sum_bound,
        n_terms=n_terms,
        min_scale_bits=min_scale_bits,
        packing=packing,
        lanes=_lanes(packing, layout, context, sum_bound, parties),
        precompute=True,  # a party encrypts one contribution per round: Enc(0)s made ahead
    ).to_bytes()


def lanes_for(layout: Layout, params: CKKSParams, *, sum_bound: float, parties: int) -> Lanes:
    """Quantized lanes for a sum of up to `parties` contributions: Σ nᵢ·Δwᵢ and Σ nᵢ share the
    sum bound (integers stay exact while its step is ≤ 1); the contributor count gets its own."""
    return Lanes.plan(
        params.coeff_mod_bit_sizes[0],
        [(layout.count_index, sum_bound), (layout.size, float(parties))],
        parties,
    )


def quantization_error_bound(
    layout: Layout, params: CKKSParams, *, sum_bound: float, parties: int, total_samples: float
) -> float:
    """Largest error QUANTIZED packing adds to one coordinate of the averaged update
    Σnᵢ·Δwᵢ / Σnᵢ: half a step per party (the CKKS noise itself is rounded away)."""
    lanes = lanes_for(layout, params, sum_bound=sum_bound, parties=parties)
    return parties * math.ldexp(0.5, lanes.steps[0][1]) / total_samples


# Worst-case rounding per coordinate of the averaged update, per round, under which `auto`
# quantizes: it grows with the number of parties (half a step each), so large federations of
# small parties keep complex packing's precision.
QUANTIZATION_TOLERANCE = 1e-3
AUTO = "auto"


def choose_packing(
    requested: str,
    layout: Layout,
    params: CKKSParams,
    *,
    sum_bound: float,
    parties: int,
    total_samples: float,
) -> str:
    """QUANTIZED or COMPLEX for the update sums: `requested`, or for AUTO quantized while its
    rounding stays within QUANTIZATION_TOLERANCE."""
    if requested != AUTO:
        return requested
    try:
        bound = quantization_error_bound(
            layout, params, sum_bound=sum_bound, parties=parties, total_samples=total_samples
        )
    except ParameterError:  # too many parties for lanes at all
        return COMPLEX
    return QUANTIZED if bound <= QUANTIZATION_TOLERANCE else COMPLEX


def _lanes(
    packing: str,
    layout: Layout,
    context: PublicContext | None,
    sum_bound: float,
    parties: int | None,
) -> Lanes | None:
    if packing != QUANTIZED or context is None:
        return None
    if parties is None:
        raise ValueRangeError("quantized packing needs the number of parties the sum may hold.")
    return lanes_for(layout, context.params, sum_bound=sum_bound, parties=parties)


# -- aggregator ---------------------------------------------------------------------------------


@dataclass
class AggregateSum:
    """The sum over exactly the parties in `contributors`, as bytes for the key holder."""

    tensor: bytes
    contributors: tuple[str, ...]
    rejected: dict[str, str] = field(default_factory=dict)


def aggregator_sum(
    contributions: Mapping[str, bytes],
    layout: Layout,
    context: PublicContext | None,
    *,
    sum_bound: float,
    min_parties: int,
    min_scale_bits: int | None = None,
    packing: str = COMPLEX,
    parties: int | None = None,
) -> AggregateSum:
    """Validate each contribution, drop the bad ones (logged), and sum the rest homomorphically.

    A contribution must have the layout's size, the `packing` asked for, and the level and scale
    `sum_bound` implies (QUANTIZED: the lanes `sum_bound` and `parties` imply).
    """
    lanes = _lanes(packing, layout, context, sum_bound, parties)
    total, accepted, rejected = sum_valid(
        contributions,
        lambda data: load_tensor(
            data,
            context,
            shape=(layout.size,),
            sum_bound=sum_bound,
            min_scale_bits=min_scale_bits,
            packing=packing,
            lanes=lanes,
        ),
        min_parties=min_parties,
    )
    return AggregateSum(total.to_bytes(), accepted, rejected)


def sum_valid(
    contributions: Mapping[str, bytes],
    load: Callable[[bytes], Tensor],
    *,
    min_parties: int,
) -> tuple[Tensor, tuple[str, ...], dict[str, str]]:
    """Load every contribution with `load`, exclude (and log) the ones that fail, sum the rest.

    Raises ProtocolError when fewer than `min_parties` remain; returns the sum, the parties it
    covers and the rejected parties with the reason.
    """
    accepted, rejected = {}, {}
    for party, data in sorted(contributions.items()):
        try:
            accepted[party] = load(data)
        except FedHEError as err:
            rejected[party] = str(err)
            log.warning("party %s excluded from the sum: %s", party, err)
    if len(accepted) < min_parties:
        raise ProtocolError(
            f"only {len(accepted)} valid contributions ({sorted(accepted)}), fewer than "
            f"min_parties={min_parties}; rejected: {rejected or 'none'}."
        )
    tensors = list(accepted.values())
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total, tuple(accepted), rejected


def average_update(
    decrypted_sum: np.ndarray, layout: Layout
) -> tuple[dict[str, np.ndarray], float]:
    """Divide the decrypted Σ n_i·Δw_i by Σ n_i: the FedAvg update, and Σ n_i."""
    total_samples = float(decrypted_sum[layout.weight_index])
    if not total_samples >= 0.5:
        raise ProtocolError(f"decrypted sample count {total_samples:.3f} is not positive.")
    return layout.unflatten(decrypted_sum[: layout.n_params] / total_samples), total_samples


# -- key holder ---------------------------------------------------------------------------------


def request_decryption(
    job_id: str, aggregate: AggregateSum, output: str = OUTPUT
) -> DecryptionRequest:
    return DecryptionRequest(job_id, output, aggregate.contributors, aggregate.tensor)


def keyholder_decrypt_sum(keyholder: KeyHolder, request: DecryptionRequest) -> np.ndarray:
    """Decrypt a sum, only if it is the declared output over enough parties and its tags prove
    it is the sum of what they contributed."""
    return keyholder.decrypt_sum(request).values


def _named_arrays(arrays: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
    items = (
        arrays.items()
        if isinstance(arrays, Mapping)
        else ((str(i), a) for i, a in enumerate(arrays))
    )
    return {str(name): _to_numpy(value) for name, value in items}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)
