"""HE-FedAvg over Flower: the aggregator's side of `fedhe.tasks.aggregate`, round by round.

Per job: declare it to the key holder (which makes keys), hand the public context to the
parties, compute global feature moments by one secure sum (so features are standardized
without any party's mean leaking), then `rounds` of local training + secure aggregation.
The same function runs the plaintext twin with `encrypted=False`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedhe import protocol
from fedhe.aggregator.roles import Federation
from fedhe.aggregator.session import Exchange, Session
from fedhe.config import JobConfig
from fedhe.crypto import AGGREGATION_PARAMS, PublicContext
from fedhe.data.datasets import Dataset
from fedhe.data.sources import DataSource
from fedhe.errors import ProtocolError
from fedhe.learning import ModelSpec, build_model, evaluate, get_weights, set_weights, standardize
from fedhe.progress import progress
from fedhe.tasks import aggregate

log = logging.getLogger("fedhe.aggregator")

MOMENTS = "feature_moments"
# Bound on Σ n_i·x and Σ n_i·x² over all parties (~1e15): two primes at scale 2^53 hold it.
MOMENTS_SUM_BOUND = 2.0**50


@dataclass
class JobRun:
    """What one run of the job produced: metrics per round, timings, bytes, audit."""

    job_id: str
    encrypted: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    contributors: list[dict[str, Any]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class FedAvgJob:
    """Drives one HE-FedAvg job (or its plaintext twin) with the nodes of `federation`."""

    def __init__(
        self,
        session: Session,
        federation: Federation,
        config: JobConfig,
        source: DataSource,
        test: Dataset,
        *,
        encrypted: bool,
        job_id: str,
    ) -> None:
        self.session = session
        self.federation = federation
        self.config = config
        self.source = source
        self.test = test
        self.run = JobRun(job_id, encrypted)
        self.parties = dict(federation.parties)
        self.context: PublicContext | None = None
        self.public_bytes = b""
        self.update_bound = 0.0  # clip·Σn_i, known once the moments sum is decrypted
        self.spec = ModelSpec(test.n_features, max(test.n_classes, 2), config.hidden_widths)
        self.model = build_model(self.spec, seed=config.seed)
        self.layout = aggregate.Layout.of(get_weights(self.model))
        self.moments_layout = aggregate.Layout.of([np.zeros(test.n_features)] * 2)

    def execute(self) -> JobRun:
        started = time.perf_counter()
        self._declare()
        self._setup_parties()
        mean, meansq, total_samples = self._feature_moments()
        self.update_bound = total_samples * self.config.clip
        test_X = standardize(self.test.X, mean, meansq)
        kind = "encrypted" if self.run.encrypted else "plaintext twin"
        with progress(self.config.rounds, f"{kind}: rounds") as advance:
            for round_number in range(1, self.config.rounds + 1):
                round_started = time.perf_counter()
                self._train_round(round_number, mean, meansq)
                metrics = evaluate(self.model, test_X, self.test.y)
                self.run.history[-1].update(metrics, round_s=time.perf_counter() - round_started)
                log.info("%s round %d: %s", self.run.job_id, round_number, self.run.history[-1])
                advance(f"{kind}: round {round_number}, accuracy {metrics['accuracy']:.3f}")
        self.run.weights = get_weights(self.model)
        self.run.audit = self._fetch_audit()
        self.run.timings_s["total"] = time.perf_counter() - started
        self.run.bytes = dict(self.session.bytes)
        return self.run

    # -- phases ---------------------------------------------------------------------------------

    def _declare(self) -> None:
        declaration = aggregate.declare(
            self.run.job_id,
            outputs={
                MOMENTS: (1, self.moments_layout),
                aggregate.OUTPUT: (self.config.rounds, self.layout),
            },
            min_parties=self.config.min_parties,
            encrypted=self.run.encrypted,
            params=AGGREGATION_PARAMS,
        )
        exchange = self._ask_keyholder(
            protocol.DECLARE,
            protocol.content(config={"declaration": declaration.to_dict(), "keys": {}}),
        )
        self.run.timings_s["keygen"] += protocol.metrics_of(exchange)["keygen-s"]
        public = protocol.payload_of(exchange)["public-context"]
        # The aggregator, like every party, accepts only a public context (raises on a secret key).
        self.context = PublicContext.from_bytes(public) if public else None
        self.public_bytes = public

    def _setup_parties(self) -> None:
        contents = {
            name: protocol.content(
                config={
                    "job-id": self.run.job_id,
                    "source": self.source.to_dict(),
                    "party-index": index,
                    "n-parties": len(self.parties),
                },
                payload={"public-context": self.public_bytes},
            )
            for index, name in enumerate(self.parties)
        }
        exchange = self.session.ask(self.parties, protocol.SETUP, contents, role="party")
        self._exclude(exchange.failures, "setup")
        self._require_quorum("setup")

    def _feature_moments(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Global E[x], E[x²] and Σn_i by one secure sum: no party's own statistics leak."""
        exchange = self.session.ask(
            self.parties,
            protocol.MOMENTS,
            protocol.content(config={"job-id": self.run.job_id, "sum-bound": MOMENTS_SUM_BOUND}),
            role="party",
        )
        self._exclude(exchange.failures, "moments")
        self._require_quorum("moments")
        flat = self._secure_sum(exchange, self.moments_layout, MOMENTS, MOMENTS_SUM_BOUND)
        averaged, total_samples = aggregate.average_update(flat, self.moments_layout)
        return averaged["0"], averaged["1"], round(total_samples)

    def _train_round(self, round_number: int, mean: np.ndarray, meansq: np.ndarray) -> None:
        config = {
            "job-id": self.run.job_id,
            "round": round_number,
            "seed": self.config.seed,
            "epochs": self.config.local_epochs,
            "batch-size": self.config.batch_size,
            "lr": self.config.lr,
            "model": self.spec.to_dict(),
            "mean": mean.tolist(),
            "meansq": meansq.tolist(),
            "fail-party": self.config.drop_party,
            "clip": self.config.clip,
            "sum-bound": self.update_bound,
        }
        weights = get_weights(self.model)
        exchange = self.session.ask(
            self.parties,
            protocol.TRAIN,
            protocol.content(config=config, weights=weights),
            role="party",
        )
        flat = self._secure_sum(exchange, self.layout, aggregate.OUTPUT, self.update_bound)
        update, total_samples = aggregate.average_update(flat, self.layout)
        set_weights(self.model, {k: weights[k] + update[k] for k in weights})
        party_metrics = [protocol.metrics_of(r) for r in exchange.replies.values()]
        self.run.timings_s["train"] += max(m.get("train-s", 0.0) for m in party_metrics)
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
            }
        )

    # -- secure sum over whatever arrived ------------------------------------------------

    def _secure_sum(
        self, exchange: Exchange, layout: aggregate.Layout, output: str, sum_bound: float
    ) -> np.ndarray:
        contributions = {
            name: protocol.payload_of(reply)["contribution"]
            for name, reply in exchange.replies.items()
        }
        reported = [protocol.metrics_of(r) for r in exchange.replies.values()]
        self.run.timings_s["encrypt"] += max(
            (m.get("encrypt-s", 0.0) for m in reported), default=0.0
        )
        self.run.timings_s["transfer"] += max(
            0.0,
            exchange.wall_s
            - max((m.get("encrypt-s", 0) + m.get("train-s", 0) for m in reported), default=0.0),
        )
        started = time.perf_counter()
        total = aggregate.aggregator_sum(
            contributions,
            layout,
            self.context,
            sum_bound=sum_bound,
            min_parties=self.config.min_parties,
        )
        self.run.timings_s["compute"] += time.perf_counter() - started
        for name, reason in total.rejected.items():
            self.run.excluded.setdefault(name, f"{output}: {reason}")
        self.run.contributors.append({"output": output, "parties": sorted(total.contributors)})
        request = aggregate.request_decryption(self.run.job_id, total, output)
        reply = self._ask_keyholder(
            protocol.DECRYPT,
            protocol.content(
                config={
                    "job-id": request.job_id,
                    "output": request.output_kind,
                    "contributors": list(request.contributors),
                },
                payload={"tensor": request.tensor},
            ),
        )
        self.run.timings_s["decrypt"] += protocol.metrics_of(reply)["decrypt-s"]
        return protocol.array_from_bytes(protocol.payload_of(reply)["values"])

    # -- helpers ----------------------------------------------------------------------

    def _ask_keyholder(self, message_type: str, content: RecordDict) -> RecordDict:
        """The job cannot go on without the key holder: a refusal or silence stops it."""
        exchange = self.session.ask(
            {"keyholder": self.federation.keyholder}, message_type, content, role="keyholder"
        )
        if "keyholder" not in exchange.replies:
            raise ProtocolError(
                f"key holder refused or failed {message_type}: "
                f"{exchange.failures.get('keyholder')}"
            )
        return exchange.replies["keyholder"]

    def _fetch_audit(self) -> list[dict[str, Any]]:
        reply = self._ask_keyholder(
            protocol.AUDIT, protocol.content(config={"job-id": self.run.job_id})
        )
        return json.loads(protocol.config_of(reply)["entries"])

    def _exclude(self, failures: dict[str, str], phase: str) -> None:
        for name, reason in failures.items():
            self.run.excluded[name] = f"{phase}: {reason}"
            self.parties.pop(name, None)

    def _require_quorum(self, phase: str) -> None:
        if len(self.parties) < self.config.min_parties:
            raise ProtocolError(
                f"after {phase}, {len(self.parties)} parties remain, fewer than "
                f"min_parties={self.config.min_parties}; excluded: {self.run.excluded}"
            )
