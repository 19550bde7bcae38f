"""MLP over Flower: HE-FedAvg training (`FedAvgJob`), then inference on encrypted inputs.

The inference is a job of its own at the key holder (`mlp-inference`): parameters derived from
the trained network's depth, a relinearization key and rotation keys for exactly the
single-sample path's steps. The querier party gets the public key only; the aggregator
evaluates the released model on the querier's ciphertexts; the key holder decrypts logits
masked by the querier; the querier unmasks and (in this evaluation run) reports the logits.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from fedhe import protocol
from fedhe.aggregator.fedavg import FedAvgJob
from fedhe.config import querier_party
from fedhe.crypto import CKKSParams, KeyRequest, PublicContext
from fedhe.data.datasets import load_builtin
from fedhe.errors import FedHEError
from fedhe.learning import TrainConfig, build_model, evaluate, local_train
from fedhe.tasks import aggregate, mlp, scores

log = logging.getLogger("fedhe.aggregator")


class MLPJob(FedAvgJob):
    """`mlp`: federated training of a polynomial-activation MLP, then encrypted inference."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # by index, or by the name the user knows it by (a deployment: its site name)
        self.querier = querier_party(self.config.inference.querier, self.run.names)
        self.test_X = None
        self.inference_releases = 0  # one release label per logits batch or sample

    @property
    def n_queries(self) -> int:
        """Test rows the querier holds (it said so at setup; at most `queries` of them are
        asked); the rows themselves stay there."""
        held = self.queries.get(self.querier, 0)
        return min(held, self.config.inference.queries or held)

    def phases(self) -> None:
        # A network too deep for any 128-bit parameter set is refused before training.
        mlp.activation(self.spec.activation)
        mlp.inference_params(mlp.depth_of(len(self.spec.hidden)))
        super().phases()
        self.test_X = self.standardizer.features(self.test.X)
        if self.run.encrypted:  # the twin trains the same model in the clear; nothing to infer
            self.run.extras["central"] = self._central_baseline()
            self.run.extras["inference"] = self._inference()

    # -- inference -----------------------------------------------------------------------------

    def _inference(self) -> dict[str, Any]:
        model = mlp.HEModel.from_weights(self.run.weights, self.spec.activation)
        params = model.params()  # a network too deep is refused here, before any encryption
        slots = params.slots
        single = self._single_layout(model, slots)
        inference_id = f"{self.run.job_id}-inference"
        context = self._declare_inference(model, params, single, inference_id)
        contributors = self.run.contributors[-1]["parties"]
        report: dict[str, Any] = {
            "ckks": {**params.to_dict(), "slots": slots, "depth": model.depth},
            "activation": self.spec.activation,
            "querier": self.name_of(self.querier),
            "context_bytes": {
                "aggregator": len(context.to_bytes()),
                "querier": len(context.encryption_only().to_bytes()),
            },
        }
        counts, batched = self._batched(model, context, inference_id, contributors)
        report["batched"] = batched
        report.update(self._compare(counts))
        if single is not None and self.config.mlp.single_queries:
            report["single"] = self._single(model, context, inference_id, contributors, single)
        else:
            report["single"] = {"skipped": "the network does not fit the single-sample layout"}
        return report

    def _single_layout(self, model: mlp.HEModel, slots: int) -> mlp.SingleLayout | None:
        try:
            return model.single_layout(slots)
        except FedHEError as err:
            log.info("single-sample path skipped: %s", err)
            return None

    def _declare_inference(
        self,
        model: mlp.HEModel,
        params: CKKSParams,
        single: mlp.SingleLayout | None,
        inference_id: str,
    ) -> PublicContext:
        n_batches = math.ceil(self.n_queries / params.slots)
        declaration = aggregate.declare(
            inference_id,
            outputs={mlp.OUTPUT: (n_batches + self.config.mlp.single_queries, None)},
            min_parties=self.config.min_parties,
            params=params,
            task=mlp.INFERENCE_TASK,
            # The logits are sealed to the querier, registered with the training job.
            meta={"querier": self.querier, "parent": self.run.job_id},
        )
        keys = KeyRequest(relin=True, rotations=single.steps if single else ())
        if self.group is not None:  # the inference key is made by the same key-holder group
            started = time.perf_counter()
            public = self.group.declare(declaration, keys)
            self.later_jobs.append(inference_id)
            self.run.timings_s["keygen"] += time.perf_counter() - started
            return PublicContext.from_bytes(public)
        reply = self.ask_keyholder(
            protocol.DECLARE,
            protocol.content(
                protocol.DECLARE,
                protocol.REQUEST,
                config={"declaration": declaration.to_dict(), "keys": keys.to_dict()},
            ),
        )
        self.later_jobs.append(inference_id)
        self.run.timings_s["keygen"] += protocol.metrics_of(reply)["keygen-s"]
        return PublicContext.from_bytes(protocol.payload_of(reply)["public-context"])

    def _batched(
        self, model: mlp.HEModel, context: PublicContext, job_id: str, contributors: list[str]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        width = context.params.slots
        counts, compute, wall = [], 0.0, 0.0
        for start in range(0, self.n_queries, width):
            stop = min(start + width, self.n_queries)
            began = time.perf_counter()
            batch, seconds = self._ask(model, context, job_id, contributors, "batched", start, stop)
            wall += time.perf_counter() - began
            compute += seconds
            counts.append(batch)
        n = self.n_queries
        capacity = math.ceil(n / width) * width  # a batch costs the same however full it is
        return counts, {
            "samples": n,
            "capacity": capacity,
            "aggregator_compute_s": compute,
            "samples_per_s": n / compute,
            "samples_per_s_at_capacity": capacity / compute,
            "wall_s": wall,
        }

    def _single(
        self,
        model: mlp.HEModel,
        context: PublicContext,
        job_id: str,
        contributors: list[str],
        layout: mlp.SingleLayout,
    ) -> dict[str, Any]:
        count = min(self.config.mlp.single_queries, self.n_queries)
        counts, compute, wall = [], [], []
        for index in range(count):
            began = time.perf_counter()
            sample, seconds = self._ask(
                model, context, job_id, contributors, "single", index, index + 1
            )
            wall.append(time.perf_counter() - began)
            compute.append(seconds)
            counts.append(sample)
        return {
            "samples": count,
            "rotation_steps": list(layout.steps),
            "aggregator_compute_s_median": float(np.median(compute)),
            "round_trip_s_median": float(np.median(wall)),
            **{k: v for k, v in self._compare(counts).items() if k == "max_abs_logit_error"},
        }

    def _ask(
        self,
        model: mlp.HEModel,
        context: PublicContext,
        job_id: str,
        contributors: list[str],
        mode: str,
        start: int,
        stop: int,
    ) -> tuple[dict[str, float], float]:
        """One querier round trip: Enc(x), Enc(ρ) → evaluate → release (sealed to the
        querier) → the querier's counts, if it reports them."""
        settings = {
            "inference-id": job_id,
            "mode": mode,
            "start": start,
            "stop": stop,
            "standardizer": self.standardizer.to_dict(),
            "hidden": model.layers[0][0].shape[0],
            "n-outputs": model.n_outputs,
        }
        asked = self.ask_party(
            self.querier,
            protocol.MLP_QUERY,
            settings,
            payload={"public-context": context.encryption_only().to_bytes()},
        )
        payload = protocol.payload_of(asked)
        started = time.perf_counter()
        evaluate_step = mlp.aggregator_single if mode == "single" else mlp.aggregator_batched
        output = evaluate_step(model, context, payload["inputs"], payload["mask"])
        seconds = time.perf_counter() - started
        self.run.timings_s["compute"] += seconds
        round_ = self.inference_releases
        self.inference_releases += 1
        released = self.release(
            mlp.OUTPUT, output.to_bytes(), contributors, job_id=job_id, round_=round_
        )
        answer = self.ask_party(
            self.querier,
            protocol.MLP_ANSWER,
            {**settings, "output": mlp.OUTPUT, "round": round_, "activation": self.spec.activation},
            payload=released,
            weights=self.run.weights,
        )
        return protocol.metrics_of(answer), seconds

    def _compare(self, counts: list[dict[str, float]]) -> dict[str, float]:
        """The querier's counts, summed: its accuracy with the encrypted answers and with the
        plaintext model, their agreement, the largest logit error ({} if it reports none)."""
        combined = scores.combine(counts, n_classes=1)
        if not combined:
            return {}
        return {
            "encrypted_accuracy": combined["accuracy"],
            "plaintext_accuracy": combined["compared_accuracy"],
            "prediction_agreement": combined["agreement"],
            "max_abs_logit_error": combined["max_abs_logit_error"],
        }

    # -- upper bound ---------------------------------------------------------------------------

    def _central_baseline(self) -> dict[str, Any] | None:
        """The same model trained on the pooled training data (built-in data only: in a real
        federation nobody holds it), for as many epochs as each party trained in total; the
        learning rate is halved (up to 3 times) while training diverges."""
        if self.source.from_csv:
            return None
        train, _ = load_builtin(self.source.dataset, seed=self.source.seed)
        X = self.standardizer.features(train.X)
        lr = self.config.training.lr
        for _ in range(4):
            model = build_model(self.spec, seed=self.config.seed)
            config = TrainConfig(
                epochs=self.config.rounds * self.config.fedavg.local_epochs,
                batch_size=self.config.training.batch_size,
                lr=lr,
                seed=self.config.seed,
                optimizer=self.config.fedavg.optimizer,
            )
            if math.isfinite(local_train(model, X, train.y, config)):
                break
            lr /= 2
        return {"epochs": config.epochs, "lr": lr, **evaluate(model, self.test_X, self.test.y)}
