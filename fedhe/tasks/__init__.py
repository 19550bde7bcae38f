"""One module per job kind, each with its party, aggregator and key-holder steps side by side."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedhe.errors import PolicyError
from fedhe.keyholder import DecryptionRequest, JobDeclaration, KeyHolder
from fedhe.tasks import aggregate, encrypted_model, knn, linreg, mlp, moments

Release = np.ndarray | dict[str, bytes]
KeyholderStep = Callable[[KeyHolder, DecryptionRequest], Release]

# What the key holder releases per output kind, by the release principle: a value leaves in
# the clear only to the aggregator and only as a sum the key holder verified against the
# parties' tags (moments, update sums, gradient sums, the masked normal equations, of which
# only the solved coefficients leave); otherwise sealed end to end to its recipient (KNN
# votes and MLP logits to the querier, the encrypted-model's final model to the parties) or
# as fresh ciphertexts (the refreshed model, the KNN selection). An output kind without a step
# here is refused.
KEYHOLDER_STEPS: dict[str, KeyholderStep] = {
    moments.OUTPUT: aggregate.keyholder_decrypt_sum,
    aggregate.OUTPUT: aggregate.keyholder_decrypt_sum,
    linreg.GRADIENT_OUTPUT: aggregate.keyholder_decrypt_sum,
    linreg.MASKED_OUTPUT: linreg.keyholder_solve,
    encrypted_model.REFRESH_OUTPUT: encrypted_model.keyholder_refresh,
    encrypted_model.MODEL_OUTPUT: encrypted_model.keyholder_model,
    knn.RANK_OUTPUT: knn.keyholder_rank,
    knn.VOTE_OUTPUT: knn.keyholder_vote,
    mlp.OUTPUT: mlp.keyholder_logits,
}


def keyholder_release(keyholder: KeyHolder, request: DecryptionRequest) -> Release:
    step = KEYHOLDER_STEPS.get(request.output_kind)
    if step is None:
        raise PolicyError(f"output kind {request.output_kind!r} has no release rule.")
    return step(keyholder, request)


# Output kinds each task may declare. The key holder refuses any other, so an aggregator cannot
# declare, say, the masked normal equations under a kind whose values are released raw.
ALLOWED_OUTPUTS: dict[str, frozenset[str]] = {
    aggregate.TASK: frozenset({moments.OUTPUT, aggregate.OUTPUT}),
    linreg.TASK: frozenset(
        {
            moments.OUTPUT,
            linreg.MASKED_OUTPUT,
            linreg.GRADIENT_OUTPUT,
            encrypted_model.REFRESH_OUTPUT,
            encrypted_model.MODEL_OUTPUT,
        }
    ),
    "logreg": frozenset(
        {
            moments.OUTPUT,
            linreg.GRADIENT_OUTPUT,
            encrypted_model.REFRESH_OUTPUT,
            encrypted_model.MODEL_OUTPUT,
        }
    ),
    knn.TASK: frozenset({moments.OUTPUT, knn.RANK_OUTPUT, knn.VOTE_OUTPUT}),
    mlp.TASK: frozenset({moments.OUTPUT, aggregate.OUTPUT}),
    mlp.INFERENCE_TASK: frozenset({mlp.OUTPUT}),
}


def check_declaration(job: JobDeclaration) -> None:
    """Key-holder side: the job's outputs are its task's, with sizes that fit one another."""
    allowed = ALLOWED_OUTPUTS.get(job.task)
    if allowed is None:
        raise PolicyError(
            f"task {job.task!r} is unknown to this key holder: {sorted(ALLOWED_OUTPUTS)}."
        )
    foreign = sorted(set(job.outputs) - allowed)
    if foreign:
        raise PolicyError(
            f"task {job.task!r} may not declare {foreign}; it may: {sorted(allowed)}."
        )
    if job.task in (aggregate.TASK, mlp.TASK, mlp.INFERENCE_TASK):
        return
    if job.task == knn.TASK:
        _check_knn(job)
        return
    expected = _regression_sizes(job)
    wrong = {k: v.size for k, v in job.outputs.items() if v.size != expected[k]}
    if wrong:
        raise PolicyError(
            f"declared sizes {wrong} do not fit a {job.task} job over "
            f"{expected['features']} features (expected {expected})."
        )


def _regression_sizes(job: JobDeclaration) -> dict[str, int]:
    """Every output's size follows from the moments' size: 2·columns + 2."""
    spec = job.outputs.get(moments.OUTPUT)
    if spec is None or spec.size is None:
        raise PolicyError(f"a {job.task} job must declare {moments.OUTPUT!r} with its size.")
    with_target = job.task == linreg.TASK
    d = (spec.size - 2) // 2 - int(with_target)
    return {
        "features": d,
        moments.OUTPUT: spec.size,
        linreg.MASKED_OUTPUT: linreg.statistics_layout(d).size,
        linreg.GRADIENT_OUTPUT: d + 3,
        encrypted_model.REFRESH_OUTPUT: d + 1,
        encrypted_model.MODEL_OUTPUT: d + 1,
    }


def _check_knn(job: JobDeclaration) -> None:
    k = job.meta.get("k")
    if not isinstance(k, int) or k < 1:
        raise PolicyError(f"a knn job must declare k ≥ 1 in its meta, got {k!r}.")
    if job.outputs.get(knn.VOTE_OUTPUT) and not job.outputs.get(knn.RANK_OUTPUT):
        raise PolicyError("a knn job that releases votes must rank first: declare both.")
