"""MLP inference on encrypted inputs (`fedhe.tasks.mlp`) against TenSEAL's CKKSVector.mm and
plaintext, in process (no Flower): one sample and one full batch through querier, aggregator
and key holder, against the bars (aggregator ≤ 100 ms per sample, ≥ 1,000 samples/s, accuracy
within 1 point). Methods: simulations/README.md.
Run: python simulations/bench_mlp.py [--quick] [--activation square]"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
import numpy as np
import tenseal as ts
import torch
from _bench import Timings, summarize, target, timed
from rich.console import Console
from torch import nn

from fedhe import learning
from fedhe.crypto import KeyRequest, PublicContext
from fedhe.crypto import load_tensor as load
from fedhe.crypto.circuit import Circuit
from fedhe.data.datasets import load_builtin
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.tasks import aggregate, check_declaration, mlp

DEFAULTS = {"repeats": (20, 3), "batch_repeats": (3, 1), "epochs": (40, 5)}  # full, --quick
HIDDEN = 32
SINGLE_BAR_S = 0.100  # aggregator compute per sample
BATCH_BAR = 1_000.0  # samples per second, aggregator compute of one full batch
ACCURACY_BAR = 0.01  # encrypted accuracy within one point of plaintext
MAX_LR_HALVINGS = 6
PARTIES = ("party-0", "party-1")  # the training job's parties; party-0 asks
QUERIER = PARTIES[0]
TRAINING_JOB, INFERENCE_JOB = "bench-mlp-train", "bench-mlp-inference"
KEYHOLDER = {"declaration_check": check_declaration}  # default flooding, as deployed


@dataclass(frozen=True)
class Data:
    X_train: np.ndarray  # standardized with the train moments
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Setup:
    """The trained model compiled for encryption, the key holder and the parties' keys."""

    model: mlp.HEModel
    net: nn.Module
    layout: mlp.SingleLayout
    keyholder: KeyHolder  # holds the inference job's secret key
    parties: TaggedParties  # registered with the training job; the querier opens with these
    public: PublicContext  # the aggregator's: relinearization and rotation keys
    querier: PublicContext  # encryption only
    rounds: Counter[str] = field(default_factory=Counter)  # next round label per output

    def release(self, response: bytes, t: Timings) -> np.ndarray:
        """Key holder → querier: the next release of the masked logits, sealed to the querier
        (timed as `keyholder_s`), opened by the querier (`querier_open_s`)."""
        round_ = self.rounds[mlp.OUTPUT]
        self.rounds[mlp.OUTPUT] += 1
        request = DecryptionRequest(INFERENCE_JOB, mlp.OUTPUT, PARTIES, response, round_)
        with timed(t, "keyholder_s"):
            released = mlp.keyholder_logits(self.keyholder, request)
        t["released_bytes"] = sum(len(blob) for blob in released.values())
        with timed(t, "querier_open_s"):
            opened = self.parties.released(
                released, mlp.OUTPUT, round_, QUERIER, job_id=INFERENCE_JOB
            )
        return opened


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench.command_line(__doc__, ("benchmarks/mlp.json", "benchmarks/mlp-quick.json"), True)
    add = parser.add_argument
    add("--activation", default="square", choices=sorted(mlp.ACTIVATIONS), help="(square)")
    add("--repeats", type=int, help="single-sample repeats (20; --quick 3)")
    add("--batch-repeats", type=int, help="full-batch repeats (3; --quick 1)")
    add("--epochs", type=int, help="training epochs (40; --quick 5)")
    add("--lr", type=float, default=0.05, help="SGD learning rate (0.05)")
    add("--seed", type=int, default=0)
    args = bench.parse(parser, argv, DEFAULTS)
    if min(args.repeats, args.batch_repeats, args.epochs) < 1 or args.lr <= 0:
        parser.error("--repeats, --batch-repeats and --epochs must be ≥ 1, --lr > 0.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=130)
    started = time.perf_counter()
    torch.set_num_threads(1)  # a 64-32-10 MLP: threads only contend on a small machine
    data = load_data(args.seed)
    console.print(f"training 64-{HIDDEN}-10 ({args.activation}), {args.epochs} epochs …")
    net, training = train(data, args)
    with tempfile.TemporaryDirectory(prefix="fedhe-bench-mlp-") as state_dir:
        releases = 1 + args.repeats + args.batch_repeats  # warm-up, single, batch
        setup, keys = make_setup(net, args.activation, KeyHolder(state_dir, **KEYHOLDER), releases)
        console.print(f"fedhe single sample ×{args.repeats}, batch ×{args.batch_repeats} …")
        once = lambda x: fedhe_once(setup, x)  # noqa: E731
        single = repeat_samples(once, setup.model, data.X_test, args.repeats)
        batch = run_batch(setup, data, args.batch_repeats)
    console.print(f"TenSEAL CKKSVector.mm single sample ×{args.repeats}, references …")
    results = {
        "training": training,
        "keys": keys,
        "single": single,
        "batch": batch,
        "tenseal": run_tenseal(setup, data, args.repeats),
        "reference": run_reference(setup, data, args.repeats),
    }
    results["accuracy"] = accuracy(setup, data, results)
    results["bars"] = bars(results)
    report = {
        "benchmark": "MLP inference on encrypted inputs (fedhe.tasks.mlp) vs TenSEAL mm and "
        "plaintext, in process (no Flower)",
        "config": config(args, setup),
        "machine": bench.machine_info(),
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    bench.show_targets(console, results["bars"])
    bench.write_json(args.out, report, console)


def config(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    keys = ("activation", "repeats", "batch_repeats", "epochs", "lr", "seed", "quick")
    return {
        **{key: getattr(args, key) for key in keys},
        "architecture": [setup.model.n_features, HIDDEN, setup.model.n_outputs],
        "activation_coefficients": list(setup.model.activation.coefficients),
        "ckks_params": setup.public.params.to_dict(),
        "slots": setup.public.params.slots,
        "batch_samples": setup.public.params.slots,
        "rotation_steps": list(setup.layout.steps),
        "torch_threads": torch.get_num_threads(),
        "bars": {
            "single_aggregator_s": SINGLE_BAR_S,
            "batch_samples_per_s": BATCH_BAR,
            "accuracy_points": 100 * ACCURACY_BAR,
        },
    }


# -- data, training, keys --------------------------------------------------------------------


def load_data(seed: int) -> Data:
    train_set, test_set = load_builtin("digits", seed=seed)
    mean, meansq = train_set.X.mean(axis=0), (train_set.X**2).mean(axis=0)
    return Data(
        learning.standardize(train_set.X, mean, meansq),
        train_set.y,
        learning.standardize(test_set.X, mean, meansq),
        test_set.y,
    )


def train(data: Data, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Central SGD; the learning rate halves while the last epoch's loss is NaN."""
    spec = learning.ModelSpec(data.X_train.shape[1], 10, (HIDDEN,), args.activation)
    lr = args.lr
    for _ in range(MAX_LR_HALVINGS + 1):
        net = learning.build_model(spec, seed=args.seed)
        started = time.perf_counter()
        config = learning.TrainConfig(epochs=args.epochs, batch_size=32, lr=lr, seed=args.seed)
        loss = learning.local_train(net, data.X_train, data.y_train, config)
        train_s = time.perf_counter() - started
        if math.isfinite(loss):
            break
        lr /= 2
    else:
        raise bench.BenchError(f"training diverged down to lr={lr}: lower --lr.")
    test = learning.evaluate(net, data.X_test, data.y_test)
    info = {
        "lr_used": lr,
        "last_epoch_loss": loss,
        "train_s": train_s,
        "torch_test_accuracy": test["accuracy"],
        "torch_test_loss": test["loss"],
    }
    return net, info


def make_setup(
    net: nn.Module, activation: str, keyholder: KeyHolder, releases: int
) -> tuple[Setup, dict[str, float]]:
    """The training job and its registered parties, then the inference job that names it as
    its parent and party-0 as its querier: keys generated by the key holder at declaration."""
    weights = learning.get_weights(net)
    training = aggregate.declare(
        TRAINING_JOB,
        outputs={aggregate.OUTPUT: (1, aggregate.Layout.of(weights))},
        min_parties=len(PARTIES),
        task=mlp.TASK,
    )
    keyholder.declare_job(training)
    parties, register_s = bench.register(keyholder, TRAINING_JOB, PARTIES)
    model = mlp.HEModel.from_weights(weights, activation)
    params = model.params()
    layout = model.single_layout(params.slots)
    inference = aggregate.declare(
        INFERENCE_JOB,
        outputs={mlp.OUTPUT: (releases, None)},
        min_parties=len(PARTIES),
        params=params,
        task=mlp.INFERENCE_TASK,
        meta={"querier": QUERIER, "parent": TRAINING_JOB},
    )
    keys = KeyRequest(relin=True, rotations=layout.steps)
    blob, keygen_s = bench.timed_call(keyholder.declare_job, inference, keys)
    public = PublicContext.from_bytes(blob)
    setup = Setup(model, net, layout, keyholder, parties, public, public.encryption_only())
    keys = {
        "keygen_s": keygen_s,
        "register_s": register_s,
        "aggregator_context_bytes": len(public.to_bytes()),
        "querier_context_bytes": len(setup.querier.to_bytes()),
    }
    return setup, keys


# -- fedhe: one sample, one full batch ------------------------------------------------------


def repeat_samples(
    once: Any, model: mlp.HEModel, X: np.ndarray, repeats: int, batch: bool = False
) -> dict[str, Any]:
    """`once` on one warm-up sample, then on test sample r for r < `repeats` (with `batch`: on
    the whole of `X` each time, no warm-up): medians, and the logits' errors and predictions
    against plaintext inference."""
    if not batch:
        once(X[0])
    runs, errors, predictions = [], [], []
    for repeat in range(repeats):
        x = X if batch else X[repeat % len(X)][None]
        logits, timing = once(x if batch else x[0])
        errors.append(float(np.max(np.abs(logits - model.logits(x)))))
        predictions.append(mlp.predict(logits).tolist() if batch else int(np.argmax(logits)))
        runs.append(timing)
    return {
        **summarize(runs),
        "max_abs_logit_error": max(errors),
        "abs_logit_error_per_repeat": errors,
        "predictions": predictions,
    }


def fedhe_once(setup: Setup, X: np.ndarray, batched: bool = False) -> tuple[np.ndarray, Timings]:
    """One sample (`X` a row) or one full batch through every step in a row; then the loading
    of the querier's bytes (and, for one sample, the circuit) timed apart."""
    model, querier, params, t = setup.model, setup.querier, setup.public.params, {}
    started = time.perf_counter()
    with timed(t, "querier_encrypt_s"):
        if batched:
            encrypted = mlp.querier_encrypt_batch(querier, X)
        else:
            encrypted = mlp.querier_encrypt_single(querier, X, setup.layout)
        query = encrypted.to_bytes()
    with timed(t, "querier_mask_s"):
        shape = (model.n_outputs, encrypted.shape[1]) if batched else (params.slots,)
        mask, rho = mlp.querier_mask(querier, shape)
        mask_blob = mask.to_bytes()
    with timed(t, "aggregator_compute_s"):
        compute = mlp.aggregator_batched if batched else mlp.aggregator_single
        out = compute(model, setup.public, query, mask_blob)
    with timed(t, "aggregator_serialize_s"):
        response = out.to_bytes()
    released = setup.release(response, t)  # key holder → sealed → the querier opens it
    with timed(t, "querier_unmask_s"):
        if batched:
            logits = mlp.querier_unmask_batched(released, rho, len(X))
        else:
            logits = mlp.querier_unmask_single(released, rho, model.n_outputs)
    t["end_to_end_s"] = time.perf_counter() - started
    shape = None if batched else (params.slots,)
    with timed(t, "aggregator_load_s"):
        x = load(query, setup.public, shape=shape, level=params.depth + 1)
        rho = load(mask_blob, setup.public, shape=shape, level=1)
    if batched:
        t["samples_per_s"] = len(X) / t["aggregator_compute_s"]
        t["end_to_end_samples_per_s"] = len(X) / t["end_to_end_s"]
    else:
        with timed(t, "aggregator_evaluate_s"):
            circuit = Circuit(setup.public)
            (cipher,) = circuit.ciphers(x)
            _ = circuit.tensor([model.evaluate_single(circuit, cipher)], shape) + rho
    t.update(query_bytes=len(query), mask_bytes=len(mask_blob), response_bytes=len(response))
    return logits, t


def run_batch(setup: Setup, data: Data, repeats: int) -> dict[str, Any]:
    X = tiled(data.X_test, setup.public.params.slots)
    once = lambda x: fedhe_once(setup, x, batched=True)  # noqa: E731
    out = repeat_samples(once, setup.model, X, repeats, batch=True)
    predictions = out.pop("predictions")
    test = [p[: len(data.X_test)] for p in predictions]
    return {**out, "samples": len(X), "test_predictions_per_repeat": test}


def tiled(X: np.ndarray, rows: int) -> np.ndarray:
    """X repeated (in order) to `rows` rows: the first len(X) rows are X itself."""
    return np.resize(X, (rows, X.shape[1]))


# -- TenSEAL's CKKSVector.mm -----------------------------------------------------------------


@dataclass(frozen=True)
class TenSEALNet:
    """The same network in TenSEAL terms: bias 1 folded as a constant-1 input feature,
    activation c₀ + c₁h + c₂h² as h² + (c₁/c₂)·h with c₂, c₀ folded into layer 2."""

    W1: list[list[float]]  # (d + 1, hidden): [W1ᵀ; b1]
    ratio: float  # c₁ / c₂
    W2: list[list[float]]  # (hidden, outputs): c₂·W2ᵀ
    b2: list[float]  # b2 + c₀·W2·1

    @classmethod
    def of(cls, model: mlp.HEModel) -> TenSEALNet:
        (W1, b1), (W2, b2) = model.layers
        c0, c1, c2 = model.activation.coefficients
        return cls(
            np.vstack([W1.T, b1]).tolist(),
            c1 / c2,
            (c2 * W2.T).tolist(),
            (b2 + c0 * W2.sum(axis=1)).tolist(),
        )

    def forward(self, enc: ts.CKKSVector) -> ts.CKKSVector:
        return self.tail(enc.mm(self.W1))

    def tail(self, h: ts.CKKSVector) -> ts.CKKSVector:
        """The activation and layer 2 on the first layer's outputs `h`."""
        z = h.square()
        if self.ratio != 0:
            z = z + h * self.ratio
        return z.mm(self.W2) + self.b2


def tenseal_context(setup: Setup) -> tuple[ts.Context, float, int]:
    params = setup.public.params
    started = time.perf_counter()
    sizes = list(params.coeff_mod_bit_sizes)
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=sizes)
    context.global_scale = params.scale
    context.generate_galois_keys()
    keygen_s = time.perf_counter() - started
    return context, keygen_s, len(context.serialize(save_secret_key=False))


def run_tenseal(setup: Setup, data: Data, repeats: int) -> dict[str, Any]:
    context, keygen_s, context_bytes = tenseal_context(setup)
    net = TenSEALNet.of(setup.model)
    once = lambda x: tenseal_once(context, net, x)  # noqa: E731
    return {
        **repeat_samples(once, setup.model, data.X_test, repeats),
        "keygen_s": keygen_s,
        "context_bytes": context_bytes,
        "naive_bias_max_abs_logit_error": naive_bias_error(
            context, net, setup.model, data.X_test[0]
        ),
    }


def tenseal_once(context: ts.Context, net: TenSEALNet, x: np.ndarray) -> tuple[np.ndarray, Timings]:
    t: Timings = {}
    started = time.perf_counter()
    with timed(t, "encrypt_s"):
        query = ts.ckks_vector(context, [*x.tolist(), 1.0]).serialize()
    with timed(t, "server_s"):
        with timed(t, "server_load_s"):
            enc = ts.ckks_vector_from(context, query)
        response = net.forward(enc).serialize()
    with timed(t, "decrypt_s"):
        logits = np.asarray(ts.ckks_vector_from(context, response).decrypt())
    t["end_to_end_s"] = time.perf_counter() - started
    t.update(query_bytes=len(query), response_bytes=len(response))
    return logits, t


def naive_bias_error(
    context: ts.Context, net: TenSEALNet, model: mlp.HEModel, x: np.ndarray
) -> float:
    """`enc.mm(W1ᵀ) + b1` (bias in slots 0 … 31 only), then the same layer 2: the pitfall."""
    (W1, b1), _ = model.layers
    y = net.tail(ts.ckks_vector(context, x.tolist()).mm(W1.T.tolist()) + b1.tolist())
    return float(np.max(np.abs(np.asarray(y.decrypt()) - model.logits(x[None])[0])))


# -- plaintext references --------------------------------------------------------------------


def run_reference(setup: Setup, data: Data, repeats: int) -> dict[str, Any]:
    """Seconds per sample: one sample per call over the test set, and one tiled batch."""
    X, model, net = data.X_test, setup.model, setup.net
    batch = tiled(X, setup.public.params.slots)
    rows = torch.as_tensor(X, dtype=torch.float64)
    batch_rows = torch.as_tensor(batch, dtype=torch.float64)
    net.eval()
    runs = []
    for _ in range(repeats):
        t: Timings = {}
        with timed(t, "numpy_single_s"):
            for x in X:
                model.logits(x[None])
        with timed(t, "numpy_batch_s"):
            model.logits(batch)
        with torch.no_grad():
            with timed(t, "torch_single_s"):
                for row in rows:
                    net(row[None])
            with timed(t, "torch_batch_s"):
                net(batch_rows)
        sizes = {"numpy_single_s": len(X), "torch_single_s": len(X)}
        runs.append({key: value / sizes.get(key, len(batch)) for key, value in t.items()})
    return summarize(runs)


# -- accuracy and bars -----------------------------------------------------------------------


def accuracy(setup: Setup, data: Data, results: dict[str, Any]) -> dict[str, Any]:
    plain_logits = setup.model.logits(data.X_test)
    plain = mlp.predict(plain_logits)
    encrypted = [np.asarray(p) for p in results["batch"]["test_predictions_per_repeat"]]
    accuracies = [float(np.mean(p == data.y_test)) for p in encrypted]
    ran = [i % len(data.X_test) for i in range(len(results["single"]["predictions"]))]
    return {
        "test_samples": len(data.y_test),
        "plaintext_accuracy": float(np.mean(plain == data.y_test)),
        "encrypted_accuracy": min(accuracies),
        "encrypted_accuracy_per_repeat": accuracies,
        "encrypted_vs_plaintext_agreement": min(float(np.mean(p == plain)) for p in encrypted),
        "single_vs_plaintext_agreement": float(
            np.mean(np.asarray(results["single"]["predictions"]) == plain[ran])
        ),
        "tenseal_vs_plaintext_agreement": float(
            np.mean(np.asarray(results["tenseal"]["predictions"]) == plain[ran])
        ),
        "out_of_interval_share": setup.model.out_of_interval(data.X_test),
    }


def bars(results: dict[str, Any]) -> dict[str, Any]:
    acc = results["accuracy"]
    gap = acc["plaintext_accuracy"] - acc["encrypted_accuracy"]
    return {
        "single_aggregator_s": target(
            results["single"]["median"]["aggregator_compute_s"], SINGLE_BAR_S
        ),
        "batch_samples_per_s": target(results["batch"]["median"]["samples_per_s"], BATCH_BAR, True),
        "accuracy_gap": {"value": gap, "limit": ACCURACY_BAR, "pass": abs(gap) <= ACCURACY_BAR},
    }


if __name__ == "__main__":
    main()
