"""Benchmark MLP inference on encrypted inputs (`fedhe.tasks.mlp`) against TenSEAL and plaintext.

In process: no Flower, no network, no Ray; the querier, the aggregator and the key holder run
one after another in this process, through the steps of `fedhe.tasks.mlp` (the key holder's
step is `fedhe.crypto.decrypt` of the loaded response, without the key holder's policy checks).

* Model: scikit-learn digits (``load_builtin("digits", seed)``: 1437 train / 360 test rows),
  features standardized with the train moments (`fedhe.learning.standardize`), a 64-32-10 MLP
  with the ``--activation`` polynomial (square, relu-poly, silu-poly) trained centrally in the
  clear (`build_model` + `local_train`: ``--epochs`` of SGD, batch 32, ``--lr``; halved while
  the loss is NaN; torch on one thread), compiled with `mlp.HEModel.from_weights`.
* Keys (outside every timing): `model.params()` (N=8192, one hidden layer: primes
  60, 32, 32, 32, 60, scale 2^32), relinearization key and the single-sample layout's rotation
  keys; the aggregator holds that public context, the querier its encryption-only copy.
* Phases, each the median over repeats (``time.perf_counter``), after one unmeasured warm-up:
  1. Single sample (``--repeats``, repeat r takes test sample r): querier encryption of the
     replicated input and of Enc(ρ) (to bytes), aggregator compute (`aggregator_single` on the
     querier's bytes: loading + circuit + mask), the same split into loading and evaluation,
     serialization of the response, key holder (load + decrypt), querier unmask, and the
     in-process end to end (all of these in a row). Bar: aggregator compute ≤ 100 ms per sample.
  2. Batch (``--batch-repeats``): the test set tiled to one full batch of 4096 rows (`slots`),
     feature-major: querier encryption, aggregator compute (`aggregator_batched`), key holder,
     unmask. Bar: 4096 / aggregator compute ≥ 1,000 samples/s.
  3. TenSEAL's own path for one sample (``--repeats``): ``ts.context`` with the same primes
     and scale, Galois keys for every power of two, ``ts.ckks_vector`` of [x, 1] (the bias of
     the first layer folded as a constant-1 feature: ``enc.mm(W1ᵀ) + b1`` adds b1 to the first
     32 slots only, while the second ``mm`` reads the replicated copies beyond them, so the
     logits come out wrong; its error is recorded once), then ``mm``, the activation, ``mm``,
     ``+ b2``. The activation is h² + (c₁/c₂)·h with c₂ and c₀ folded into the second layer, as
     fedhe does: ``h.polyval([c0, c1, c2])`` takes two levels and runs out of the chain
     ("scale out of bounds"). TenSEAL's ``mm`` runs on its thread pool (all cores); fedhe on
     one thread. No mask. Timed: encryption (to bytes), server (load + compute), decryption.
  4. Accuracy: the first 360 rows of every batch are the test set: encrypted accuracy against
     plaintext inference of the same weights (`model.logits`), max |logit error| of the batch
     and of every single-sample run (and TenSEAL's), single-path predictions against plaintext.
     Bar: encrypted accuracy within 1 point of plaintext.
  5. Plaintext references: `model.logits` (numpy) and the torch model, one sample per call
     over the test set, and the whole tiled batch at once (per sample).

Run:  python simulations/bench_mlp.py [--quick] [--activation square]   (from the repository
      root, with the venv: .venv/bin/python simulations/bench_mlp.py --quick for a smoke run;
      the default run takes about half a minute on two cores)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import torch
from machine import (  # simulations/machine.py, beside this script
    Timings,
    fmt_time,
    machine_info,
    print_phase_table,
    row,
    summarize,
    timed,
)
from rich.console import Console
from torch import nn

from fedhe.crypto import KeyRequest, PublicContext, SecretContext, decrypt, generate_keys
from fedhe.crypto import load_tensor as load
from fedhe.crypto.circuit import Circuit
from fedhe.data.datasets import load_builtin
from fedhe.learning import (
    ModelSpec,
    TrainConfig,
    build_model,
    evaluate,
    get_weights,
    local_train,
    standardize,
)
from fedhe.tasks import mlp

DEFAULTS = {"repeats": 20, "batch_repeats": 3, "epochs": 40}
QUICK = {"repeats": 3, "batch_repeats": 1, "epochs": 5}
DEFAULT_OUT = {False: Path("benchmarks/mlp.json"), True: Path("benchmarks/mlp-quick.json")}
HIDDEN = 32
SINGLE_BAR_S = 0.100  # aggregator compute per sample
BATCH_BAR = 1_000.0  # samples per second, aggregator compute of one full batch
ACCURACY_BAR = 0.01  # encrypted accuracy within one point of plaintext
MAX_LR_HALVINGS = 6


@dataclass(frozen=True)
class Data:
    X_train: np.ndarray  # standardized with the train moments
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Setup:
    """The trained model compiled for encryption, and the keys of every role."""

    model: mlp.HEModel
    net: nn.Module
    layout: mlp.SingleLayout
    secret: SecretContext
    public: PublicContext  # the aggregator's: relinearization and rotation keys
    querier: PublicContext  # encryption only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--activation", default="square", choices=sorted(mlp.ACTIVATIONS), help="(square)"
    )
    parser.add_argument("--repeats", type=int, help="single-sample repeats (20; --quick 3)")
    parser.add_argument("--batch-repeats", type=int, help="full-batch repeats (3; --quick 1)")
    parser.add_argument("--epochs", type=int, help="training epochs (40; --quick 5)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--out", type=Path, help="JSON report (benchmarks/mlp.json)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or DEFAULT_OUT[args.quick]
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
    setup, keys = make_setup(net, args.activation)
    console.print(f"fedhe single sample ×{args.repeats} …")
    single = run_single(setup, data, args.repeats)
    console.print(f"fedhe batch of {setup.public.params.slots} ×{args.batch_repeats} …")
    batch = run_batch(setup, data, args.batch_repeats)
    console.print(f"TenSEAL CKKSVector.mm single sample ×{args.repeats} …")
    tenseal = run_tenseal(setup, data, args.repeats)
    console.print("plaintext references (numpy, torch) …")
    reference = run_reference(setup, data, args.repeats)
    results = {
        "training": training,
        "keys": keys,
        "single": single,
        "batch": batch,
        "tenseal": tenseal,
        "reference": reference,
    }
    results["accuracy"] = accuracy(setup, data, results)
    results["bars"] = bars(results)
    report = {
        "benchmark": "MLP inference on encrypted inputs (fedhe.tasks.mlp) vs TenSEAL mm and "
        "plaintext, in process (no Flower)",
        "config": config(args, setup),
        "machine": machine_info(),
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    print_report(console, report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out} (wall time {report['wall_s']:.1f} s)")


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
        standardize(train_set.X, mean, meansq),
        train_set.y,
        standardize(test_set.X, mean, meansq),
        test_set.y,
    )


def train(data: Data, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Central SGD; the learning rate halves while the last epoch's loss is NaN."""
    spec = ModelSpec(data.X_train.shape[1], 10, (HIDDEN,), args.activation)
    lr = args.lr
    for _ in range(MAX_LR_HALVINGS + 1):
        net = build_model(spec, seed=args.seed)
        started = time.perf_counter()
        config = TrainConfig(epochs=args.epochs, batch_size=32, lr=lr, seed=args.seed)
        loss = local_train(net, data.X_train, data.y_train, config)
        train_s = time.perf_counter() - started
        if math.isfinite(loss):
            break
        lr /= 2
    else:
        raise RuntimeError(f"training diverged down to lr={lr}: lower --lr.")
    test = evaluate(net, data.X_test, data.y_test)
    info = {
        "lr_used": lr,
        "last_epoch_loss": loss,
        "train_s": train_s,
        "torch_test_accuracy": test["accuracy"],
        "torch_test_loss": test["loss"],
    }
    return net, info


def make_setup(net: nn.Module, activation: str) -> tuple[Setup, dict[str, float]]:
    model = mlp.HEModel.from_weights(get_weights(net), activation)
    params = model.params()
    layout = model.single_layout(params.slots)
    started = time.perf_counter()
    secret = generate_keys(params, KeyRequest(relin=True, rotations=layout.steps))
    keygen_s = time.perf_counter() - started
    public = secret.public()
    setup = Setup(model, net, layout, secret, public, public.encryption_only())
    keys = {
        "keygen_s": keygen_s,
        "aggregator_context_bytes": len(public.to_bytes()),
        "querier_context_bytes": len(setup.querier.to_bytes()),
    }
    return setup, keys


# -- fedhe: single sample ----------------------------------------------------------------------


def run_single(setup: Setup, data: Data, repeats: int) -> dict[str, Any]:
    single_once(setup, data.X_test[0])  # warm-up, not measured
    runs, errors, predictions = [], [], []
    for repeat in range(repeats):
        x = data.X_test[repeat % len(data.X_test)]
        logits, timing = single_once(setup, x)
        errors.append(float(np.max(np.abs(logits - setup.model.logits(x[None])[0]))))
        predictions.append(int(np.argmax(logits)))
        runs.append(timing)
    return {
        **summarize(runs),
        "max_abs_logit_error": max(errors),
        "abs_logit_error_per_repeat": errors,
        "predictions": predictions,
    }


def single_once(setup: Setup, x: np.ndarray) -> tuple[np.ndarray, Timings]:
    """One sample through every step in a row; then loading and evaluation timed apart."""
    model, slots, t = setup.model, setup.public.params.slots, {}
    started = time.perf_counter()
    with timed(t, "querier_encrypt_s"):
        query = mlp.querier_encrypt_single(setup.querier, x, setup.layout).to_bytes()
    with timed(t, "querier_mask_s"):
        mask, rho = mlp.querier_mask(setup.querier, (slots,))
        mask_blob = mask.to_bytes()
    with timed(t, "aggregator_compute_s"):
        out = mlp.aggregator_single(model, setup.public, query, mask_blob)
    with timed(t, "aggregator_serialize_s"):
        response = out.to_bytes()
    with timed(t, "keyholder_s"):
        released = decrypt(setup.secret, load(response, setup.secret, shape=(slots,)))
    with timed(t, "querier_unmask_s"):
        logits = mlp.querier_unmask_single(released, rho, model.n_outputs)
    t["end_to_end_s"] = time.perf_counter() - started
    t.update(split_single(setup, query, mask_blob))
    sizes = {"query_bytes": len(query), "mask_bytes": len(mask_blob)}
    t.update(sizes, response_bytes=len(response))
    return logits, t


def split_single(setup: Setup, query: bytes, mask_blob: bytes) -> Timings:
    """`aggregator_single` in two parts: loading the querier's bytes, then the circuit."""
    params, t = setup.public.params, {}
    with timed(t, "aggregator_load_s"):
        x = load(query, setup.public, shape=(params.slots,), level=params.depth + 1)
        rho = load(mask_blob, setup.public, shape=(params.slots,), level=1)
    with timed(t, "aggregator_evaluate_s"):
        circuit = Circuit(setup.public)
        (cipher,) = circuit.ciphers(x)
        logits = circuit.tensor([setup.model.evaluate_single(circuit, cipher)], (params.slots,))
        _ = logits + rho
    return t


# -- fedhe: one full batch -------------------------------------------------------------------


def tiled(X: np.ndarray, rows: int) -> np.ndarray:
    """X repeated (in order) to `rows` rows: the first len(X) rows are X itself."""
    return np.resize(X, (rows, X.shape[1]))


def run_batch(setup: Setup, data: Data, repeats: int) -> dict[str, Any]:
    X = tiled(data.X_test, setup.public.params.slots)
    plain = setup.model.logits(X)
    runs, errors, test_predictions = [], [], []
    for _ in range(repeats):
        logits, timing = batch_once(setup, X)
        errors.append(float(np.max(np.abs(logits - plain))))
        test_predictions.append(mlp.predict(logits[: len(data.X_test)]).tolist())
        runs.append(timing)
    return {
        **summarize(runs),
        "samples": len(X),
        "max_abs_logit_error": max(errors),
        "abs_logit_error_per_repeat": errors,
        "test_predictions_per_repeat": test_predictions,
    }


def batch_once(setup: Setup, X: np.ndarray) -> tuple[np.ndarray, Timings]:
    model, t = setup.model, {}
    started = time.perf_counter()
    with timed(t, "querier_encrypt_s"):
        encrypted = mlp.querier_encrypt_batch(setup.querier, X)
        query = encrypted.to_bytes()
    with timed(t, "querier_mask_s"):
        mask, rho = mlp.querier_mask(setup.querier, (model.n_outputs, encrypted.shape[1]))
        mask_blob = mask.to_bytes()
    with timed(t, "aggregator_compute_s"):
        out = mlp.aggregator_batched(model, setup.public, query, mask_blob)
    with timed(t, "aggregator_serialize_s"):
        response = out.to_bytes()
    with timed(t, "keyholder_s"):
        released = decrypt(setup.secret, load(response, setup.secret, shape=out.shape))
    with timed(t, "querier_unmask_s"):
        logits = mlp.querier_unmask_batched(released, rho, len(X))
    t["end_to_end_s"] = time.perf_counter() - started
    params = setup.public.params
    with timed(t, "aggregator_load_s"):
        load(query, setup.public, level=params.depth + 1)
        load(mask_blob, setup.public, level=1)
    t["samples_per_s"] = len(X) / t["aggregator_compute_s"]
    t["end_to_end_samples_per_s"] = len(X) / t["end_to_end_s"]
    t.update(query_bytes=len(query), mask_bytes=len(mask_blob), response_bytes=len(response))
    return logits, t


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
        h = enc.mm(self.W1)
        z = h.square()
        if self.ratio != 0:
            z = z + h * self.ratio
        return z.mm(self.W2) + self.b2


def tenseal_context(setup: Setup) -> tuple[ts.Context, float, int]:
    params = setup.public.params
    started = time.perf_counter()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    context.global_scale = params.scale
    context.generate_galois_keys()
    keygen_s = time.perf_counter() - started
    public_bytes = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True
    )
    return context, keygen_s, len(public_bytes)


def run_tenseal(setup: Setup, data: Data, repeats: int) -> dict[str, Any]:
    context, keygen_s, context_bytes = tenseal_context(setup)
    net = TenSEALNet.of(setup.model)
    tenseal_once(context, net, data.X_test[0])  # warm-up, not measured
    runs, errors, predictions = [], [], []
    for repeat in range(repeats):
        x = data.X_test[repeat % len(data.X_test)]
        logits, timing = tenseal_once(context, net, x)
        errors.append(float(np.max(np.abs(logits - setup.model.logits(x[None])[0]))))
        predictions.append(int(np.argmax(logits)))
        runs.append(timing)
    return {
        **summarize(runs),
        "keygen_s": keygen_s,
        "context_bytes": context_bytes,
        "max_abs_logit_error": max(errors),
        "abs_logit_error_per_repeat": errors,
        "predictions": predictions,
        "naive_bias_max_abs_logit_error": naive_bias_error(context, setup.model, data.X_test[0]),
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


def naive_bias_error(context: ts.Context, model: mlp.HEModel, x: np.ndarray) -> float:
    """`enc.mm(W1ᵀ) + b1` (bias in slots 0 … 31 only), square, `mm(W2ᵀ) + b2`: the pitfall."""
    (W1, b1), (W2, b2) = model.layers
    c0, c1, c2 = model.activation.coefficients
    h = ts.ckks_vector(context, x.tolist()).mm(W1.T.tolist()) + b1.tolist()
    z = h.square() + h * (c1 / c2) if c1 else h.square()
    y = z.mm((c2 * W2.T).tolist()) + (b2 + c0 * W2.sum(axis=1)).tolist()
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
    single = results["single"]["median"]["aggregator_compute_s"]
    throughput = results["batch"]["median"]["samples_per_s"]
    acc = results["accuracy"]
    gap = acc["plaintext_accuracy"] - acc["encrypted_accuracy"]
    return {
        "single_aggregator_s": {
            "value": single,
            "limit": SINGLE_BAR_S,
            "pass": single <= SINGLE_BAR_S,
        },
        "batch_samples_per_s": {
            "value": throughput,
            "limit": BATCH_BAR,
            "pass": throughput >= BATCH_BAR,
        },
        "accuracy_gap": {"value": gap, "limit": ACCURACY_BAR, "pass": abs(gap) <= ACCURACY_BAR},
    }


# -- helpers ---------------------------------------------------------------------------------


# -- report ----------------------------------------------------------------------------------


def print_report(console: Console, report: dict[str, Any]) -> None:
    cfg, results = report["config"], report["results"]
    arch = "-".join(str(n) for n in cfg["architecture"])
    title = (
        f"MLP inference benchmark: digits {arch} ({cfg['activation']}); median of "
        f"{cfg['repeats']} single / {cfg['batch_repeats']} batch repeats"
    )
    print_phase_table(console, title, caption(results, cfg), "time", rows(results, cfg))
    console.print(summary_lines(report))


def caption(results: dict[str, Any], cfg: dict[str, Any]) -> str:
    params, keys, train_info = cfg["ckks_params"], results["keys"], results["training"]
    return (
        f"CKKS N={params['poly_modulus_degree']}, primes {params['coeff_mod_bit_sizes']}, scale "
        f"2^{params['scale_bits']}; rotation keys for steps {cfg['rotation_steps']}; fedhe "
        f"keygen {fmt_time(keys['keygen_s'])}. Training: {cfg['epochs']} epochs, lr "
        f"{train_info['lr_used']:g}, {fmt_time(train_info['train_s'])}, torch test accuracy "
        f"{train_info['torch_test_accuracy']:.1%}. Aggregator compute includes loading the "
        "querier's bytes and adding Enc(ρ); key holder = load + decrypt."
    )


def rows(results: dict[str, Any], cfg: dict[str, Any]) -> list[list[str]]:
    keys = results["keys"]
    return [
        row(
            "aggregator public context (relin + rotations)", None, keys["aggregator_context_bytes"]
        ),
        row("querier public context (encryption only)", None, keys["querier_context_bytes"]),
        *single_rows(results["single"]),
        *batch_rows(results["batch"]),
        *tenseal_rows(results["tenseal"], results["single"]["median"]),
        *reference_rows(results),
    ]


def single_rows(single: dict[str, Any]) -> list[list[str]]:
    m = single["median"]
    compute = m["aggregator_compute_s"]
    verdict = "PASS" if compute <= SINGLE_BAR_S else "FAIL"
    return [
        row("1 sample: querier encryption (input)", m["querier_encrypt_s"], m["query_bytes"]),
        row("1 sample: querier Enc(ρ)", m["querier_mask_s"], m["mask_bytes"]),
        row(
            "1 sample: aggregator compute",
            compute,
            None,
            f"bar ≤ {SINGLE_BAR_S * 1e3:.0f} ms: {verdict}",
        ),
        row("   loading the querier's bytes", m["aggregator_load_s"], None, "measured apart"),
        row("   circuit + Enc(ρ)", m["aggregator_evaluate_s"], None, "measured apart"),
        row("1 sample: aggregator serialization", m["aggregator_serialize_s"], m["response_bytes"]),
        row("1 sample: key holder (load + decrypt)", m["keyholder_s"]),
        row("1 sample: querier unmask", m["querier_unmask_s"]),
        row(
            "1 sample: end to end (in process)",
            m["end_to_end_s"],
            None,
            f"max |logit err| {single['max_abs_logit_error']:.2e}",
        ),
    ]


def batch_rows(batch: dict[str, Any]) -> list[list[str]]:
    m, n = batch["median"], batch["samples"]
    throughput = m["samples_per_s"]
    verdict = "PASS" if throughput >= BATCH_BAR else "FAIL"
    return [
        row(f"batch {n}: querier encryption (input)", m["querier_encrypt_s"], m["query_bytes"]),
        row(f"batch {n}: querier Enc(ρ)", m["querier_mask_s"], m["mask_bytes"]),
        row(
            f"batch {n}: aggregator compute",
            m["aggregator_compute_s"],
            None,
            f"{throughput:,.0f} samples/s; bar ≥ {BATCH_BAR:,.0f}: {verdict}",
        ),
        row("   loading the querier's bytes", m["aggregator_load_s"], None, "measured apart"),
        row(
            f"batch {n}: aggregator serialization", m["aggregator_serialize_s"], m["response_bytes"]
        ),
        row(f"batch {n}: key holder (load + decrypt)", m["keyholder_s"]),
        row(f"batch {n}: querier unmask", m["querier_unmask_s"]),
        row(
            f"batch {n}: end to end (in process)",
            m["end_to_end_s"],
            None,
            f"{m['end_to_end_samples_per_s']:,.0f} samples/s; max |logit err| "
            f"{batch['max_abs_logit_error']:.2e}",
        ),
    ]


def tenseal_rows(tenseal: dict[str, Any], fedhe: Timings) -> list[list[str]]:
    m = tenseal["median"]
    ratio = m["server_s"] / fedhe["aggregator_compute_s"]
    return [
        row("TenSEAL mm: Galois-key context (public)", None, tenseal["context_bytes"]),
        row("TenSEAL mm: encryption", m["encrypt_s"], m["query_bytes"]),
        row(
            "TenSEAL mm: server (load + mm, act., mm)",
            m["server_s"],
            m["response_bytes"],
            f"{ratio:.0f}× fedhe aggregator",
        ),
        row("TenSEAL mm: decryption", m["decrypt_s"]),
        row(
            "TenSEAL mm: end to end (in process)",
            m["end_to_end_s"],
            None,
            f"max |logit err| {tenseal['max_abs_logit_error']:.2e} (bias unfolded: "
            f"{tenseal['naive_bias_max_abs_logit_error']:.2g})",
        ),
    ]


def reference_rows(results: dict[str, Any]) -> list[list[str]]:
    ref = results["reference"]["median"]
    single = results["single"]["median"]["aggregator_compute_s"]
    return [
        row("numpy model.logits, 1 sample per call", ref["numpy_single_s"], None, "per sample"),
        row(
            "numpy model.logits, batch, per sample",
            ref["numpy_batch_s"],
            None,
            f"fedhe single aggregator {single / ref['numpy_single_s']:,.0f}× numpy single",
        ),
        row("torch forward, 1 sample per call", ref["torch_single_s"], None, "per sample"),
        row("torch forward, batch, per sample", ref["torch_batch_s"]),
    ]


def summary_lines(report: dict[str, Any]) -> str:
    acc, bar, m = report["results"]["accuracy"], report["results"]["bars"], report["machine"]

    def verdict(name: str) -> str:
        return "PASS" if bar[name]["pass"] else "FAIL"

    single = bar["single_aggregator_s"]["value"]
    throughput = bar["batch_samples_per_s"]["value"]
    return (
        f"Accuracy on {acc['test_samples']} test samples: encrypted (batched) "
        f"{acc['encrypted_accuracy']:.2%}, plaintext {acc['plaintext_accuracy']:.2%}; encrypted "
        f"vs plaintext predictions {acc['encrypted_vs_plaintext_agreement']:.1%}, single path "
        f"{acc['single_vs_plaintext_agreement']:.1%}, TenSEAL mm "
        f"{acc['tenseal_vs_plaintext_agreement']:.1%} (on the samples they ran); hidden "
        f"pre-activations outside the fitted interval {acc['out_of_interval_share']:.1%}.\n"
        f"Bar: single-sample aggregator compute {fmt_time(single)} ≤ "
        f"{SINGLE_BAR_S * 1e3:.0f} ms: {verdict('single_aggregator_s')}.\n"
        f"Bar: batched throughput {throughput:,.0f} samples/s ≥ {BATCH_BAR:,.0f}: "
        f"{verdict('batch_samples_per_s')}.\n"
        f"Bar: encrypted accuracy within {100 * ACCURACY_BAR:.0f} point of plaintext "
        f"(gap {100 * bar['accuracy_gap']['value']:+.2f} points): {verdict('accuracy_gap')}.\n"
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, Python "
        f"{m['python']}, numpy {m['numpy']}, torch {m['torch']}, tenseal {m['tenseal']}."
    )


if __name__ == "__main__":
    main()
