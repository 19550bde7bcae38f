"""One module per job kind, each with its party, aggregator and key-holder steps side by side."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedhe.errors import PolicyError
from fedhe.keyholder import DecryptionRequest, JobDeclaration, KeyHolder
from fedhe.keyholder.member import ReleaseRules
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


# What a member of a key-holder group may do with its decryption share (fedhe.keyholder.group):
# only shares of a verified sum the job releases to the aggregator go to it in the clear; the
# shares of everything else go sealed to the lead member, which runs the step above. A member
# checks the parties' tags itself for every output whose step decrypts a verified sum.
RELEASE_RULES = ReleaseRules(
    clear=frozenset({moments.OUTPUT, aggregate.OUTPUT, linreg.GRADIENT_OUTPUT}),
    verified=frozenset(
        {moments.OUTPUT, aggregate.OUTPUT, linreg.GRADIENT_OUTPUT, linreg.MASKED_OUTPUT}
    ),
    party_masked=frozenset({linreg.MASKED_OUTPUT}),  # the parties draw R and S
)


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
    _check_single_releases(job)
    if job.task in (aggregate.TASK, mlp.TASK):
        _check_layouts(job)
        return
    if job.task == mlp.INFERENCE_TASK:
        _check_recipient(job)
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


# Outputs a job releases once, whatever the aggregator declares as their budget.
SINGLE_RELEASES = (moments.OUTPUT, linreg.MASKED_OUTPUT, encrypted_model.MODEL_OUTPUT)


def _check_single_releases(job: JobDeclaration) -> None:
    more = {k: v.budget for k, v in job.outputs.items() if k in SINGLE_RELEASES and v.budget != 1}
    if more:
        raise PolicyError(f"{sorted(more)} are released once per job, not {more}.")


def _check_layouts(job: JobDeclaration) -> None:
    """Sums of model-shaped updates: size and count slot follow from the layout (the model's
    parameter shapes plus the weight and count slots), not from the aggregator's numbers."""
    layouts = job.meta.get("layouts")
    if not isinstance(layouts, dict):
        raise PolicyError(f"a {job.task} job must declare the layout of each sum in its meta.")
    for kind, spec in job.outputs.items():
        if kind not in layouts:
            raise PolicyError(f"{kind!r} of a {job.task} job comes without its layout.")
        try:
            layout = aggregate.Layout.from_dict(layouts[kind])
        except (KeyError, TypeError, ValueError) as err:
            raise PolicyError(f"the layout of {kind!r} is malformed: {err!r}") from err
        if (spec.size, spec.count_index) != (layout.size, layout.count_index):
            raise PolicyError(
                f"{kind!r} declares size {spec.size} and count slot {spec.count_index}; its "
                f"layout has {layout.size} values with the count in slot {layout.count_index}."
            )


def _check_recipient(job: JobDeclaration) -> None:
    querier = job.meta.get("querier")
    if not isinstance(querier, str) or not querier.startswith("party-"):
        raise PolicyError(f"a {job.task} job must name the party its answers go to: {querier!r}.")


def _regression_sizes(job: JobDeclaration) -> dict[str, int]:
    """Every output's size follows from the moments' size: 2·columns + 2 (3·columns + 2 when
    the declared moments layout adds the imputing job's observed fractions)."""
    spec = job.outputs.get(moments.OUTPUT)
    if spec is None or spec.size is None:
        raise PolicyError(f"a {job.task} job must declare {moments.OUTPUT!r} with its size.")
    with_target = job.task == linreg.TASK
    d = (spec.size - 2) // _moments_fields(job) - int(with_target)
    return {
        "features": d,
        moments.OUTPUT: spec.size,
        linreg.MASKED_OUTPUT: linreg.statistics_layout(d).size,
        linreg.GRADIENT_OUTPUT: d + 3,
        encrypted_model.REFRESH_OUTPUT: d + 1,
        encrypted_model.MODEL_OUTPUT: d + 1,
    }


def _moments_fields(job: JobDeclaration) -> int:
    """Per-column fields of the moments sum, as its declared layout names them."""
    layouts = job.meta.get("layouts")
    layout = layouts.get(moments.OUTPUT) if isinstance(layouts, dict) else None
    names = tuple(layout.get("names", ())) if isinstance(layout, dict) else moments.FIELDS
    if names not in (moments.FIELDS, (*moments.FIELDS, moments.OBSERVED)):
        raise PolicyError(
            f"{moments.OUTPUT!r} declares fields {list(names)}; it sums mean, "
            "meansq and (when imputing) observed only."
        )
    return len(names)


def _check_knn(job: JobDeclaration) -> None:
    _check_recipient(job)
    k = job.meta.get("k")
    if not isinstance(k, int) or k < 1:
        raise PolicyError(f"a knn job must declare k ≥ 1 in its meta, got {k!r}.")
    if job.outputs.get(knn.VOTE_OUTPUT) and not job.outputs.get(knn.RANK_OUTPUT):
        raise PolicyError("a knn job that releases votes must rank first: declare both.")
