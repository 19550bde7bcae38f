"""Benchmark encrypted (CKKS) linear regression against its plaintext twin for many parties.

In process: no Flower, no network, no Ray; the parties run one after another in this process,
through the code the Flower job uses (`aggregator/regression.py`, `clients/party.py`):
`fedhe.tasks.aggregate` (``encrypted=False`` in ``declare``, context None: the plaintext twin),
`fedhe.tasks.moments`, `fedhe.tasks.linreg`, `fedhe.tasks.encrypted_model` and
`fedhe.tasks.keyholder_release`. The parties' link with the key holder is `clients/trust.py`'s,
in process (`_Parties`): each HE job registers its parties (sealed seeds → the job's MAC key,
outside every timing, like key generation); each party tags its contribution and seals the tag
to the key holder, which releases a sum only after the tags verify.

* Data: synthetic linear data, ``--features`` (20) features on different scales and offsets,
  ``--samples-per-party`` (100) per party (contiguous slices), known coefficients plus
  N(0, 0.1²) noise, drawn from ``--seed``. Party counts: ``--parties`` (10,100,1000).
* Per party count, one run per mode (plaintext, then HE), each its own job at one key holder
  (keys generated at declaration, outside every timing), min_parties = all parties:
  1. Exact mode end to end: moments secure sum (features and target) → Standardizer → masked
     normal equations secure sum → the key holder decrypts and solves, releasing only the
     coefficients; checked against sklearn LinearRegression on the pooled data.
  2. Gradient mode, ONE round only (w = 0, full local batch, clip ``--clip``, the standardizer
     of step 1): gradient contributions, sum, decryption; checked against the pooled gradient.
  3. Encrypted-model mode, ONE round (own job and `MODEL_PARAMS` keys, the standardizer of
     step 1): the aggregator encrypts w = 0 (vector, broadcast); each party loads the broadcast
     (the same bytes for all) and sends Enc(step·(Aᵢw − bᵢ)), step = ``--lr``/Σn; the aggregator
     updates w; one masked refresh; the key holder decrypts w and seals it to every party (the
     aggregator relays bytes it cannot read); party p0000 opens it. Checked against the same
     step in numpy on the pooled data (key-holder noise flooding, σ = 2^-20: HE error near
     1e-6).
* Per phase (``time.perf_counter``): party local statistics, encryption and (HE) tagging
  (median, total), aggregator sum, key holder (verify the tags, decrypt; + solve for the
  masked statistics), total wall time. Bytes: party→aggregator per party and total (with the
  sealed tag), aggregator→key holder (the sums and the tags), key holder→aggregator (released
  float64 values: moments, then coefficients, 8 bytes each), the public context once.
  Downlinks (mask, standardizer, w) match in both modes: not counted. Encrypted model: party
  (statistics + load + step), aggregator encryption, update, refresh (all; key holder), final
  release (decryption, sealing to every party, p0000 opening its copy); bytes aggregator→party
  (the broadcast), party→aggregator, aggregator↔key holder (refresh, final model: sealed
  copies).
* All contributions of one secure sum stay in memory (1000 × ~0.25 MB) and one
  ``aggregator_sum`` call sums them, as the aggregator does: simpler than batched sums.

One run, no repetition: on a shared machine the times are noisy.

Run:  .venv/bin/python simulations/bench_regression.py [--parties 10,100,1000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from machine import fmt_bytes, fmt_time, machine_info  # simulations/machine.py, beside this script
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LinearRegression

from fedhe.crypto import (
    AGGREGATION_PARAMS,
    MODEL_PARAMS,
    EncryptedTensor,
    PublicContext,
    load_tensor,
)
from fedhe.crypto.channel import Channel, Identity
from fedhe.crypto.mac import MAC_SEED_BYTES, MacKey, mac_label
from fedhe.keyholder import DecryptionRequest, KeyHolder, registry
from fedhe.tasks import aggregate, encrypted_model, keyholder_release, linreg, moments

MODES = ("plaintext", "he")
# Per-phase byte counts → the names of their sums over a mode's phases.
BYTES = {
    "upload_bytes_per_party": "upload_bytes_per_party",
    "upload_bytes_total": "upload_bytes_total",
    "sum_bytes": "aggregator_to_keyholder_bytes",
    "released_bytes": "keyholder_to_aggregator_bytes",
}
TIMES = ("wall_s", "encrypt_s_total", "aggregate_s", "keyholder_s")  # tags: HE only, no ratio
RATIOS = (*TIMES, "upload_bytes_per_party", "bytes_total")  # HE/plaintext
MODEL_TIMES = ("wall_s", "party_s_total", "aggregate_s", "refresh_s", "decrypt_s")
# Aggregator ↔ key holder, once per round (refresh) or per job (final model).
MODEL_BYTES = ("refresh_to_keyholder", "refresh_from_keyholder", "decrypt_to_keyholder", "released")
MODEL_RATIOS = (*MODEL_TIMES, "broadcast_bytes_per_party", "upload_bytes_per_party", "bytes_total")
ERRORS = {
    "exact": "coef_max_rel_err",
    "gradient": "gradient_max_abs_err",
    "encrypted_model": "w_max_abs_err",
}
_SUM = (  # caption and columns of the secure-sum modes
    "time: wall time of the mode, parties one after another; HE Σenc, HE Σtag: encryption and "
    "tagging summed over parties; HE key holder: tag checks and decryption(s) (+ solve); "
    "B/party: party→aggregator; total: all uploads + aggregator→key holder + key "
    "holder→aggregator",
    "parties|plain time|HE time|HE/plain|HE Σenc|HE Σtag|HE sum|HE key holder|B/party plain|"
    "B/party HE|total plain|total HE|error plain|error HE",
)
TABLES = {  # per mode: title ({lr} filled in), caption, columns
    "exact": ("Exact mode (moments sum + masked normal equations sum + key-holder solve)", *_SUM),
    "gradient": ("Gradient mode, ONE round (gradient sum + key-holder decryption)", *_SUM),
    "encrypted_model": (
        "Encrypted-model mode, ONE round (broadcast, party steps, update, one refresh, final "
        "release sealed to the parties), lr={lr}",
        "time: aggregator encryption of w → final release (sealed; p0000 opens it), parties one "
        "after another; party: statistics + broadcast load + step; refresh: mask → key holder "
        "(KH: decrypt + re-encrypt) → unmask; B↓: aggregator→party (the broadcast); "
        "B↑: party→aggregator; B→KH, B←KH: aggregator→key holder and back, the refresh",
        "parties|plain time|HE time|HE/plain|HE party med|HE party Σ|HE update|HE refresh|"
        "HE KH refresh|HE release|B↓/party HE|B↑/party HE|B→KH HE|B←KH HE|error plain|error HE",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parties", default="10,100,1000", help="party counts (10,100,1000)")
    parser.add_argument("--features", type=int, default=20, help="features d (20)")
    parser.add_argument("--samples-per-party", type=int, default=100, help="samples (100)")
    parser.add_argument("--clip", type=float, default=10.0, help="gradient clip (10)")
    parser.add_argument("--lr", type=float, default=0.1, help="encrypted-model lr (0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_regression.json"))
    args = parser.parse_args(argv)
    args.parties = [int(p) for p in args.parties.split(",") if p.strip()]
    if not args.parties or min(args.parties) < 2:
        parser.error("--parties needs counts of at least 2 (the key holder's floor).")
    if args.features < 1 or args.samples_per_party < 2:
        parser.error("--features must be ≥ 1 and --samples-per-party ≥ 2.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=180)
    d, rng = args.features, np.random.default_rng(args.seed)
    coef = np.concatenate([[3.0], rng.normal(size=d)])  # intercept first
    scales, offsets = rng.uniform(0.1, 10.0, d), rng.uniform(-5.0, 5.0, d)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedhe-bench-regression-") as state_dir:
        keyholder = KeyHolder(state_dir)
        for n_parties in args.parties:
            data_rng = np.random.default_rng([args.seed, n_parties])
            n = n_parties * args.samples_per_party
            X = data_rng.normal(size=(n, d)) * scales + offsets
            y = coef[0] + X @ coef[1:] + data_rng.normal(scale=0.1, size=n)
            model = LinearRegression().fit(X, y)
            reference = np.concatenate([[model.intercept_], model.coef_])
            for mode in MODES:
                runs.append(run := _run(keyholder, mode, X, y, n_parties, reference, args))
                console.print(
                    f"{n_parties} parties, {mode}: exact {run['exact']['wall_s']:.2f} s, "
                    f"gradient round {run['gradient']['wall_s']:.2f} s, encrypted-model round "
                    f"{run['encrypted_model']['wall_s']:.2f} s"
                )
    report = {
        "benchmark": "encrypted vs plaintext linear regression, in process (no Flower)",
        "config": {
            "parties": args.parties,
            "features": d,
            "samples_per_party": args.samples_per_party,
            "clip": args.clip,
            "seed": args.seed,
            "gradient_rounds": 1,
            "ckks_params": AGGREGATION_PARAMS.to_dict(),
            "lr": args.lr,
            "model_ckks_params": MODEL_PARAMS.to_dict(),
        },
        "true_coefficients": coef.tolist(),
        "runs": runs,
        "comparison": _compare(runs),
        "machine": machine_info(),
    }
    _print(console, report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


def _run(
    keyholder: KeyHolder,
    mode: str,
    X: np.ndarray,
    y: np.ndarray,
    n_parties: int,
    reference: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, Any]:
    d, spp = X.shape[1], args.samples_per_party
    shares = [slice(i * spp, (i + 1) * spp) for i in range(n_parties)]
    job_id = f"bench-{mode}-{n_parties}"
    moments_layout, stats_layout = moments.layout(d + 1), linreg.statistics_layout(d)
    gradient_layout = aggregate.Layout(("gradient",), ((d + 1,),))
    declaration = aggregate.declare(
        job_id,
        outputs={
            moments.OUTPUT: (1, moments_layout),
            linreg.MASKED_OUTPUT: (1, stats_layout),
            linreg.GRADIENT_OUTPUT: (1, gradient_layout),
        },
        min_parties=n_parties,
        encrypted=mode == "he",
    )
    public = keyholder.declare_job(declaration)
    context = PublicContext.from_bytes(public) if public else None
    parties = _Parties(keyholder, job_id, [f"p{i:04d}" for i in range(n_parties)], context)

    def secure_sum(arrays_of, layout, output, bound, n_terms=1, scale_bits=None):
        phase: dict[str, Any] = {"local_s": [], "encrypt_s": [], "tag_s": [], "upload_bytes": []}
        encoding = {"sum_bound": bound, "min_scale_bits": scale_bits}
        contributions, tags = {}, {}
        for name, share in zip(parties.names, shares, strict=True):
            with _timed(phase, "local_s"):
                arrays = arrays_of(share)
            with _timed(phase, "encrypt_s"):
                contributions[name] = data = aggregate.party_contribution(
                    arrays, spp, layout, context, n_terms=n_terms, **encoding
                )
            with _timed(phase, "tag_s"):
                tags[name] = tag = parties.tag(name, output, data)  # b"": the twin tags nothing
            phase["upload_bytes"].append(len(data) + len(tag))
        with _timed(phase, "aggregate_s"):
            total = aggregate.aggregator_sum(
                contributions, layout, context, min_parties=n_parties, **encoding
            )
        del contributions
        relayed = {name: tags[name] for name in total.contributors} if context else {}
        with _timed(phase, "keyholder_s"):
            request = DecryptionRequest(
                job_id, output, total.contributors, total.tensor, tags=relayed
            )
            released = np.asarray(keyholder_release(keyholder, request))
        phase["sum_bytes"] = len(total.tensor) + sum(len(tag) for tag in relayed.values())
        phase["released_bytes"] = 8 * released.size
        if context is not None:
            level, bits = AGGREGATION_PARAMS.encoding_for(bound, scale_bits)
            phase["ckks_level"], phase["ckks_scale_bits"] = level, bits
        return released, _summary(phase)

    # (1) exact mode: moments secure sum, then the masked normal equations.
    XY = np.column_stack([X, y])
    started = time.perf_counter()
    flat, moments_phase = secure_sum(
        lambda s: moments.party_moments(XY[s]),
        moments_layout,
        moments.OUTPUT,
        moments.SUM_BOUND,
        n_terms=n_parties,
    )
    averaged, total_samples = aggregate.average_update(flat, moments_layout)
    standardizer = moments.Standardizer.from_moments(
        averaged["mean"], averaged["meansq"], with_target=True
    )
    left, right = linreg.masking_matrices(d + 1)
    bound = linreg.statistics_sum_bound(d, round(total_samples), 0.0)
    z, stats_phase = secure_sum(
        lambda s: linreg.party_masked_statistics(
            standardizer.features(X[s]), standardizer.target(y[s]), left, right
        ),
        stats_layout,
        linreg.MASKED_OUTPUT,
        bound,
        scale_bits=linreg.STATISTICS_SCALE_BITS,
    )
    coefficients = standardizer.to_original(linreg.unmask_coefficients(z, right))
    exact_s = time.perf_counter() - started
    err = np.abs(coefficients - reference) / np.maximum(np.abs(reference), 1e-12)
    phases = {"moments": moments_phase, "masked_statistics": stats_phase}
    exact = {
        "wall_s": exact_s,
        "phases": phases,
        **_totals(phases),
        "coef_max_rel_err": float(err.max()),
        "coefficients": coefficients.tolist(),
    }

    # (2) gradient mode: one round at w = 0 on the whole local data (no mini-batch).
    Z, t = standardizer.features(X), standardizer.target(y)
    w0 = np.zeros(d + 1)
    # each party's gradient carries its own fresh mask (the key holder sees only masked sums)
    grad_bound = linreg.gradient_sum_bound(round(total_samples), args.clip, n_parties)
    masks = linreg.gradient_masks(parties.names, d + 1, round(total_samples), args.clip)
    mask_of = dict(zip((s.start for s in shares), parties.names, strict=True))
    started = time.perf_counter()

    def masked_gradient(s: slice) -> dict[str, np.ndarray]:
        mean, n = linreg.party_gradient(Z[s], t[s], w0, clip=args.clip)
        return {"gradient": linreg.mask_gradient(mean, masks[mask_of[s.start]], n)}

    flat, grad_phase = secure_sum(
        masked_gradient, gradient_layout, linreg.GRADIENT_OUTPUT, grad_bound
    )
    flat = linreg.unmask_gradient_sum(flat, gradient_layout, masks, parties.names)
    gradient, _ = aggregate.average_update(flat, gradient_layout)
    gradient_s = time.perf_counter() - started
    pooled, _ = linreg.party_gradient(Z, t, w0, clip=np.inf)
    grad = {
        "wall_s": gradient_s,
        "phases": {"gradient": grad_phase},
        **_totals({"gradient": grad_phase}),
        "gradient_max_abs_err": float(np.max(np.abs(gradient["gradient"] - pooled))),
    }
    return {
        "parties": n_parties,
        "mode": mode,
        "samples": len(y),
        "public_context_bytes": len(public),
        "exact": exact,
        "gradient": grad,
        "encrypted_model": _encrypted_model(keyholder, mode, Z, t, shares, args.lr),
    }


def _encrypted_model(
    keyholder: KeyHolder, mode: str, Z: np.ndarray, t: np.ndarray, shares: list[slice], lr: float
) -> dict[str, Any]:
    """One round of the encrypted-model mode, as `aggregator/regression.py` strings it."""
    em, n_parties, dim = encrypted_model, len(shares), Z.shape[1] + 1
    job_id = f"bench-{mode}-{n_parties}-model"
    declaration = aggregate.declare(
        job_id,
        outputs={em.REFRESH_OUTPUT: (1, dim), em.MODEL_OUTPUT: (1, dim)},
        min_parties=n_parties,
        encrypted=mode == "he",
        params=MODEL_PARAMS,
    )
    public = keyholder.declare_job(declaration)  # keys: outside every timing
    context = PublicContext.from_bytes(public) if public else None
    # Registration, outside every timing too: the final model is sealed to these parties.
    parties = _Parties(keyholder, job_id, [f"p{i:04d}" for i in range(n_parties)], context)
    w0, step = np.zeros(dim), lr / len(t)
    out: dict[str, Any] = {"local_s": [], "step_s": [], "upload_bytes": []}
    contributions = {}
    started = time.perf_counter()
    with _timed(out, "aggregator_encrypt_s"):
        vector = em.encrypt_model(context, w0)
        blobs = [column.to_bytes() for column in em.broadcast(context, w0)]
    for name, share in zip(parties.names, shares, strict=True):
        with _timed(out, "local_s"):
            A, b = em.party_statistics(Z[share], t[share], logistic=False, l2=0.0)
        with _timed(out, "step_s"):
            model = em.load_broadcast(blobs, context, dim)
            contributions[name] = data = em.party_step(model, A, b, step).to_bytes()
        out["upload_bytes"].append(len(data))
    with _timed(out, "aggregate_s"):
        vector, contributors, _ = em.aggregator_update(
            vector, contributions, context, min_parties=n_parties
        )
    del contributions
    with _timed(out, "refresh_s"):
        masked, mask = em.aggregator_mask(vector)
        request = DecryptionRequest(job_id, em.REFRESH_OUTPUT, contributors, masked.to_bytes())
        with _timed(out, "refresh_keyholder_s"):
            payload = keyholder_release(keyholder, request)
        assert isinstance(payload, dict)
        vector, _ = em.aggregator_unmask(*em.unpack_refresh(payload, context, dim), mask)
    with _timed(out, "decrypt_s"):  # decryption, sealing to every party, p0000 opening its copy
        final = DecryptionRequest(job_id, em.MODEL_OUTPUT, contributors, vector.to_bytes())
        released = keyholder_release(keyholder, final)
        assert isinstance(released, dict)
        w = parties.released(released, em.MODEL_OUTPUT, parties.names[0])
    out["wall_s"] = time.perf_counter() - started
    Za = linreg.design(Z)
    reference = w0 - step * (Za.T @ (Za @ w0 - t))  # the same step on the pooled data
    party = [a + b for a, b in zip(out["local_s"], out["step_s"], strict=True)]
    out |= {
        "party_s_median": statistics.median(party),
        "party_s_total": sum(party),
        "broadcast_bytes_per_party": sum(len(blob) for blob in blobs),
        "refresh_to_keyholder_bytes": len(request.tensor),
        "refresh_from_keyholder_bytes": sum(len(blob) for blob in payload.values()),
        "decrypt_to_keyholder_bytes": len(final.tensor),
        "released_bytes": sum(len(blob) for blob in released.values()),
    }
    out = _summary(out, encrypt="step_s")
    out["broadcast_bytes_total"] = out["broadcast_bytes_per_party"] * n_parties
    out["bytes_total"] = sum(out[f"{k}_bytes_total"] for k in ("broadcast", "upload")) + sum(
        out[f"{k}_bytes"] for k in MODEL_BYTES
    )
    out["public_context_bytes"], out["w"] = len(public), w.tolist()
    out["w_max_abs_err"] = float(np.max(np.abs(w - reference)))
    return out


class _Parties:
    """The parties' side of `clients/trust.py`, in process, for one job: registration (each
    party's sealed seed → the key holder's envelope → the job's MAC seed), a sealed tag per
    contribution, and opening what the key holder sealed to a party. A plaintext twin
    (`context` None) registers and tags nothing."""

    def __init__(
        self, keyholder: KeyHolder, job_id: str, names: list[str], context: PublicContext | None
    ) -> None:
        self.keyholder, self.job_id, self.names, self.context = keyholder, job_id, names, context
        self.identities = {name: Identity.generate() for name in names}
        self.mac_keys: dict[str, MacKey] = {}
        if context is None:
            return
        own = {name: os.urandom(MAC_SEED_BYTES) for name in names}
        sealed = {
            name: self.channel(name).seal(own[name], registry.mac_seed_label(job_id, name))
            for name in names
        }
        publics = {name: identity.public for name, identity in self.identities.items()}
        envelopes, refused = keyholder.register_parties(job_id, publics, sealed)
        if refused:
            raise RuntimeError(f"the key holder refused parties at registration: {refused}")
        for name in names:
            seed = registry.party_mac_seed(
                self.channel(name), job_id, name, envelopes[name], own[name]
            )
            self.mac_keys[name] = MacKey(seed)

    def channel(self, name: str) -> Channel:
        return self.identities[name].channel(self.keyholder.identity.public, self.job_id)

    def tag(self, name: str, output: str, contribution: bytes, round_: int = 0) -> bytes:
        """The party's tag of its contribution for (output, round), sealed to the key holder."""
        if self.context is None:
            return b""
        tensor = load_tensor(contribution, self.context)
        assert isinstance(tensor, EncryptedTensor)
        value = self.mac_keys[name].tag(tensor, mac_label(output, round_))
        label = registry.tag_label(self.job_id, output, round_, name)
        return self.channel(name).seal(json.dumps(value.to_dict()).encode(), label)

    def released(
        self, release: dict[str, bytes], output: str, name: str, round_: int = 0
    ) -> np.ndarray:
        """What party `name` reads: its sealed copy (the twin's values come in the clear)."""
        if "values" in release:
            return np.load(io.BytesIO(release["values"]), allow_pickle=False)
        sealed = release[f"sealed/{name}"]
        return registry.open_release(self.channel(name), self.job_id, output, round_, name, sealed)


@contextmanager
def _timed(into: dict[str, Any], key: str) -> Iterator[None]:
    """Time the block into `into[key]`: appended when that is a list, else set."""
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    if isinstance(into.get(key), list):
        into[key].append(elapsed)
    else:
        into[key] = elapsed


def _summary(phase: dict[str, Any], encrypt: str = "encrypt_s") -> dict[str, Any]:
    """Per-party lists → median and total (upload bytes: median per party and total)."""
    local, enc, up = phase.pop("local_s"), phase.pop(encrypt), phase.pop("upload_bytes")
    tagged = {}
    if "tag_s" in phase:
        tag = phase.pop("tag_s")
        tagged = {"tag_s_median": statistics.median(tag), "tag_s_total": sum(tag)}
    return {
        "local_s_median": statistics.median(local),
        "local_s_total": sum(local),
        f"{encrypt}_median": statistics.median(enc),
        f"{encrypt}_total": sum(enc),
        **tagged,
        "upload_bytes_per_party": int(statistics.median(up)),
        "upload_bytes_total": sum(up),
        **phase,
    }


def _totals(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sums over the phases of one mode (medians: the sum of the per-phase medians)."""
    keys = ("encrypt_s_median", "encrypt_s_total", "tag_s_total", "aggregate_s", "keyholder_s")
    out: dict[str, Any] = {k: sum(p[k] for p in phases.values()) for k in keys}
    for key, name in BYTES.items():
        out[name] = int(sum(p[key] for p in phases.values()))
    out["bytes_total"] = sum(out[k] for k in list(BYTES.values())[1:])  # all but per party
    return out


def _compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HE/plaintext ratios and both modes' errors, per party count and mode."""
    by = {(r["parties"], r["mode"]): r for r in runs}
    out = []
    for n in sorted({r["parties"] for r in runs}):
        entry: dict[str, Any] = {"parties": n}
        for kind, err in ERRORS.items():
            ratios = MODEL_RATIOS if kind == "encrypted_model" else RATIOS
            p, h = by[(n, "plaintext")][kind], by[(n, "he")][kind]
            entry[kind] = {f"{k}_ratio": h[k] / p[k] for k in ratios}
            entry[kind][err] = {"plaintext": p[err], "he": h[err]}
        out.append(entry)
    return out


def _print(console: Console, report: dict[str, Any]) -> None:
    config = report["config"]
    by = {(r["parties"], r["mode"]): r for r in report["runs"]}
    setting = f"d={config['features']}, {config['samples_per_party']} samples/party, in process"
    for kind, (title, caption, columns) in TABLES.items():
        rows = [_row(kind, n, by[(n, "plaintext")], by[(n, "he")]) for n in config["parties"]]
        title = f"{title.format(lr=config['lr'])}: {setting}"
        console.print(_table(title, caption, columns, rows))
    he = next(r for r in report["runs"] if r["mode"] == "he")
    console.print(
        f"error: exact = max relative coefficient error vs sklearn LinearRegression on the "
        f"pooled data; gradient = max |averaged gradient − pooled gradient|; encrypted model = "
        f"max |w − the same step in numpy on the pooled data|. Public context (once per job): "
        f"{fmt_bytes(he['public_context_bytes'])}, CKKS {config['ckks_params']}; encrypted model: "
        f"{fmt_bytes(he['encrypted_model']['public_context_bytes'])}, CKKS "
        f"{config['model_ckks_params']}; machine: {report['machine']['cpu_count']} CPUs, shared."
    )


def _row(kind: str, n: int, plain: dict[str, Any], he: dict[str, Any]) -> list[str]:
    p, h = plain[kind], he[kind]
    if kind == "encrypted_model":
        times = ("party_s_median", "party_s_total", "aggregate_s", "refresh_s")
        times += ("refresh_keyholder_s", "decrypt_s")
        sizes = [fmt_bytes(h[f"{k}_bytes_per_party"]) for k in ("broadcast", "upload")]
        sizes += [fmt_bytes(h[f"refresh_{k}_keyholder_bytes"]) for k in ("to", "from")]
    else:
        times = ("encrypt_s_total", "tag_s_total", "aggregate_s", "keyholder_s")
        sizes = [fmt_bytes(m[k]) for k in ("upload_bytes_per_party", "bytes_total") for m in (p, h)]
    ratio = f"{h['wall_s'] / p['wall_s']:.1f}×"
    return [
        str(n),
        *(fmt_time(m["wall_s"]) for m in (p, h)),
        ratio,
        *(fmt_time(h[k]) for k in times),
        *sizes,
        *(f"{m[ERRORS[kind]]:.1e}" for m in (p, h)),
    ]


def _table(title: str, caption: str, columns: str, rows: list[list[str]]) -> Table:
    table = Table(title=title, caption=caption)
    for column in columns.split("|"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


if __name__ == "__main__":
    raise SystemExit(main())
