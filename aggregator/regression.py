"""Linear and logistic regression over Flower: the aggregator's side of `fedhe.tasks.linreg`
and `fedhe.tasks.logreg`.

Both modes start with one secure sum of feature moments (and of the target for linreg).
Exact mode (linreg): one secure sum of the normal equations masked on both sides, R·A·S and
R·b; the key holder releases only z = S⁻¹·w and this side, which alone knows S, unmasks w.
Gradient mode (linreg, logreg): `rounds` secure sums of mean gradients, each party's masked by
a fresh uniform mask only this side and that party know; the model stays in the clear here and
the key holder decrypts only masked gradient sums. R, S and the gradient masks go to the
parties only, never to the key holder.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fedhe import protocol
from fedhe.aggregator.job import Job, contribution_settings
from fedhe.crypto import MODEL_PARAMS, CKKSParams, Tensor
from fedhe.progress import progress
from fedhe.tasks import aggregate, encrypted_model, linreg, logreg, moments

log = logging.getLogger("fedhe.aggregator")

EXACT = "exact"
GRADIENT = "gradient"
ENCRYPTED_MODEL = "encrypted-model"


class RegressionJob(Job):
    """`linreg` (exact or gradient mode) or `logreg` (gradient mode) on encrypted contributions."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logistic = self.config.task == logreg.TASK
        self.mode = self.config.regression_mode
        self.n_features = self.test.n_features
        self.gradient_layout = aggregate.Layout(("gradient",), ((self.n_features + 1,),))

    def params(self) -> CKKSParams:
        return MODEL_PARAMS if self.mode == ENCRYPTED_MODEL else super().params()

    def outputs(self) -> dict[str, tuple[int, aggregate.Layout | int]]:
        columns = self.n_features + (0 if self.logistic else 1)
        outputs: dict[str, tuple[int, aggregate.Layout | int]] = {
            moments.OUTPUT: (1, self.moments_layout(columns))
        }
        if self.mode == EXACT:
            outputs[linreg.MASKED_OUTPUT] = (1, linreg.statistics_layout(self.n_features))
        elif self.mode == GRADIENT:
            outputs[linreg.GRADIENT_OUTPUT] = (self.config.rounds, self.gradient_layout)
        else:
            outputs[encrypted_model.REFRESH_OUTPUT] = (self.config.rounds, self.n_features + 1)
            outputs[encrypted_model.MODEL_OUTPUT] = (1, self.n_features + 1)
        return outputs

    def phases(self) -> None:
        if self.logistic:
            logreg.check_binary(self.test.y, "test set")
        standardizer, total_samples = self.feature_moments(with_target=not self.logistic)
        self.run.model["standardizer"] = standardizer.to_dict()
        if self.mode == EXACT:
            started = time.perf_counter()
            w = self._exact(standardizer, total_samples)
            self._record(0, w, standardizer, time.perf_counter() - started)
        elif self.mode == GRADIENT:
            w = self._gradient_descent(standardizer, total_samples)
        else:
            w = self._encrypted_model(standardizer, total_samples)
            if w is None:  # the model stays with the parties: nothing to evaluate here
                return
        self.run.weights = {"coefficients": self._coefficients(w, standardizer)}
        if self.evaluates:  # else the sites that opt in evaluate it (`Job.final_model_requests`)
            self.run.metrics = self._evaluate(w, standardizer)

    # -- exact mode ------------------------------------------------------------------------------

    def _exact(self, standardizer: moments.Standardizer, total_samples: int) -> np.ndarray:
        # R and S stay here and go to the parties only: never to the key holder.
        left, right = linreg.masking_matrices(self.n_features + 1)
        bound = linreg.statistics_sum_bound(
            self.n_features, total_samples, self.config.regression.l2
        )
        exchange = self.ask_parties(
            protocol.STATS,
            {
                "standardizer": standardizer.to_dict(),
                "mask": left.tolist(),
                "right-mask": right.tolist(),
                "l2": self.config.regression.l2,
                "sum-bound": bound,
                "min-scale-bits": linreg.STATISTICS_SCALE_BITS,
                **contribution_settings(linreg.MASKED_OUTPUT, 0),
            },
        )
        solution = self.secure_sum(
            exchange,
            linreg.statistics_layout(self.n_features),
            linreg.MASKED_OUTPUT,
            bound,
            min_scale_bits=linreg.STATISTICS_SCALE_BITS,
            round_=0,
        )
        return linreg.unmask_coefficients(solution, right)  # the key holder released S⁻¹·w

    # -- gradient mode ---------------------------------------------------------------------------

    def _gradient_descent(
        self, standardizer: moments.Standardizer, total_samples: int
    ) -> np.ndarray:
        w = np.zeros(self.n_features + 1)
        kind = "encrypted" if self.run.encrypted else "plaintext twin"
        with progress(self.config.rounds, f"{kind}: rounds") as advance:
            for round_number in range(1, self.config.rounds + 1):
                started = time.perf_counter()
                # |mean gradient| ≤ clip ⇒ |Σ nᵢgᵢ| ≤ clip·Σnᵢ, plus one mask per party asked
                bound = linreg.gradient_sum_bound(
                    total_samples, self.config.training.clip, len(self.parties)
                )
                masks = linreg.gradient_masks(
                    self.parties, self.n_features + 1, total_samples, self.config.training.clip
                )
                settings = {
                    "job-id": self.run.job_id,
                    "task": self.config.task,
                    "w": w.tolist(),
                    "standardizer": standardizer.to_dict(),
                    "batch-size": self.config.training.batch_size,
                    "round": round_number,
                    "seed": self.config.seed,
                    "clip": self.config.training.clip,
                    "sum-bound": bound,
                    "fail-party": self.config.drop_party,
                    **contribution_settings(linreg.GRADIENT_OUTPUT, round_number - 1),
                }
                exchange = self.session.ask(  # each party gets its own mask, nobody else's
                    self.parties,
                    protocol.GRADIENT,
                    {
                        name: protocol.content(
                            protocol.GRADIENT,
                            protocol.REQUEST,
                            config={**settings, "gradient-mask": masks[name].tolist()},
                        )
                        for name in self.parties
                    },
                    role="party",
                )
                masked = self.secure_sum(
                    exchange,
                    self.gradient_layout,
                    linreg.GRADIENT_OUTPUT,
                    bound,
                    round_=round_number - 1,
                )
                flat = linreg.unmask_gradient_sum(
                    masked, self.gradient_layout, masks, self.run.contributors[-1]["parties"]
                )
                gradient, _ = aggregate.average_update(flat, self.gradient_layout)
                w = linreg.gradient_step(
                    w,
                    gradient["gradient"],
                    lr=self.config.training.lr,
                    l2=self.config.regression.l2,
                )
                self._record(round_number, w, standardizer, time.perf_counter() - started)
                self.run.history[-1]["dropped"] = dict(exchange.failures)
                self.note_dropped(exchange.failures, f"gradient round {round_number}")
                advance(f"{kind}: round {round_number}")
        return w

    # -- encrypted-model mode ------------------------------------------------------------------

    def _encrypted_model(
        self, standardizer: moments.Standardizer, total_samples: int
    ) -> np.ndarray | None:
        """Full-batch gradient descent on a model that stays encrypted until the last round."""
        dim = self.n_features + 1
        vector = encrypted_model.encrypt_model(self.context, np.zeros(dim))
        columns = encrypted_model.broadcast(self.context, np.zeros(dim))
        kind = "encrypted model" if self.run.encrypted else "plaintext twin"
        with progress(self.config.rounds, f"{kind}: rounds") as advance:
            for round_number in range(1, self.config.rounds + 1):
                started = time.perf_counter()
                vector, contributors = self._model_step(
                    round_number, vector, columns, standardizer, total_samples
                )
                if round_number < self.config.rounds:
                    vector, columns = self._refresh(vector, contributors, round_number - 1)
                self.run.history.append(
                    {
                        "round": round_number,
                        "parties": len(contributors),
                        "round_s": time.perf_counter() - started,
                    }
                )
                advance(f"{kind}: round {round_number}")
        final = self.release(encrypted_model.MODEL_OUTPUT, vector.to_bytes(), contributors)
        return self._hand_out_model(final)

    def _model_step(
        self,
        round_number: int,
        vector: Tensor,
        columns: list[Tensor],
        standardizer: moments.Standardizer,
        total_samples: int,
    ) -> tuple[Tensor, tuple[str, ...]]:
        """One round: parties' Enc(step·(Aᵢw − bᵢ)) summed into the encrypted model."""
        exchange = self.ask_parties(
            protocol.MODEL_STEP,
            {
                "task": self.config.task,
                "round": round_number,
                "standardizer": standardizer.to_dict(),
                "step": self.config.training.lr / total_samples,
                "l2": self.config.regression.l2,
                "fail-party": self.config.drop_party,
            },
            payload={f"broadcast-{j}": column.to_bytes() for j, column in enumerate(columns)},
        )
        self.account(exchange)
        contributions = {
            name: protocol.payload_of(reply)["contribution"]
            for name, reply in exchange.replies.items()
        }
        started = time.perf_counter()
        vector, contributors, rejected = encrypted_model.aggregator_update(
            vector, contributions, self.context, min_parties=self.config.min_parties
        )
        self.run.timings_s["compute"] += time.perf_counter() - started
        for name, reason in {**exchange.failures, **rejected}.items():
            self.run.excluded.setdefault(name, f"model step {round_number}: {reason}")
        self.run.contributors.append({"output": "model_step", "parties": sorted(contributors)})
        return vector, contributors

    def _hand_out_model(self, released: dict[str, bytes]) -> np.ndarray | None:
        """The final model reached the parties sealed; it comes back here only from the parties
        whose node config shares it (None when none does). The twin's comes in the clear."""
        if "values" in released:
            return protocol.array_from_bytes(released["values"])
        from fedhe.aggregator.export import model_spec  # export reads JobRun from aggregator.job

        # The model's description rides along: each site writes its model.json (no extra trip).
        spec = model_spec(self.config, self.run, self.source, self.test)
        exchange = self.session.ask(
            self.parties,
            protocol.MODEL_RELEASE,
            {
                name: protocol.content(
                    protocol.MODEL_RELEASE,
                    protocol.REQUEST,
                    config={
                        "job-id": self.run.job_id,
                        "output": encrypted_model.MODEL_OUTPUT,
                        "round": 0,
                        "model": spec,
                    },
                    payload={"sealed": released[f"sealed/{name}"]},
                )
                for name in self.parties
                if f"sealed/{name}" in released
            },
            role="party",
        )
        shared = [protocol.payload_of(r).get("model") for r in exchange.replies.values()]
        shared = [protocol.array_from_bytes(m) for m in shared if m]
        self.run.extras["model_released_to"] = sorted(exchange.replies)
        self.take_site_reports(exchange)
        return shared[0] if shared else None

    def _refresh(
        self, vector: Tensor, contributors: tuple[str, ...], round_: int
    ) -> tuple[Tensor, list[Tensor]]:
        """Masked re-encryption: the key holder sees w + r only, the aggregator never w."""
        masked, mask = encrypted_model.aggregator_mask(vector)
        payload = self.release(
            encrypted_model.REFRESH_OUTPUT, masked.to_bytes(), contributors, round_=round_
        )
        fresh, columns = encrypted_model.unpack_refresh(payload, self.context, len(mask))
        return encrypted_model.aggregator_unmask(fresh, columns, mask)

    # -- results ---------------------------------------------------------------------------------

    def _coefficients(self, w: np.ndarray, standardizer: moments.Standardizer) -> np.ndarray:
        return logreg.to_original(w, standardizer) if self.logistic else standardizer.to_original(w)

    def _evaluate(self, w: np.ndarray, standardizer: moments.Standardizer) -> dict[str, float]:
        if self.logistic:
            probability = logreg.predict_proba(w, standardizer, self.test.X)
            return logreg.classification_metrics(self.test.y, probability)
        predicted = linreg.predict(standardizer.to_original(w), self.test.X)
        return linreg.regression_metrics(self.test.y, predicted)

    def _record(
        self, round_number: int, w: np.ndarray, standardizer: moments.Standardizer, round_s: float
    ) -> None:
        entry = {
            "round": round_number,
            "parties": len(self.run.contributors[-1]["parties"]),
            **(self._evaluate(w, standardizer) if self.evaluates else {}),
            "round_s": round_s,
        }
        self.run.history.append(entry)
        log.info("%s round %d: %s", self.run.job_id, round_number, entry)
