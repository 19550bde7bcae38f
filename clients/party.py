"""Party handlers: join a job, contribute feature moments, train locally and encrypt the update.

A party keeps the job's public context and its data description in `context.state`; it never
holds or accepts a secret key (`PublicContext.from_bytes` refuses one).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ConfigRecord, Context, Message

from fedhe import protocol, seeds, site_model
from fedhe.clients import trust
from fedhe.clients.roles import (
    QUERY_PATH,
    REPORT_METRICS,
    SHARE_MODEL,
    TEST_PATH,
    allows_plaintext,
    node_flag,
)
from fedhe.crypto import PublicContext
from fedhe.crypto.mac import mac_label
from fedhe.data.datasets import Dataset
from fedhe.data.queries import Queries, load_queries
from fedhe.data.sources import DataSource, party_data, site_shape, test_data
from fedhe.errors import DataError, FedHEError, ProtocolError, ValueRangeError
from fedhe.learning import (
    ModelSpec,
    TrainConfig,
    build_model,
    get_weights,
    local_train,
    set_weights,
)
from fedhe.tasks import aggregate, encrypted_model, knn, linreg, logreg, mlp, moments, scores
from fedhe.tasks.moments import Standardizer

log = logging.getLogger("fedhe.party")

_JOB_RECORD = "fedhe.job."
_CONTEXT_RECORD = "fedhe.context."
_QUERY_RECORD = "fedhe.knn-query."
_OUTPUT_RECORD = "fedhe.output."


def setup(msg: Message, context: Context) -> Message:
    """Accept the job's public context (refusing any secret key) and check the local data."""
    config = protocol.config_of(msg.content)
    job_id = str(config["job-id"])
    site_model.job_folder(Path("."), job_id)  # a plain name: it becomes a folder at the site
    payload = protocol.payload_of(msg.content)
    public_bytes = payload.get("public-context", b"")
    if public_bytes:
        public = PublicContext.from_bytes(public_bytes)  # no secret key, real parameters
        _refuse_another_context(context, job_id, public_bytes)
        context.state[_CONTEXT_RECORD + job_id] = ConfigRecord({"bytes": public_bytes})
        link = trust.join(
            context,
            job_id,
            _party_name(config),
            trust.keyholders_of(payload),
            context_fingerprint=public.fingerprint,
        )
    elif config.get("context-follows") is True:
        # An encrypted job whose public context comes with the MAC-key envelopes (the feature
        # moments): this party joins now and contributes nothing before it has the context.
        link = trust.join(context, job_id, _party_name(config), trust.keyholders_of(payload))
    elif allows_plaintext(context):
        link = {}
    else:
        raise ProtocolError(
            f"job {job_id!r} comes without a public context: it would have this party send its "
            "data in the clear. Only a simulation node with allow-plaintext in its node config "
            "takes part in a plaintext twin."
        )
    source = DataSource.from_dict(config["source"])
    data = _own_data(source, int(config["party-index"]), context)
    # The querier says how many test rows it will query with (the rows stay here).
    test = _queries(source, context) if config.get("querier") else None
    context.state[_JOB_RECORD + job_id] = ConfigRecord(
        {
            "source": protocol.to_json(source.to_dict()),
            "party-index": int(config["party-index"]),
            "n-parties": int(config["n-parties"]),
        }
    )
    return Message(
        protocol.content(
            protocol.SETUP,
            protocol.REPLY,
            payload=link,
            metrics={
                "n-samples": data.n_samples,
                "n-features": data.n_features,
                "n-classes": data.n_classes,
                "n-queries": 0 if test is None else test.n_samples,
            },
        ),
        reply_to=msg,
    )


def model_release(msg: Message, context: Context) -> Message:
    """Encrypted-model mode: the final model, sealed to this party. It stays here (under the
    node's output folder when it has one, also as model.json: the job's model description
    comes along); it goes back to the aggregator only from a node whose config says
    share-model. A site that opts in evaluates it on its own test rows (`final_model`)."""
    config = protocol.config_of(msg.content)
    job_id = str(config["job-id"])
    model = trust.open_release(
        context,
        job_id,
        str(config["output"]),
        int(config["round"]),
        protocol.payload_of(msg.content)["sealed"],
    )
    _keep_output(context, job_id, "model", model)
    report: dict[str, float] = {}
    if "model" in config:
        spec = {**config["model"], "linear": site_model.linear_part(config["model"], model)}
        report = _keep_model(context, job_id, spec, {})
    shared = node_flag(context, SHARE_MODEL)
    return Message(
        protocol.content(
            protocol.MODEL_RELEASE,
            protocol.REPLY,
            payload={"model": protocol.array_to_bytes(model)} if shared else {},
            metrics=report,
        ),
        reply_to=msg,
    )


def final_model(msg: Message, context: Context) -> Message:
    """The job's final model (model.json's content, and a torch model's weights): kept at this
    site, under the node's output folder, where `fedhe predict` and `fedhe.load_model` read it.
    A site whose node config names a test-path and says report-metrics evaluates it on its own
    test rows and replies the metrics only; any other site replies nothing."""
    config = protocol.config_of(msg.content)
    job_id = str(config["job-id"])
    _job(context, job_id)  # only a party of the job keeps its model
    weights = protocol.weights_of(msg.content)
    report = _keep_model(context, job_id, dict(config["model"]), weights)
    return Message(
        protocol.content(protocol.FINAL_MODEL, protocol.REPLY, metrics=report), reply_to=msg
    )


def shape(msg: Message, context: Context) -> Message:
    """What this site's file looks like, for a job whose coordinator holds no data: its header,
    feature names, task and label values (schema-level facts, never a row)."""
    config = protocol.config_of(msg.content)
    local_file = context.node_config.get("data-path")
    if not local_file:
        raise ProtocolError(
            "the job's coordinator holds no data and this node has no data-path in its node "
            "config: start it with `fedhe deploy site --data-path FILE`."
        )
    source = DataSource.from_dict(config["source"])
    found = site_shape(source, str(local_file))
    return Message(
        protocol.content(
            protocol.SHAPE,
            protocol.REPLY,
            config={k: found[k] for k in ("columns", "features", "labels", "task")},
            metrics={"n-features": found["n-features"]},
        ),
        reply_to=msg,
    )


def _keep_model(
    context: Context, job_id: str, spec: dict[str, Any], weights: dict[str, np.ndarray]
) -> dict[str, float]:
    """Write model.json (and model.pt) under the node's output folder; evaluate it on the
    site's own test rows when its config opts in. Returns the metrics to report ({} if not)."""
    context.state[_OUTPUT_RECORD + f"{job_id}.model.json"] = ConfigRecord(
        {"spec": protocol.to_json(spec)}
    )
    folder = context.node_config.get("output-dir")
    if folder:
        site_model.write_model(site_model.job_folder(Path(str(folder)), job_id), spec, weights)
    test_path = context.node_config.get(TEST_PATH)
    if not test_path or not node_flag(context, REPORT_METRICS):
        return {}
    job = _job(context, job_id)
    test = party_data(job["source"], job["party-index"], str(test_path))
    return site_model.evaluate(spec, weights, test)


def feature_moments(msg: Message, context: Context) -> Message:
    """Contribute Enc(n_i·(E_i[x] ‖ E_i[x²])) so the job standardizes with global statistics
    (an imputing job adds each column's observed fraction: `fedhe.tasks.moments`).
    The job's MAC-key envelope rides on this message (`trust.accept_mac_keys`)."""
    envelopes = protocol.payload_of(msg.content)
    if envelopes.get("public-context"):
        _accept_context(context, str(protocol.config_of(msg.content)["job-id"]), envelopes)
    config, job, data = _open(msg, context)
    if any(key.startswith("envelope") for key in envelopes):
        trust.accept_mac_keys(context, job["job-id"], envelopes)
    columns = np.column_stack([data.X, data.y]) if config.get("with-target") else data.X
    arrays = moments.party_moments(columns, observed=job["source"].imputes)
    return _contribute(
        msg,
        context,
        job,
        arrays,
        data.n_samples,
        sum_bound=float(config["sum-bound"]),
        n_terms=job["n-parties"],
    )


def train(msg: Message, context: Context) -> Message:
    """Train on local data from the global model; send Enc(n_i·Δw_i ‖ n_i ‖ 1)."""
    config, job, data = _open(msg, context, fault_injectable=True)
    X = Standardizer.from_dict(config["standardizer"]).features(data.X)
    global_weights = protocol.weights_of(msg.content)
    if _public_context(context, job["job-id"]) is not None:
        trust.check_new_model(context, job["job-id"], global_weights, _label(config))
    model = build_model(ModelSpec.from_dict(config["model"]), seed=0)
    set_weights(model, global_weights)
    train_config = TrainConfig(
        epochs=int(config["epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        seed=_round_seed(config, job, seeds.TRAIN),
        optimizer=str(config.get("optimizer", "sgd")),
    )
    warm_up_training()  # torch's one-time start-up is no party's training time
    started = time.perf_counter()
    loss = local_train(model, X, data.y, train_config)
    train_s = time.perf_counter() - started
    new_weights = get_weights(model)
    # Clipping |Δw| to `clip` is what lets the aggregator bound the sum by clip·Σn_i.
    clip = float(config["clip"])
    delta = {k: np.clip(new_weights[k] - global_weights[k], -clip, clip) for k in global_weights}
    return _contribute(
        msg,
        context,
        job,
        delta,
        data.n_samples,
        sum_bound=float(config["sum-bound"]),
        packing=str(config.get("packing", aggregate.COMPLEX)),
        parties=int(config.get("lane-terms", job["n-parties"])),
        metrics={"train-loss": loss, "train-s": train_s},
    )


@functools.cache
def warm_up_training() -> None:
    """Train two tiny models once in this process: torch's first backward pass and optimizer
    steps cost seconds of lazy initialization, which would otherwise land on whichever run
    trains first (the encrypted run, before its plaintext twin) as training time."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 3))
    for n_classes, hidden, optimizer in ((2, (), "sgd"), (3, (4,), "adam")):
        model = build_model(ModelSpec(3, n_classes, hidden, "square"), seed=0)
        y = rng.integers(0, n_classes, size=8)
        local_train(model, X, y, TrainConfig(epochs=1, batch_size=4, optimizer=optimizer))


def masked_statistics(msg: Message, context: Context) -> Message:
    """Exact linreg: contribute Enc(R·(ZᵢᵀZᵢ + α·nᵢ·I')·S ‖ R·Zᵢᵀyᵢ ‖ nᵢ ‖ 1)."""
    config, job, data = _open(msg, context)
    standardizer = Standardizer.from_dict(config["standardizer"])
    arrays = linreg.party_masked_statistics(
        standardizer.features(data.X),
        standardizer.target(data.y),
        np.asarray(config["mask"], dtype=float),
        np.asarray(config["right-mask"], dtype=float),
        l2=float(config["l2"]),
    )
    return _contribute(
        msg,
        context,
        job,
        arrays,
        data.n_samples,
        sum_bound=float(config["sum-bound"]),
        min_scale_bits=int(config["min-scale-bits"]),
    )


def gradient(msg: Message, context: Context) -> Message:
    """Gradient mode: contribute Enc(nᵢ·clip(mean gradient at w) + mᵢ ‖ nᵢ ‖ 1), mᵢ this
    party's mask of the round from the aggregator (the key holder sees masked sums only)."""
    config, job, data = _open(msg, context, fault_injectable=True)
    Z, y, logistic = _regression_data(config, job, data)
    w = np.asarray(config["w"], dtype=float)
    if _public_context(context, job["job-id"]) is not None:
        trust.check_new_model(context, job["job-id"], {"w": w}, _label(config))
    batch = _batch(data.n_samples, int(config["batch-size"]), _round_seed(config, job, seeds.BATCH))
    started = time.perf_counter()
    mean_gradient, n = linreg.party_gradient(
        Z,
        y,
        w,
        link=logreg.sigmoid if logistic else linreg.identity,
        clip=float(config["clip"]),
        batch=batch,
    )
    mask = np.asarray(config["gradient-mask"], dtype=float)
    return _contribute(
        msg,
        context,
        job,
        {"gradient": linreg.mask_gradient(mean_gradient, mask, n)},
        n,
        sum_bound=float(config["sum-bound"]),
        metrics={"train-s": time.perf_counter() - started},
    )


def model_step(msg: Message, context: Context) -> Message:
    """Encrypted-model mode: Enc(step·(Aᵢw − bᵢ)) from the broadcast encrypted model."""
    config, job, data = _open(msg, context, fault_injectable=True)
    Z, y, logistic = _regression_data(config, job, data)
    A, b = encrypted_model.party_statistics(Z, y, logistic=logistic, l2=float(config["l2"]))
    payload = protocol.payload_of(msg.content)
    started = time.perf_counter()
    model = encrypted_model.load_broadcast(
        [payload[f"broadcast-{j}"] for j in range(len(b))],
        _public_context(context, job["job-id"]),
        len(b),
    )
    step = encrypted_model.party_step(model, A, b, float(config["step"]))
    return Message(
        protocol.content(
            protocol.MODEL_STEP,
            protocol.REPLY,
            payload={"contribution": step.to_bytes()},
            metrics={"n-samples": data.n_samples, "encrypt-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )


def knn_upload(msg: Message, context: Context) -> Message:
    """KNN: encrypt this party's standardized points at the store positions it was given."""
    config, job, data = _open(msg, context, fault_injectable=True)
    standardizer = Standardizer.from_dict(config["standardizer"])
    n_classes = int(config["n-classes"])
    labels = knn.label_rows(data.y if n_classes else standardizer.target(data.y), n_classes)
    started = time.perf_counter()
    payload = knn.party_upload(
        _public_context(context, job["job-id"]),
        standardizer.features(data.X),
        labels,
        knn.Segment(**config["segment"]),
        int(config["slots"]),
        encrypted_queries=bool(config.get("encrypted-queries", True)),
    )
    return Message(
        protocol.content(
            protocol.KNN_UPLOAD,
            protocol.REPLY,
            payload=payload,
            metrics={"n-samples": data.n_samples, "encrypt-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )


def knn_query(msg: Message, context: Context) -> Message:
    """KNN querier: one batch of its queries (plain or encrypted) and Enc(ρ), its vote mask.

    ρ stays here until `knn_answer`: only this node can unmask the batch's answer."""
    config, job, _ = _open(msg, context)
    standardizer = Standardizer.from_dict(config["standardizer"])
    test = _test_set(job, context)
    start, stop = int(config["start"]), int(config["stop"])
    queries = knn.check_queries(standardizer.features(test.X[start:stop]), test.n_features)
    public = _public_context(context, job["job-id"])
    slots = int(config["slots"])
    started = time.perf_counter()
    if config["query"] == "encrypted":
        query_bytes = knn.querier_encrypt(public, queries, slots).to_bytes()
    else:
        query_bytes = protocol.array_to_bytes(queries)
    n_labels = knn.n_label_rows(int(config["n-classes"]))
    masks, rho = knn.querier_masks(public, len(queries), n_labels, slots)
    _keep_mask(context, f"{job['job-id']}.{start}", rho)
    return Message(
        protocol.content(
            protocol.KNN_QUERY,
            protocol.REPLY,
            payload={"queries": query_bytes, "masks": masks.to_bytes()},
            metrics={"encrypt-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )


def knn_answer(msg: Message, context: Context) -> Message:
    """KNN querier: unmask the released votes of a batch into predictions (original units).

    The predictions stay here (a CSV under the node's output-dir); the aggregator gets the
    batch's counts (correct answers, or squared errors) only from a querier whose node config
    says report-metrics and whose queries come with their labels."""
    config, job, _ = _open(msg, context)
    start, stop = int(config["start"]), int(config["stop"])
    rho = _take_mask(context, f"{job['job-id']}.{start}")
    released = _released(msg, context, job["job-id"], config)
    n_classes = int(config["n-classes"])
    predictions = knn.querier_answer(released, rho, int(config["k"]), n_classes)
    if not n_classes:
        predictions = Standardizer.from_dict(config["standardizer"]).target_to_original(predictions)
    _keep_answers(context, job["job-id"], "predictions", start, predictions, job["source"])
    report = {"n": float(stop - start)}
    test = _test_set(job, context) if node_flag(context, REPORT_METRICS) else None
    if test is not None and test.y is not None:
        report = scores.batch_counts(test.y[start:stop], predictions, n_classes)
    return Message(
        protocol.content(protocol.KNN_ANSWER, protocol.REPLY, metrics=report), reply_to=msg
    )


def mlp_query(msg: Message, context: Context) -> Message:
    """MLP querier: Enc(input) (a batch, feature-major, or one sample in the replicated
    layout) and Enc(ρ); ρ stays here until `mlp_answer`."""
    config, job, _ = _open(msg, context)
    public = PublicContext.from_bytes(protocol.payload_of(msg.content)["public-context"])
    test = _test_set(job, context)
    start, stop = int(config["start"]), int(config["stop"])
    standardizer = Standardizer.from_dict(config["standardizer"])
    X = mlp.check_inputs(standardizer.features(test.X[start:stop]), test.n_features)
    n_outputs, slots = int(config["n-outputs"]), public.params.slots
    started = time.perf_counter()
    if config["mode"] == "single":
        layout = mlp.SingleLayout.plan(test.n_features, int(config["hidden"]), n_outputs, slots)
        inputs = mlp.querier_encrypt_single(public, X[0], layout)
        mask, rho = mlp.querier_mask(public, (slots,))
    else:
        inputs = mlp.querier_encrypt_batch(public, X)
        mask, rho = mlp.querier_mask(public, (n_outputs, inputs.shape[1]))
    _keep_mask(context, f"{config['inference-id']}.{start}", rho)
    return Message(
        protocol.content(
            protocol.MLP_QUERY,
            protocol.REPLY,
            payload={"inputs": inputs.to_bytes(), "mask": mask.to_bytes()},
            metrics={"encrypt-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )


def mlp_answer(msg: Message, context: Context) -> Message:
    """MLP querier: unmask the released logits. They stay here (a CSV under the node's
    output-dir); a querier whose node config says report-metrics, and whose queries come with
    their labels, reports the batch's counts: correct answers, agreement with the plaintext
    model (the aggregator's trained model, sent along) and the largest logit error."""
    config = protocol.config_of(msg.content)
    rho = _take_mask(context, f"{config['inference-id']}.{int(config['start'])}")
    released = _released(msg, context, str(config["inference-id"]), config, via=config["job-id"])
    if released.shape != rho.shape:
        raise ProtocolError(f"released logits have shape {released.shape}, expected {rho.shape}.")
    n_outputs = int(config["n-outputs"])
    if config["mode"] == "single":
        logits = mlp.querier_unmask_single(released, rho, n_outputs)[None, :]
    else:
        n = int(config["stop"]) - int(config["start"])
        logits = mlp.querier_unmask_batched(released, rho, n)
    start, stop = int(config["start"]), int(config["stop"])
    job = _job(context, str(config["job-id"]))
    name = f"logits-{config['mode']}"
    _keep_answers(context, str(config["inference-id"]), name, start, logits, job["source"])
    report = {"n": float(stop - start)}
    test = _test_set(job, context) if node_flag(context, REPORT_METRICS) else None
    if test is not None and test.y is not None:
        X = Standardizer.from_dict(config["standardizer"]).features(test.X[start:stop])
        model = mlp.HEModel.from_weights(protocol.weights_of(msg.content), config["activation"])
        plain = model.logits(X)
        report = scores.batch_counts(
            test.y[start:stop], mlp.predict(logits), 1, compared=mlp.predict(plain)
        ) | {"max_abs_logit_error": float(np.max(np.abs(logits - plain)))}
    return Message(
        protocol.content(protocol.MLP_ANSWER, protocol.REPLY, metrics=report), reply_to=msg
    )


def _test_set(job: dict[str, Any], context: Context) -> Queries:
    return _queries(job["source"], context)


def _queries(source: DataSource, context: Context) -> Queries:
    """The rows this querier asks about: its site's own file (`query-path` in its node config;
    a deployment), else the job's test set (a simulation reads the job's folder). A deployed
    site with its own data but no query file is refused: it would query the coordinator's
    rows, which it does not hold."""
    query_path = context.node_config.get(QUERY_PATH)
    local_file = context.node_config.get("data-path")
    if query_path:
        return load_queries(source, Path(str(query_path)), Path(local_file) if local_file else None)
    if local_file:
        raise ProtocolError(
            f"this site is the job's querier but its node config names no {QUERY_PATH}: "
            f"start its SuperNode with `fedhe deploy site … --query-path FILE`, a CSV of the "
            "job's feature columns (the target column optional) that stays at the site."
        )
    test = test_data(source)
    if test is None:
        raise ProtocolError("the querier has no test set to ask queries from.")
    return Queries.of(test)


def _released(
    msg: Message, context: Context, job_id: str, config: dict[str, Any], via: str = ""
) -> np.ndarray:
    """What the key holder sealed to this querier (the aggregator relayed it unread); the
    plaintext twin's answers come as they are."""
    payload = protocol.payload_of(msg.content)
    if "sealed" not in payload:
        if not allows_plaintext(context):
            raise ProtocolError("an answer in the clear reached a node that refuses plaintext.")
        return protocol.array_from_bytes(payload["values"])
    return trust.open_release(
        context, job_id, str(config["output"]), int(config["round"]), payload["sealed"], via=via
    )


def _keep_mask(context: Context, batch: str, rho: np.ndarray) -> None:
    """The querier's mask ρ of one query batch stays on this node until its answer comes."""
    context.state[_QUERY_RECORD + batch] = ConfigRecord({"rho": protocol.array_to_bytes(rho)})


def _take_mask(context: Context, batch: str) -> np.ndarray:
    record = context.state.get(_QUERY_RECORD + batch)
    if record is None:
        raise ProtocolError(f"no open query batch {batch!r} on this party.")
    del context.state[_QUERY_RECORD + batch]
    return protocol.array_from_bytes(bytes(record["rho"]))


def _label(config: dict[str, Any]) -> str:
    return mac_label(str(config["output"]), int(config["release-round"]))


def _party_name(config: dict[str, Any]) -> str:
    return f"party-{int(config['party-index'])}"


def _keep_output(context: Context, job_id: str, name: str, values: np.ndarray) -> None:
    """What the job released to this party: written under the node's `output-dir` when its
    config names one (deployment), and kept in the node's state for this run."""
    context.state[_OUTPUT_RECORD + f"{job_id}.{name}"] = ConfigRecord(
        {"values": protocol.array_to_bytes(values)}
    )
    folder = context.node_config.get("output-dir")
    if folder:
        path = site_model.job_folder(Path(str(folder)), job_id)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        np.save(path / f"{name}.npy", values, allow_pickle=False)


def _keep_answers(
    context: Context,
    job_id: str,
    name: str,
    start: int,
    values: np.ndarray,
    source: DataSource,
) -> None:
    """A querier's answers to one batch (predictions, or logits one column per class): kept in
    the node's state for this run and, when its config names an `output-dir`, appended to
    `<output-dir>/<job id>/<name>.csv`, one row per query (`query`: its row in the query file;
    `prediction`: the label as the job's data writes it). They never leave this node."""
    context.state[_OUTPUT_RECORD + f"{job_id}.{name}-{start}"] = ConfigRecord(
        {"values": protocol.array_to_bytes(values)}
    )
    folder = context.node_config.get("output-dir")
    if not folder:
        return
    table = pd.DataFrame({"query": np.arange(start, start + len(values))})
    if values.ndim == 2:
        for column in range(values.shape[1]):
            table[f"logit-{column}"] = values[:, column]
        predicted = np.argmax(values, axis=1)
    else:
        predicted = values
    classes = source.classes
    table["prediction"] = [classes[int(p)] for p in predicted] if classes else predicted
    path = site_model.job_folder(Path(str(folder)), job_id)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    answers = path / f"{name}.csv"
    if start == 0:  # a fresh file, the site's own (owner only)
        answers.unlink(missing_ok=True)
        answers.touch(mode=0o600)
    table.to_csv(answers, mode="a", header=start == 0, index=False)


def _regression_data(
    config: dict[str, Any], job: dict[str, Any], data: Dataset
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Standardized features, the target (0/1 for logreg, standardized for linreg), logistic?"""
    standardizer = Standardizer.from_dict(config["standardizer"])
    logistic = config["task"] == logreg.TASK
    if logistic:
        logreg.check_binary(data.y, "this party's training labels")
    y = data.y.astype(float) if logistic else standardizer.target(data.y)
    return standardizer.features(data.X), y, logistic


def _batch(n_samples: int, batch_size: int, seed: int) -> np.ndarray | None:
    """A random mini-batch of this round, or None (all samples) when batch_size is 0 or ≥ n."""
    if batch_size <= 0 or batch_size >= n_samples:
        return None
    return np.random.default_rng(seed).choice(n_samples, size=batch_size, replace=False)


def _contribute(
    msg: Message,
    context: Context,
    job: dict[str, Any],
    arrays: Any,
    n_samples: int,
    *,
    sum_bound: float,
    n_terms: int = 1,
    min_scale_bits: int | None = None,
    packing: str = aggregate.COMPLEX,
    parties: int | None = None,
    metrics: dict[str, float] | None = None,
) -> Message:
    """Reply with this party's secure-aggregation contribution and how long encryption took."""
    started = time.perf_counter()
    contribution = aggregate.party_contribution(
        arrays,
        n_samples,
        aggregate.Layout.of(arrays),
        _public_context(context, job["job-id"]),
        sum_bound=sum_bound,
        n_terms=n_terms,
        min_scale_bits=min_scale_bits,
        packing=packing,
        parties=parties,
    )
    public = _public_context(context, job["job-id"])
    payload = {"contribution": contribution}
    if public is not None:
        config = protocol.config_of(msg.content)
        payload |= trust.tag(
            context,
            job["job-id"],
            contribution,
            public,
            str(config["output"]),
            int(config["release-round"]),
        )
    encrypt_s = time.perf_counter() - started
    return Message(
        protocol.content(
            msg.metadata.message_type,
            protocol.REPLY,
            payload=payload,
            metrics={"n-samples": n_samples, "encrypt-s": encrypt_s, **(metrics or {})},
        ),
        reply_to=msg,
    )


def _open(
    msg: Message, context: Context, *, fault_injectable: bool = False
) -> tuple[dict[str, Any], dict[str, Any], Dataset]:
    """This message's settings, the job's state on this party and the party's own data."""
    config = protocol.config_of(msg.content)
    job = _job(context, str(config["job-id"]))
    if fault_injectable and int(config.get("fail-party", -1)) == job["party-index"]:
        raise ProtocolError(
            f"this party drops out (simulated fault: drop-party={job['party-index']})."
        )
    return config, job, _own_data(job["source"], job["party-index"], context)


def _own_data(source: DataSource, index: int, context: Context) -> Dataset:
    """This party's training data: its share of the job's data folder (simulation), or its
    site's own file, the SuperNode's data-path (deployment)."""
    local_file = context.node_config.get("data-path")
    return party_data(source, index, str(local_file) if local_file else None)


def site_private(err: FedHEError, context: Context) -> FedHEError:
    """What a deployed party's refusal may tell the aggregator (it lands in result.json): that
    the site's data failed, never its file path, a line, a column or a raw cell (a patient's
    value), nor the size of a value it would not encrypt. The site's own log keeps the whole
    message. Simulation nodes read the aggregator's own folder: their refusals stay whole."""
    own_files = context.node_config.get("data-path") or context.node_config.get(QUERY_PATH)
    deployed_party = own_files and context.node_config.get("role") != protocol.ROLE_KEYHOLDER
    if not deployed_party or not isinstance(err, DataError | ValueRangeError):
        return err
    log.error("this site's data cannot take part: %s", err)
    return type(err)(
        "this site's data cannot take part in the job; what is wrong stays at the site: see its "
        "log, or run `fedhe check-data` there on its file."
    )


def _round_seed(config: dict[str, Any], job: dict[str, Any], purpose: int) -> int:
    """Distinct per job seed, round, party and purpose, identical in the HE run and its twin."""
    return seeds.derive_seed(
        int(config["seed"]), round_=int(config["round"]), party=job["party-index"], purpose=purpose
    )


def _job(context: Context, job_id: str) -> dict[str, Any]:
    record = context.state.get(_JOB_RECORD + job_id)
    if record is None:
        raise ProtocolError(f"job {job_id!r} was not set up on this party: send query.setup first.")
    return {
        "job-id": job_id,
        "source": DataSource.from_dict(protocol.from_json(record["source"])),
        "party-index": int(record["party-index"]),
        "n-parties": int(record["n-parties"]),
    }


def _accept_context(context: Context, job_id: str, payload: dict[str, bytes]) -> None:
    """The job's public context, come after setup (`context-follows`): checked as at setup
    (no secret key, real parameters) and bound into the job's MAC seeds; a job keeps one."""
    _job(context, job_id)
    public_bytes = payload["public-context"]
    public = PublicContext.from_bytes(public_bytes)
    _refuse_another_context(context, job_id, public_bytes)
    trust.bind_context(context, job_id, public.fingerprint)
    context.state[_CONTEXT_RECORD + job_id] = ConfigRecord({"bytes": public_bytes})


def _refuse_another_context(context: Context, job_id: str, public_bytes: bytes) -> None:
    """A job keeps the one public context it was given (at setup, or with the moments): a
    later setup or moments message with another would have this party encrypt under a key
    the key holders did not make."""
    stored = context.state.get(_CONTEXT_RECORD + job_id)
    if stored is not None and bytes(stored["bytes"]) != public_bytes:
        raise ProtocolError(
            f"job {job_id!r} already has another public context on this party: refusing to "
            "switch keys within a job."
        )


def _public_context(context: Context, job_id: str) -> PublicContext | None:
    """The job's public context; None (contribute in the clear) only on a node whose own config
    allows the plaintext twin: any other node without the context refuses."""
    record = context.state.get(_CONTEXT_RECORD + job_id)
    if record is None:
        if not allows_plaintext(context):
            raise ProtocolError(
                f"job {job_id!r} has no public context on this party: contributing now would "
                "send its data in the clear. The context comes at setup or with the feature "
                "moments; this node's config does not allow the plaintext twin."
            )
        return None
    return _load_public(bytes(record["bytes"]))


@functools.lru_cache(maxsize=8)
def _load_public(data: bytes) -> PublicContext:
    """Deserializing a public context costs ~20 ms; one simulation process serves many parties
    of the same job, a deployed party many messages. Public material only: safe to share."""
    return PublicContext.from_bytes(data)
