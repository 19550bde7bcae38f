"""MLP inference on encrypted inputs: querier, aggregator and key-holder steps.

Training is HE-FedAvg (`fedhe.tasks.aggregate`) of a torch MLP whose hidden activations are
degree-2 polynomials (`ACTIVATIONS`): square, or least-squares fits of ReLU/SiLU on a stated
interval. After training the aggregator holds the released model in the clear and evaluates it
on inputs it never sees:

1. The querier encrypts its input, and Enc(ρ), a uniform mask over every output slot.
2. The aggregator evaluates every layer on the ciphertext with plaintext weights, adds Enc(ρ).
3. The key holder decrypts (output `mlp_logits`) logits + ρ: only the querier can remove ρ,
   so the key holder and the aggregator see masked values only.

Two packings:

- **batched** (throughput): feature-major, ciphertext j holds feature j of up to `slots`
  samples; a layer is Σⱼ W[o, j]·Enc(xⱼ) per output (ciphertext × scalar, one rescale per
  output), no rotation at all.
- **single** (latency, one hidden layer): the querier replicates its input in blocks of
  B = 2·d' slots (d' = d rounded up to a power of two), one block per hidden unit; the first
  layer is one product with the row-major weights and log₂ d' rotations that sum each block;
  the second layer one product and log₂ H' rotations that sum across blocks. Only the job's
  rotation steps get keys.

Each polynomial activation c₀ + c₁h + c₂h² costs one level: the aggregator computes
z = h² + (c₁/c₂)·h and folds c₂ and c₀ into the next layer (W' = c₂W, b' = b + c₀·W·1).
Parameters follow the depth (one level per linear layer and per activation) and must pass the
128-bit check: a network too deep for every allowed N is refused before anything is encrypted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhe.crypto import (
    MAX_LOG_Q_128,
    CKKSParams,
    PublicContext,
    Tensor,
    encrypt_for_compute,
    load_tensor,
)
from fedhe.crypto.circuit import Cipher, Circuit
from fedhe.crypto.randomness import secure_random
from fedhe.crypto.validation import check_range
from fedhe.errors import ParameterError, ShapeError
from fedhe.keyholder import DecryptionRequest, KeyHolder

TASK = "mlp"
INFERENCE_TASK = "mlp-inference"
OUTPUT = "mlp_logits"

FIRST_PRIME_BITS = 60
SCALE_CHOICES = (40, 36, 34, 32, 30)  # preferred first: more precision
INPUT_BOUND = 2.0**8  # |standardized input| the querier may encrypt


@dataclass(frozen=True)
class Activation:
    """c₀ + c₁x + c₂x², fitted on [-interval, interval] (square: exact everywhere)."""

    name: str
    coefficients: tuple[float, float, float]
    interval: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c0, c1, c2 = self.coefficients
        return c0 + c1 * x + c2 * x * x


def _fit(function, interval: float) -> tuple[float, float, float]:
    x = np.linspace(-interval, interval, 2001)
    c2, c1, c0 = np.polyfit(x, function(x), 2)
    return float(c0), float(c1), float(c2)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


POLY_INTERVAL = 4.0
ACTIVATIONS: dict[str, Activation] = {
    "square": Activation("square", (0.0, 0.0, 1.0), math.inf),
    "relu-poly": Activation("relu-poly", _fit(lambda x: np.maximum(x, 0.0), POLY_INTERVAL), 4.0),
    "silu-poly": Activation("silu-poly", _fit(_silu, POLY_INTERVAL), POLY_INTERVAL),
}


def activation(name: str) -> Activation:
    found = ACTIVATIONS.get(name)
    if found is None:
        raise ParameterError(
            f"activation {name!r} cannot be evaluated under encryption; use one of "
            f"{sorted(ACTIVATIONS)}."
        )
    return found


def depth_of(n_hidden_layers: int) -> int:
    """Levels an inference takes: one per linear layer and one per activation."""
    return 2 * n_hidden_layers + 1


def inference_params(depth: int) -> CKKSParams:
    """The smallest N (then the largest scale) whose chain of `depth` primes passes the 128-bit
    check, with a 60-bit first prime so outputs keep 2^(60 − scale − 2) of headroom."""
    for n in sorted(MAX_LOG_Q_128):
        for scale in SCALE_CHOICES:
            primes = (FIRST_PRIME_BITS, *(scale,) * depth, FIRST_PRIME_BITS)
            if sum(primes) <= MAX_LOG_Q_128[n]:
                return CKKSParams(n, primes, scale)
    raise ParameterError(
        f"a network {depth} levels deep does not fit any 128-bit CKKS parameter set (N up to "
        f"{max(MAX_LOG_Q_128)}); use fewer hidden layers."
    )


def mask_bound(params: CKKSParams) -> float:
    """The querier's mask: a quarter of what the output level holds."""
    return params.max_abs_at(1) / 4


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HEModel:
    """A trained MLP (plaintext weights) compiled for encrypted inputs."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (W, b) per linear layer, W: (out, in)
    activation: Activation

    @classmethod
    def from_weights(cls, weights: Mapping[str, np.ndarray], activation_name: str) -> HEModel:
        """From a torch Sequential's state dict ("0.weight", "0.bias", "2.weight", …)."""
        indices = sorted({int(k.split(".")[0]) for k in weights})
        layers = tuple(
            (np.asarray(weights[f"{i}.weight"], float), np.asarray(weights[f"{i}.bias"], float))
            for i in indices
        )
        return cls(layers, activation(activation_name))

    @property
    def n_features(self) -> int:
        return self.layers[0][0].shape[1]

    @property
    def n_outputs(self) -> int:
        return self.layers[-1][0].shape[0]

    @property
    def depth(self) -> int:
        return depth_of(len(self.layers) - 1)

    def params(self) -> CKKSParams:
        return inference_params(self.depth)

    def logits(self, X: np.ndarray) -> np.ndarray:
        """The plaintext twin: the same polynomial network in numpy."""
        h = np.asarray(X, dtype=float)
        for index, (W, b) in enumerate(self.layers):
            h = h @ W.T + b
            if index < len(self.layers) - 1:
                h = self.activation(h)
        return h

    def out_of_interval(self, X: np.ndarray) -> float:
        """Share of hidden pre-activations outside the activation's fitted interval."""
        h, outside, total = np.asarray(X, dtype=float), 0, 0
        for W, b in self.layers[:-1]:
            h = h @ W.T + b
            outside += int(np.sum(np.abs(h) > self.activation.interval))
            total += h.size
            h = self.activation(h)
        return outside / max(total, 1)

    def folded(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Layers with each activation's c₂ and c₀ folded into the next layer."""
        c0, _, c2 = self.activation.coefficients
        out = [self.layers[0]]
        for W, b in self.layers[1:]:
            out.append((c2 * W, b + c0 * W.sum(axis=1)))
        return out

    # -- batched: feature-major ---------------------------------------------------------------

    def evaluate_batched(self, circuit: Circuit, features: Sequence[Cipher]) -> list[Cipher]:
        """Encrypted logits, one ciphertext per output, from one ciphertext per feature."""
        if len(features) != self.n_features:
            raise ShapeError(f"the model takes {self.n_features} features, got {len(features)}.")
        scale = circuit.context.params.scale
        inputs = list(features)
        layers = self.folded()
        for index, (W, b) in enumerate(layers):
            outputs = [
                circuit.add_plain(
                    circuit.multiply_sum(list(zip(inputs, W[o], strict=True)), scale), b[o]
                )
                for o in range(W.shape[0])
            ]
            if index == len(layers) - 1:
                return outputs
            inputs = [self._activate(circuit, h) for h in outputs]
        raise AssertionError("unreachable")

    def _activate(self, circuit: Circuit, h: Cipher) -> Cipher:
        _, c1, c2 = self.activation.coefficients
        squared = circuit.square(h)
        if c1 == 0:
            return squared
        return circuit.add(squared, circuit.multiply_sum([(h, c1 / c2)], squared.scale))

    # -- single sample: replicated blocks, rotations ----------------------------------------

    def single_layout(self, slots: int) -> SingleLayout:
        if len(self.layers) != 2:
            raise ParameterError(
                "the single-sample path evaluates one hidden layer; use the batched path for "
                f"{len(self.layers) - 1} hidden layers."
            )
        return SingleLayout.plan(self.n_features, self.layers[0][0].shape[0], self.n_outputs, slots)

    def evaluate_single(self, circuit: Circuit, x: Cipher) -> Cipher:
        """Encrypted logits in slots 0 … n_outputs − 1 from the querier's replicated input."""
        layout = self.single_layout(circuit.context.params.slots)
        scale = circuit.context.params.scale
        (W1, b1), (W2, b2) = self.folded()
        h = circuit.multiply_sum([(x, layout.first_weights(W1))], scale)
        h = circuit.rotate_sum(h, layout.block_steps)
        h = circuit.add_plain(h, layout.block_values(b1))
        z = self._activate(circuit, h)
        y = circuit.multiply_sum([(z, layout.second_weights(W2))], scale)
        y = circuit.rotate_sum(y, layout.across_steps)
        head = np.zeros(self.n_outputs)
        head[:] = b2
        return circuit.add_plain(y, head)


@dataclass(frozen=True)
class SingleLayout:
    """Block layout of the single-sample path: H' blocks of B = 2·d' slots."""

    d: int
    d_pad: int
    hidden: int
    hidden_pad: int
    outputs: int
    slots: int

    @classmethod
    def plan(cls, d: int, hidden: int, outputs: int, slots: int) -> SingleLayout:
        d_pad, hidden_pad = _next_pow2(d), _next_pow2(hidden)
        if 2 * d_pad * hidden_pad > slots or outputs > d_pad:
            raise ParameterError(
                f"a {d}-{hidden}-{outputs} network needs {2 * d_pad * hidden_pad} slots in the "
                f"single-sample layout, more than {slots} (or more outputs than {d_pad}); use "
                "the batched path."
            )
        return cls(d, d_pad, hidden, hidden_pad, outputs, slots)

    @property
    def block(self) -> int:
        return 2 * self.d_pad

    @property
    def block_steps(self) -> tuple[int, ...]:
        return tuple(2**i for i in range(int(math.log2(self.d_pad))))

    @property
    def across_steps(self) -> tuple[int, ...]:
        return tuple(self.block * 2**i for i in range(int(math.log2(self.hidden_pad))))

    @property
    def steps(self) -> tuple[int, ...]:
        return self.block_steps + self.across_steps

    def input_values(self, x: np.ndarray) -> np.ndarray:
        """The querier's replicated input: x (zero-padded to d') twice per block."""
        padded = np.zeros(self.d_pad)
        padded[: self.d] = x
        return np.tile(np.concatenate([padded, padded]), self.hidden_pad)

    def first_weights(self, W1: np.ndarray) -> np.ndarray:
        rows = np.zeros((self.hidden_pad, self.d_pad))
        rows[: self.hidden, : self.d] = W1
        return np.concatenate([rows, rows], axis=1).ravel()

    def block_values(self, values: np.ndarray) -> np.ndarray:
        """values[k] in every slot of block k (zero in padding blocks)."""
        padded = np.zeros(self.hidden_pad)
        padded[: self.hidden] = values
        return np.repeat(padded, self.block)

    def second_weights(self, W2: np.ndarray) -> np.ndarray:
        placed = np.zeros((self.hidden_pad, self.block))
        placed[: self.hidden, : self.outputs] = W2.T
        return placed.ravel()


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# -- querier -----------------------------------------------------------------------------------


def check_inputs(X: np.ndarray, n_features: int) -> np.ndarray:
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise ShapeError(f"inputs must have shape (n, {n_features}), got {X.shape}.")
    return check_range(
        X,
        INPUT_BOUND,
        what="input",
        fix="standardize the features as the model was trained",
        nonfinite_fix="fill or drop it before asking",
    )


def batch_width(n_samples: int, slots: int) -> int:
    return max(1, math.ceil(n_samples / slots)) * slots


def querier_encrypt_batch(context: PublicContext, X: np.ndarray) -> Tensor:
    """Feature-major: (d, width) with the samples along each row, zero-padded to whole
    ciphertexts; at the top level (the network's whole depth ahead)."""
    width = batch_width(len(X), context.params.slots)
    rows = np.zeros((X.shape[1], width))
    rows[:, : len(X)] = X.T
    return encrypt_for_compute(context, rows)


def querier_encrypt_single(context: PublicContext, x: np.ndarray, layout: SingleLayout) -> Tensor:
    values = np.zeros(context.params.slots)
    replicated = layout.input_values(x)
    values[: replicated.size] = replicated
    return encrypt_for_compute(context, values)


def querier_mask(context: PublicContext, shape: tuple[int, ...]) -> tuple[Tensor, np.ndarray]:
    """Enc(ρ) at the output level, ρ uniform over ± `mask_bound`, and ρ to keep."""
    bound = mask_bound(context.params)
    rho = secure_random().uniform(-bound, bound, shape)
    return encrypt_for_compute(context, rho, multiplications=0), rho


# -- aggregator ------------------------------------------------------------------------------


def aggregator_batched(
    model: HEModel, context: PublicContext, inputs: bytes, mask: bytes
) -> Tensor:
    """Validate the querier's batch, evaluate, add its mask: Enc(logits + ρ), (outputs, width)."""
    circuit = Circuit(context)
    slots = context.params.slots
    features = load_tensor(inputs, context, level=context.params.depth + 1)
    if len(features.shape) != 2 or features.shape[0] != model.n_features:
        raise ShapeError(f"expected ({model.n_features}, width) inputs, got {features.shape}.")
    width = features.shape[1]
    if width % slots:
        raise ShapeError(f"batch width {width} is not a multiple of {slots} slots.")
    rho = load_tensor(mask, context, shape=(model.n_outputs, width), level=1)
    per_chunk = width // slots
    ciphers = circuit.ciphers(features)
    outputs: list[list[Cipher]] = [[] for _ in range(model.n_outputs)]
    for chunk in range(per_chunk):
        column = [ciphers[j * per_chunk + chunk] for j in range(model.n_features)]
        for o, logit in enumerate(model.evaluate_batched(circuit, column)):
            outputs[o].append(logit)
    logits = circuit.tensor([c for row in outputs for c in row], (model.n_outputs, width))
    return logits + rho


def aggregator_single(model: HEModel, context: PublicContext, inputs: bytes, mask: bytes) -> Tensor:
    """Enc(logits + ρ) of one sample: slots 0 … n_outputs − 1 hold its logits (+ ρ)."""
    circuit = Circuit(context)
    slots = context.params.slots
    x = load_tensor(inputs, context, shape=(slots,), level=context.params.depth + 1)
    rho = load_tensor(mask, context, shape=(slots,), level=1)
    (cipher,) = circuit.ciphers(x)
    logits = circuit.tensor([model.evaluate_single(circuit, cipher)], (slots,))
    return logits + rho


def querier_unmask_batched(released: np.ndarray, rho: np.ndarray, n_samples: int) -> np.ndarray:
    """(n_samples, outputs) logits from the released (outputs, width) values."""
    return (np.asarray(released) - rho)[:, :n_samples].T


def querier_unmask_single(released: np.ndarray, rho: np.ndarray, n_outputs: int) -> np.ndarray:
    return (np.asarray(released) - rho)[:n_outputs]


def keyholder_logits(keyholder: KeyHolder, request: DecryptionRequest) -> dict[str, bytes]:
    """Decrypt the masked logits (logits + the querier's ρ) and seal them to the querier: the
    aggregator, which evaluated the model and could have sent any ciphertext, reads nothing."""
    values = keyholder.decrypt_unverified(request).values
    return keyholder.release_to_querier(request, values)


def predict(logits: np.ndarray) -> np.ndarray:
    logits = np.atleast_2d(logits)
    return (logits[:, 0] > 0).astype(int) if logits.shape[1] == 1 else logits.argmax(axis=1)
