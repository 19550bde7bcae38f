"""Encrypted (CKKS) linear regression against its plaintext twin for many parties, in process
(no Flower): exact mode end to end, one gradient round and one encrypted-model round per party
count, timed per phase, with bytes and errors. Methods: simulations/README.md.
Run: python simulations/bench_regression.py [--parties 10,100,1000]"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
import numpy as np
from _bench import timed
from rich.console import Console
from sklearn.linear_model import LinearRegression

from fedhe.crypto import AGGREGATION_PARAMS, MODEL_PARAMS, PublicContext
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench.command_line(__doc__, "runs/bench_regression.json")
    add = parser.add_argument
    add("--parties", default="10,100,1000", help="party counts (10,100,1000)")
    add("--features", type=int, default=20, help="features d (20)")
    add("--samples-per-party", type=int, default=100, help="samples (100)")
    add("--clip", type=float, default=10.0, help="gradient clip (10)")
    add("--lr", type=float, default=0.1, help="encrypted-model lr (0.1)")
    add("--seed", type=int, default=0)
    args = bench.parse(parser, argv)
    args.parties = bench.int_list(args.parties)
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
                walls = ", ".join(f"{k} {run[k]['wall_s']:.2f} s" for k in ERRORS)
                console.print(f"{n_parties} parties, {mode}: {walls}")
    config = {"parties": args.parties, "features": d, "samples_per_party": args.samples_per_party}
    config |= {"clip": args.clip, "seed": args.seed, "gradient_rounds": 1}
    config |= {"ckks_params": AGGREGATION_PARAMS.to_dict(), "lr": args.lr}
    report = {
        "benchmark": "encrypted vs plaintext linear regression, in process (no Flower)",
        "config": {**config, "model_ckks_params": MODEL_PARAMS.to_dict()},
        "true_coefficients": coef.tolist(),
        "runs": runs,
        "comparison": _compare(runs),
        "machine": bench.machine_info(),
    }
    bench.write_json(args.out, report, console)
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
    parties = registered(keyholder, job_id, n_parties)

    def secure_sum(arrays_of, layout, output, bound, n_terms=1, scale_bits=None):
        phase: dict[str, Any] = {"local_s": [], "encrypt_s": [], "tag_s": [], "upload_bytes": []}
        encoding = {"sum_bound": bound, "min_scale_bits": scale_bits}
        contributions, tags = {}, {}
        for name, share in zip(parties.names, shares, strict=True):
            with timed(phase, "local_s"):
                arrays = arrays_of(share)
            with timed(phase, "encrypt_s"):
                contributions[name] = data = aggregate.party_contribution(
                    arrays, spp, layout, context, n_terms=n_terms, **encoding
                )
            with timed(phase, "tag_s"):  # the twin tags nothing
                tags[name] = tag = parties.tag(name, output, data) if context is not None else b""
            phase["upload_bytes"].append(len(data) + len(tag))
        with timed(phase, "aggregate_s"):
            total = aggregate.aggregator_sum(
                contributions, layout, context, min_parties=n_parties, **encoding
            )
        del contributions
        relayed = {name: tags[name] for name in total.contributors} if context else {}
        with timed(phase, "keyholder_s"):
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
    parties = registered(keyholder, job_id, n_parties)
    w0, step = np.zeros(dim), lr / len(t)
    out: dict[str, Any] = {"local_s": [], "step_s": [], "upload_bytes": []}
    contributions = {}
    started = time.perf_counter()
    with timed(out, "aggregator_encrypt_s"):
        vector = em.encrypt_model(context, w0)
        blobs = [column.to_bytes() for column in em.broadcast(context, w0)]
    for name, share in zip(parties.names, shares, strict=True):
        with timed(out, "local_s"):
            A, b = em.party_statistics(Z[share], t[share], logistic=False, l2=0.0)
        with timed(out, "step_s"):
            model = em.load_broadcast(blobs, context, dim)
            contributions[name] = data = em.party_step(model, A, b, step).to_bytes()
        out["upload_bytes"].append(len(data))
    with timed(out, "aggregate_s"):
        vector, contributors, _ = em.aggregator_update(
            vector, contributions, context, min_parties=n_parties
        )
    del contributions
    with timed(out, "refresh_s"):
        masked, mask = em.aggregator_mask(vector)
        request = DecryptionRequest(job_id, em.REFRESH_OUTPUT, contributors, masked.to_bytes())
        with timed(out, "refresh_keyholder_s"):
            payload = keyholder_release(keyholder, request)
        assert isinstance(payload, dict)
        vector, _ = em.aggregator_unmask(*em.unpack_refresh(payload, context, dim), mask)
    with timed(out, "decrypt_s"):  # decryption, sealing to every party, p0000 opening its copy
        final = DecryptionRequest(job_id, em.MODEL_OUTPUT, contributors, vector.to_bytes())
        released = keyholder_release(keyholder, final)
        assert isinstance(released, dict)
        w = parties.released(released, em.MODEL_OUTPUT, 0, parties.names[0])
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


def registered(keyholder: KeyHolder, job_id: str, n_parties: int) -> TaggedParties:
    """The job's parties p0000, p0001, …, registered with the key holder."""
    return bench.register(keyholder, job_id, [f"p{i:04d}" for i in range(n_parties)])[0]


def _summary(phase: dict[str, Any], encrypt: str = "encrypt_s") -> dict[str, Any]:
    """Per-party lists → median and total (upload bytes: median per party and total)."""
    timed_keys = [key for key in ("local_s", encrypt, "tag_s") if key in phase]
    out = {k: v for key in timed_keys for k, v in bench.stats(key, phase.pop(key)).items()}
    uploads = phase.pop("upload_bytes")
    out |= {"upload_bytes_per_party": int(statistics.median(uploads))}
    return {**out, "upload_bytes_total": sum(uploads), **phase}


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


if __name__ == "__main__":
    raise SystemExit(main())
