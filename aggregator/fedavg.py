"""HE-FedAvg over Flower: the aggregator's side of `fedhe.tasks.aggregate`, round by round.

After the common steps (declare, party setup) and one secure sum of feature moments, `rounds`
of local torch training + secure aggregation of ``nᵢ·clip(Δwᵢ)``. The plaintext twin is the
same class with `encrypted=False`.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fedhe import protocol
from fedhe.aggregator.job import Job, contribution_settings
from fedhe.config import ConfigError
from fedhe.learning import ModelSpec, build_model, evaluate, get_weights, set_weights
from fedhe.progress import progress
from fedhe.tasks import aggregate, moments

# What the timings leave out (result.json's "timings_note"): each party process trains tiny
# models once before it times any training (clients.party.warm_up_training).
TIMINGS_NOTE = (
    "train excludes torch's one-time warm-up (each party process trains two tiny models "
    "before timing any training), so the encrypted run and its plaintext twin are timed alike; "
    "Python, Ray and node start-up are outside every timing"
)

log = logging.getLogger("fedhe.aggregator")


class FedAvgJob(Job):
    """Federated averaging of a small torch model on encrypted, sample-weighted updates."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spec = ModelSpec(
            self.test.n_features,
            max(self.test.n_classes, 2),
            self.config.hidden_widths,
            self.config.activation_name,
        )
        self.model = build_model(self.spec, seed=self.config.seed)
        self.layout = aggregate.Layout.of(get_weights(self.model))

    def outputs(self) -> dict[str, tuple[int, aggregate.Layout]]:
        return {
            moments.OUTPUT: (1, self.moments_layout(self.test.n_features)),
            aggregate.OUTPUT: (self.config.rounds, self.layout),
        }

    def phases(self) -> None:
        checkpoint = self.resumable()
        if checkpoint is None:
            standardizer, total_samples = self.feature_moments()
            first_round = 1
        else:  # the moments' budget is spent: take them from the checkpoint
            standardizer = moments.Standardizer.from_dict(checkpoint.standardizer)
            total_samples, first_round = checkpoint.total_samples, checkpoint.round + 1
            set_weights(self.model, checkpoint.weights)
        self.standardizer = standardizer
        self.run.model.update(standardizer=standardizer.to_dict(), spec=self.spec.to_dict())
        # |Δw| ≤ clip ⇒ |Σ nᵢΔwᵢ| ≤ clip·Σnᵢ
        update_bound = total_samples * self.config.training.clip
        self.packing = self._update_packing(update_bound, total_samples)
        test_X = standardizer.features(self.test.X)
        kind = "encrypted" if self.run.encrypted else "plaintext twin"
        with progress(self.config.rounds, f"{kind}: rounds") as advance:
            for round_number in range(first_round, self.config.rounds + 1):
                started = time.perf_counter()
                self._train_round(round_number, standardizer, update_bound)
                # A coordinator without test rows leaves evaluation to the sites that opt in.
                metrics = evaluate(self.model, test_X, self.test.y) if self.evaluates else {}
                self.run.history[-1].update(metrics, round_s=time.perf_counter() - started)
                log.info("%s round %d: %s", self.run.job_id, round_number, self.run.history[-1])
                self.save_checkpoint(
                    round=round_number,
                    standardizer=standardizer.to_dict(),
                    total_samples=total_samples,
                    weights=get_weights(self.model),
                )
                accuracy = f", accuracy {metrics['accuracy']:.3f}" if metrics else ""
                advance(f"{kind}: round {round_number}{accuracy}")
        self.run.weights = get_weights(self.model)

    def _update_packing(self, update_bound: float, total_samples: float) -> str:
        """How the updates sit in the ciphertexts (`--packing`; auto: quantized while its
        rounding is small for this federation), reported in result.json."""
        if self.context is None:
            return aggregate.COMPLEX  # the twin sends float64 whatever the packing
        if self.group is not None:
            # Quantized lanes decode by rounding, with guard bits sized for encryption noise;
            # a group's decryption shares each add smudging noise far above it.
            if self.config.fedavg.packing == aggregate.QUANTIZED:
                raise ConfigError(
                    "quantized packing cannot absorb a key-holder group's smudging noise; use "
                    "--packing complex (or auto) with --keyholders > 1."
                )
            self.run.extras["update_packing"] = aggregate.COMPLEX
            return aggregate.COMPLEX
        packing = aggregate.choose_packing(
            self.config.fedavg.packing,
            self.layout,
            self.context.params,
            sum_bound=update_bound,
            parties=len(self.parties),
            total_samples=total_samples,
        )
        self.run.extras["update_packing"] = packing
        log.info("%s: model updates use %s packing", self.run.job_id, packing)
        return packing

    def _train_round(
        self, round_number: int, standardizer: moments.Standardizer, update_bound: float
    ) -> None:
        weights = get_weights(self.model)
        exchange = self.ask_parties(
            protocol.TRAIN,
            {
                "round": round_number,
                "seed": self.config.seed,
                "epochs": self.config.fedavg.local_epochs,
                "batch-size": self.config.training.batch_size,
                "lr": self.config.training.lr,
                "optimizer": self.config.fedavg.optimizer,
                "model": self.spec.to_dict(),
                "standardizer": standardizer.to_dict(),
                "fail-party": self.config.drop_party,
                "clip": self.config.training.clip,
                "sum-bound": update_bound,
                "packing": self.packing,
                "lane-terms": len(self.parties),
                **contribution_settings(aggregate.OUTPUT, round_number - 1),
            },
            weights=weights,
        )
        flat = self.secure_sum(
            exchange,
            self.layout,
            aggregate.OUTPUT,
            update_bound,
            packing=self.packing,
            parties=len(self.parties),
            round_=round_number - 1,
        )
        update, total_samples = aggregate.average_update(flat, self.layout)
        set_weights(self.model, {k: weights[k] + update[k] for k in weights})
        party_metrics = [protocol.metrics_of(r) for r in exchange.replies.values()]
        quantization = {}
        if self.context is not None and self.packing == aggregate.QUANTIZED:
            quantization["quantization_bound"] = aggregate.quantization_error_bound(
                self.layout,
                self.context.params,
                sum_bound=update_bound,
                parties=len(self.parties),
                total_samples=total_samples,
            )
        self.run.timings_s["train"] += max(m.get("train-s", 0.0) for m in party_metrics)
        self.run.extras["timings_note"] = TIMINGS_NOTE
        self.run.history.append(
            {
                "round": round_number,
                "parties": len(self.run.contributors[-1]["parties"]),
                "train_loss": float(
                    np.average(
                        [m["train-loss"] for m in party_metrics],
                        weights=[m["n-samples"] for m in party_metrics],
                    )
                ),
                "samples": round(total_samples),
                "dropped": dict(exchange.failures),
                **quantization,
            }
        )
        self.note_dropped(exchange.failures, f"round {round_number}")
