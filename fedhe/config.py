"""Job settings, validated once: from Flower's run_config (dashed keys) or from the CLI.

A job's settings are the ones every task reads (`JobConfig`'s own fields) plus one section per
group of tasks (`TrainingSettings` … `MlpSettings`, each naming the `TASKS` that read it).
Every setting's type and range is one row of `CONSTRAINTS`, checked by one function,
`validate_settings`; the few checks that tie settings together are the named functions in
`RULES`. A section the job's task does not read must keep its defaults: a setting the job would
ignore is refused. On the wire (Flower's flat run_config, the CLI) each setting stays one dashed
key (`local-epochs`); `JobConfig.of` takes the same settings by field name (`local_epochs`).
"""

from __future__ import annotations

import difflib
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

from fedhe.errors import FedHEError

TASKS = ("aggregate", "linreg", "logreg", "knn", "mlp")
QUERY_MODES = ("plain", "encrypted")
# auto: quantized while its rounding stays small (fedhe.tasks.aggregate.choose_packing)
UPDATE_PACKINGS = ("auto", "quantized", "complex")
MODES = ("exact", "gradient", "encrypted-model")
OPTIMIZERS = ("sgd", "adam")
IMPUTE_MODES = ("none", "mean")
ACTIVATIONS = ("relu", "square", "relu-poly", "silu-poly")
DEFAULT_DATASET = {
    "aggregate": "breast_cancer",
    "linreg": "diabetes",
    "logreg": "breast_cancer",
    "knn": "breast_cancer",
    "mlp": "digits",
}
DEFAULT_ACTIVATION = {"mlp": "square"}
DEFAULT_HIDDEN = {"mlp": "32"}
DEFAULT_MODE = {"linreg": "exact", "logreg": "gradient"}
# What a task trains with, per mode, where a job leaves the setting out (`JobConfig.of`, the
# CLI): the shared defaults (3 rounds of lr 0.1 on mini-batches of 32) suit HE-FedAvg but leave
# logreg at 0.92 on breast cancer (5 parties); full-batch steps of 4 for 100 rounds reach 0.98.
TASK_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("logreg", "gradient"): {"rounds": 100, "lr": 4.0, "batch_size": 0, "l2": 0.0022},
    ("logreg", "encrypted-model"): {"rounds": 20, "lr": 0.5},  # lr 2 diverges
    ("linreg", "gradient"): {"rounds": 40, "lr": 0.4, "batch_size": 0},
    ("linreg", "encrypted-model"): {"rounds": 20, "lr": 0.4},
}
# Built-in datasets with a continuous target (fedhe.data.datasets; tests/test_config.py keeps the
# two in step without config importing scikit-learn).
REGRESSION_DATASETS = ("diabetes", "synthetic")
CLASSIFYING_TASKS = ("aggregate", "logreg", "mlp")
PARTIES_HOLD_KEYS = "parties"  # --keyholders parties: each party holds a share of the key


class ConfigError(FedHEError, ValueError):
    """A job setting is missing, of the wrong type or out of range."""


def task_defaults(task: str, mode: str = "") -> dict[str, Any]:
    """The settings `task` (in `mode`; empty: the task's default mode) starts from where a job
    leaves them out, by field name; the others keep JobConfig's defaults."""
    return dict(TASK_DEFAULTS.get((task, mode or DEFAULT_MODE.get(task, "")), {}))


def setting_key(name: str) -> str:
    """The wire and CLI spelling of a setting: `local_epochs` → `local-epochs`."""
    return name.replace("_", "-")


# -- constraints: what one setting accepts --------------------------------------------------------


class Constraint(Protocol):
    def accepts(self, value: Any) -> bool: ...

    def refusal(self, key: str, value: Any) -> str: ...


@dataclass(frozen=True)
class Interval:
    """low ≤ value (low < value when `open_low`), and value ≤ high when there is a high."""

    low: float
    high: float | None = None
    open_low: bool = False
    why: str = ""  # added to the refusal: what the bound protects, or what a special value means

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value <= self.high)

    def refusal(self, key: str, value: Any) -> str:
        if self.high is not None:
            bound = f"between {self.low} and {self.high}"
        else:
            bound = f"{'>' if self.open_low else '≥'} {self.low}"
        why = f" ({self.why})" if self.why else ""
        return f"{key} must be {bound}{why}, got {value!r}."


@dataclass(frozen=True)
class Options:
    """One of `values`; with `task_default`, also "" (the task's default, chosen later)."""

    values: tuple[str, ...]
    task_default: bool = False

    def accepts(self, value: str) -> bool:
        return value in self.values or (self.task_default and value == "")

    def refusal(self, key: str, value: Any) -> str:
        empty = " (or empty: the task's default)" if self.task_default else ""
        return f"{key} {value!r} is not one of {list(self.values)}{empty}."


@dataclass(frozen=True)
class KeyHolderCount:
    """A count of key holders ≥ 1, or "parties": each party holds a share of the key."""

    def accepts(self, value: str) -> bool:
        return value == PARTIES_HOLD_KEYS or (
            re.fullmatch("[0-9]+", value) is not None and int(value) >= 1
        )

    def refusal(self, key: str, value: Any) -> str:
        return f"{key} must be a count ≥ 1 or {PARTIES_HOLD_KEYS!r}, got {value!r}."


@dataclass(frozen=True)
class Widths:
    """Comma-separated positive layer widths ("32,16"); empty: no hidden layer."""

    def accepts(self, value: str) -> bool:
        try:
            parse_widths(value)
        except ValueError:
            return False
        return True

    def refusal(self, key: str, value: Any) -> str:
        return f"{key} must be comma-separated positive widths such as '32,16', got {value!r}."


@dataclass(frozen=True)
class PartyChoice:
    """A party index ≥ 0, or a site name (a deployment: `fedhe deploy site NAME`)."""

    def accepts(self, value: int | str) -> bool:
        if isinstance(value, int):
            return value >= 0
        return bool(value) and value == value.strip()

    def refusal(self, key: str, value: Any) -> str:
        return f"{key} must be a party index ≥ 0 or a site name, got {value!r}."


def party_ref(raw: Any) -> int | str:
    """A party as a setting names it: its 0-based index (2, "2") or its site name
    ("hospital-b"); the kind of the `querier` setting (also the CLI's parser of it)."""
    if isinstance(raw, bool):
        raise TypeError(f"{raw!r} names no party")
    if isinstance(raw, numbers.Integral):
        return int(raw)
    if not isinstance(raw, str):
        raise TypeError(f"{raw!r} names no party")
    return int(raw) if raw.strip().isdigit() else raw


def querier_party(querier: int | str, names: Mapping[str, str]) -> str:
    """The protocol id (`party-<i>`) of the job's querier. An index stands as it is (a
    simulation's party order; a deployment numbers its sites in the order of their names); a
    name is looked up in `names` (protocol id → the name the user knows the party by: its site
    name, or its CSV file), and an unknown one is refused naming the known ones."""
    if isinstance(querier, int):
        return f"party-{querier}"
    for party, name in names.items():
        if name == querier:
            return party
    raise ConfigError(
        f"querier {querier!r} is none of this job's parties; they are "
        f"{sorted(set(names.values()))}: pass one of these names (or a party index)."
    )


def parse_widths(text: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in text.split(",") if w.strip())
    if any(w < 1 for w in widths):
        raise ValueError(f"widths must be positive: {text!r}")
    return widths


@dataclass(frozen=True)
class Setting:
    """One row of CONSTRAINTS: the setting's type and, where it has one, its constraint."""

    kind: type | Callable[[Any], Any]
    constraint: Constraint | None = None


# Every setting, shared and per section, by field name: the one place its range is written.
CONSTRAINTS: dict[str, Setting] = {
    # shared by every task
    "task": Setting(str, Options(TASKS)),
    "parties": Setting(int, Interval(1)),
    "min_parties": Setting(int, Interval(1)),  # ≤ parties: a rule
    "rounds": Setting(int, Interval(1)),
    "dataset": Setting(str),  # a built-in name, checked where it loads (fedhe.data.datasets)
    "data_dir": Setting(str),
    "target": Setting(str),
    "schema": Setting(str),  # schema.json shared by all sites; checked where it loads
    "impute": Setting(str, Options(IMPUTE_MODES)),
    "seed": Setting(int, Interval(0, 2**32 - 1)),
    "alpha": Setting(float, Interval(0, why="0: IID")),
    "out": Setting(str),
    "keyholder_partition_id": Setting(int, Interval(-1, why="-1: the node after the parties")),
    "keyholders": Setting(str, KeyHolderCount()),
    "threshold": Setting(int, Interval(0, why="0: all key holders")),  # ≤ key holders: a rule
    "plaintext_twin": Setting(bool),
    "drop_party": Setting(int, Interval(-1, why="-1: none")),
    "timeout_s": Setting(float, Interval(0, open_low=True)),
    "keyholder_retries": Setting(int, Interval(0)),
    "message_window": Setting(int, Interval(0, why="0: every message at once")),
    "resume": Setting(bool),
    # training
    "batch_size": Setting(int, Interval(0, why="0: all local samples, gradient mode")),
    "lr": Setting(float, Interval(0, open_low=True)),
    "clip": Setting(float, Interval(1, why="it also bounds the sample counts")),
    # fedavg
    "local_epochs": Setting(int, Interval(1)),
    "optimizer": Setting(str, Options(OPTIMIZERS)),
    "packing": Setting(str, Options(UPDATE_PACKINGS)),
    "hidden": Setting(str, Widths()),
    "activation": Setting(str, Options(ACTIVATIONS, task_default=True)),
    # regression
    "mode": Setting(str, Options(MODES, task_default=True)),
    "l2": Setting(float, Interval(0)),
    # knn
    "k": Setting(int, Interval(1)),
    "query": Setting(str, Options(QUERY_MODES)),
    "query_batch": Setting(int, Interval(1)),
    "standardize": Setting(bool),
    "keep_store": Setting(bool),  # simulation: keep the store and keys for later queries
    # inference
    "querier": Setting(party_ref, PartyChoice()),  # an index < parties: a rule
    "queries": Setting(int, Interval(0, why="0: every test row")),
    # mlp
    "single_queries": Setting(int, Interval(0)),
}


def validate_settings(settings: object) -> None:
    """Coerce each setting of `settings` (a JobConfig or one of its sections) to its type and
    check it against its row of CONSTRAINTS; the first bad one raises a ConfigError naming it."""
    for f in fields(settings):  # type: ignore[arg-type]
        if f.name in SECTIONS:
            continue
        row = CONSTRAINTS[f.name]
        key = setting_key(f.name)
        value = _coerce(key, getattr(settings, f.name), row.kind)
        if row.constraint is not None and not row.constraint.accepts(value):
            raise ConfigError(row.constraint.refusal(key, value))
        object.__setattr__(settings, f.name, value)


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}
_KIND_NAMES = {
    bool: "a bool (true or false)",
    int: "an int",
    float: "a number",
    str: "a string",
    party_ref: "a party index or a site name",
}


def _coerce(key: str, raw: Any, kind: type | Callable[[Any], Any]) -> Any:
    """`raw` as `kind` where it reads one way only ("6" and 6.0 as 6, "false" and 0 as False,
    3 as "3"); anything else is refused."""
    try:
        value = _as_kind(raw, kind)
    except (TypeError, ValueError, OverflowError):
        value = None
    if value is None:
        raise ConfigError(f"setting {key!r}={raw!r} is not {_KIND_NAMES[kind]}.")
    return value


def _as_kind(raw: Any, kind: type | Callable[[Any], Any]) -> Any:
    if kind is party_ref:
        return party_ref(raw)
    if kind is bool:
        if isinstance(raw, bool | numbers.Integral) and raw in (0, 1):
            return bool(raw)
        return _BOOL_WORDS.get(raw.lower()) if isinstance(raw, str) else None
    if isinstance(raw, bool):  # True is an int to Python, not a count
        return None
    if kind is int:
        if isinstance(raw, numbers.Real) and not float(raw).is_integer():
            return None
        return int(raw) if isinstance(raw, numbers.Real | str) else None
    if kind is float:
        return float(raw) if isinstance(raw, numbers.Real | str) else None
    return str(raw) if isinstance(raw, str | numbers.Integral) else None  # keyholders=3


# -- sections: the settings only some tasks read --------------------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    """Gradient steps on the parties' data (linreg's exact mode takes none)."""

    TASKS: ClassVar[tuple[str, ...]] = ("aggregate", "mlp", "linreg", "logreg")
    batch_size: int = 32  # per party and step; gradient mode: 0 = all local samples
    lr: float = 0.1
    clip: float = 10.0  # |Δw| per coordinate is clipped to this; bounds the encrypted sum

    def __post_init__(self) -> None:
        validate_settings(self)


@dataclass(frozen=True)
class FedAvgSettings:
    """The torch model HE-FedAvg trains, and how its updates are packed."""

    TASKS: ClassVar[tuple[str, ...]] = ("aggregate", "mlp")
    local_epochs: int = 2
    optimizer: str = "sgd"
    packing: str = "auto"  # model-update sums: quantized (4 values per slot), complex (2), auto
    hidden: str = ""  # hidden widths, e.g. "32,16"; empty: the task's (aggregate: none, mlp: 32)
    activation: str = ""  # hidden activation; empty: the task's (aggregate: relu, mlp: square)

    def __post_init__(self) -> None:
        validate_settings(self)


@dataclass(frozen=True)
class RegressionSettings:
    """How linreg and logreg fit their coefficients."""

    TASKS: ClassVar[tuple[str, ...]] = ("linreg", "logreg")
    mode: str = ""  # empty: the task's (linreg: exact, logreg: gradient)
    l2: float = 0.0  # L2 penalty per sample on standardized coefficients (not the intercept)

    def __post_init__(self) -> None:
        validate_settings(self)


@dataclass(frozen=True)
class KnnSettings:
    """Neighbours, and how the querier's queries travel."""

    TASKS: ClassVar[tuple[str, ...]] = ("knn",)
    k: int = 5
    query: str = "plain"  # the querier sends its queries in the clear or encrypted
    query_batch: int = 32  # queries per batch (one ranking and one vote release each)
    standardize: bool = True  # distances on globally standardized features (else raw)
    keep_store: bool = False  # keep the store and the keys for `fedhe predict` (simulation)

    def __post_init__(self) -> None:
        validate_settings(self)


@dataclass(frozen=True)
class InferenceSettings:
    """The party that asks the queries (it holds the test set, or in a deployment its own
    `query-path` file), and how many it asks. `querier`: a party index, or a site name."""

    TASKS: ClassVar[tuple[str, ...]] = ("knn", "mlp")
    querier: int | str = 0
    queries: int = 0  # the querier's first this many test rows (0: all of them)

    def __post_init__(self) -> None:
        validate_settings(self)


@dataclass(frozen=True)
class MlpSettings:
    """The MLP's single-sample latency path."""

    TASKS: ClassVar[tuple[str, ...]] = ("mlp",)
    single_queries: int = 3  # test samples also sent one by one

    def __post_init__(self) -> None:
        validate_settings(self)


Section = (
    TrainingSettings
    | FedAvgSettings
    | RegressionSettings
    | KnnSettings
    | InferenceSettings
    | MlpSettings
)
SECTIONS: dict[str, type[Section]] = {
    "training": TrainingSettings,
    "fedavg": FedAvgSettings,
    "regression": RegressionSettings,
    "knn": KnnSettings,
    "inference": InferenceSettings,
    "mlp": MlpSettings,
}
SECTION_OF: dict[str, str] = {
    f.name: name for name, section in SECTIONS.items() for f in fields(section)
}


# -- rules: the checks that tie settings together -------------------------------------------------


def sections_fit_the_task(config: JobConfig) -> None:
    """A section the task does not read keeps its defaults: the job would ignore a change."""
    for name, kind in SECTIONS.items():
        section = getattr(config, name)
        if not isinstance(section, kind):
            raise ConfigError(f"{name} must be a {kind.__name__}, got {section!r}.")
        if config.task in kind.TASKS:
            continue
        changed = [f for f in fields(section) if getattr(section, f.name) != f.default]
        if changed:
            listed = ", ".join(
                f"{setting_key(f.name)}={getattr(section, f.name)!r}" for f in changed
            )
            tasks = f"task{'s' * (len(kind.TASKS) > 1)} {', '.join(kind.TASKS)}"
            it, applies = ("them", "apply") if len(changed) > 1 else ("it", "applies")
            raise ConfigError(
                f"{listed} {applies} to {tasks} only; task {config.task} would ignore {it}: "
                f"leave {it} out."
            )


def min_parties_within_parties(config: JobConfig) -> None:
    if config.min_parties > config.parties:
        raise ConfigError(
            f"min-parties must be between 1 and parties={config.parties}, got {config.min_parties}."
        )


def querier_is_a_party(config: JobConfig) -> None:
    """An index must be a party's; a site name is checked against the sites that answer
    (`querier_party`, once the job knows them)."""
    querier = config.inference.querier
    if isinstance(querier, int) and querier >= config.parties:
        raise ConfigError(
            f"querier must be a party index 0..{config.parties - 1}, "
            f"got {config.inference.querier}."
        )


def threshold_within_keyholders(config: JobConfig) -> None:
    count = config.keyholder_count
    if config.threshold > count:
        raise ConfigError(
            f"threshold must be between 1 and the {count} key holders (0: all of them), got "
            f"{config.threshold}."
        )
    if count > 1 and config.decryption_threshold == 1:
        raise ConfigError(
            "threshold 1 lets any one key holder decrypt alone: that is a single key holder "
            "with copies. Choose a threshold of 2 or more."
        )


def exact_linreg_needs_dedicated_keyholders(config: JobConfig) -> None:
    if config.parties_hold_keys and config.regression_mode == "exact":
        raise ConfigError(
            "exact linreg releases the masked normal equations to one key holder, and every "
            "party knows the masks R, S: with --keyholders parties that holder would read "
            "the global XᵀX. Use --mode gradient, or dedicated key holders (--keyholders 3)."
        )


def logreg_has_no_exact_mode(config: JobConfig) -> None:
    if config.task == "logreg" and config.regression.mode == "exact":
        raise ConfigError("logreg has no exact mode (no closed form); use --mode gradient.")


def mlp_needs_polynomial_activation(config: JobConfig) -> None:
    if config.task == "mlp" and config.activation_name == "relu":
        raise ConfigError(
            "the mlp task evaluates the model on encrypted inputs: choose a polynomial "
            "activation (square, relu-poly, silu-poly), not relu."
        )


def whole_batches_for_regression_only(config: JobConfig) -> None:
    if config.training.batch_size == 0 and config.task in FedAvgSettings.TASKS:
        raise ConfigError(
            f"batch-size 0 (all local samples) is for linreg and logreg gradient mode only; "
            f"task {config.task} trains on mini-batches: choose a batch-size ≥ 1."
        )


def quantized_packing_needs_one_keyholder(config: JobConfig) -> None:
    # Quantized lanes decode by rounding, with guard bits sized for encryption noise; a group's
    # decryption shares each add smudging noise far above it.
    if config.fedavg.packing == "quantized" and config.keyholder_count > 1:
        raise ConfigError(
            "quantized packing cannot absorb a key-holder group's smudging noise; use "
            "--packing complex (or auto) with --keyholders > 1."
        )


def kept_store_needs_one_keyholder(config: JobConfig) -> None:
    if config.knn.keep_store and config.keyholder_count > 1:
        raise ConfigError(
            "keep-store keeps one key holder's state for `fedhe predict`; a key-holder group's "
            "shares cannot be kept in one run folder: run with --keyholders 1."
        )


def data_dir_needs_target(config: JobConfig) -> None:
    if config.data_dir and not config.target:
        raise ConfigError("--data-dir needs --target: the name of the label column.")


def classifiers_need_classes(config: JobConfig) -> None:
    built_in = not config.data_dir  # CSV labels are checked where they load
    if built_in and config.task in CLASSIFYING_TASKS and config.dataset_name in REGRESSION_DATASETS:
        raise ConfigError(
            f"{config.dataset_name} has a continuous target, and task {config.task} trains a "
            "classifier: use linreg (or knn) on it, or a classification dataset such as "
            "breast_cancer, iris, wine or digits."
        )


def schema_and_impute_need_data_dir(config: JobConfig) -> None:
    if (config.schema or config.impute != "none") and not config.data_dir:
        raise ConfigError(
            "--schema and --impute apply to your own CSV files: pass --data-dir and --target "
            "(built-in datasets have no text or missing cells)."
        )


Rule = Callable[["JobConfig"], None]
RULES: tuple[Rule, ...] = (
    sections_fit_the_task,
    min_parties_within_parties,
    querier_is_a_party,
    threshold_within_keyholders,
    exact_linreg_needs_dedicated_keyholders,
    logreg_has_no_exact_mode,
    mlp_needs_polynomial_activation,
    whole_batches_for_regression_only,
    kept_store_needs_one_keyholder,
    quantized_packing_needs_one_keyholder,
    data_dir_needs_target,
    classifiers_need_classes,
    schema_and_impute_need_data_dir,
)


# -- the job --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobConfig:
    """A job's settings: the ones every task reads, then one section per group of tasks.
    `JobConfig.of(task="knn", k=3)` builds one from flat settings."""

    task: str = "aggregate"
    parties: int = 5
    min_parties: int = 3
    rounds: int = 3
    dataset: str = ""  # empty: the task's default (DEFAULT_DATASET)
    data_dir: str = ""
    target: str = ""
    schema: str = ""  # schema.json: column types, categories (one-hot), units; empty: none
    impute: str = "none"  # "mean": missing feature cells get the secure global column mean
    seed: int = 0
    alpha: float = 0.0  # built-in data: Dirichlet(alpha) label skew across parties; 0: IID
    out: str = "runs/latest"
    keyholder_partition_id: int = -1  # simulation: which virtual node is the key holder (-1: last)
    keyholders: str = "1"  # holders of the job's key: a count, or "parties" (each party a share)
    threshold: int = 0  # key holders needed to decrypt (0: all of them)
    # Also run the same job in the clear, for result.json. Off: `fedhe simulate` turns it on;
    # a deployment never does, and parties refuse plaintext unless node config allows it.
    plaintext_twin: bool = False
    drop_party: int = -1  # simulation fault: this party index fails every training round
    timeout_s: float = 600.0
    keyholder_retries: int = 2  # more tries when the key holder stays silent (not on refusal)
    # Messages awaiting a reply at a time per exchange (0: all at once, as a deployment wants).
    # Flower's simulation engine runs faster with a window (aggregator.session.SIMULATION_WINDOW).
    message_window: int = 0
    resume: bool = False  # continue from the checkpoint in `out` after an aggregator crash
    training: TrainingSettings = field(default_factory=TrainingSettings)
    fedavg: FedAvgSettings = field(default_factory=FedAvgSettings)
    regression: RegressionSettings = field(default_factory=RegressionSettings)
    knn: KnnSettings = field(default_factory=KnnSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    mlp: MlpSettings = field(default_factory=MlpSettings)

    def __post_init__(self) -> None:
        validate_settings(self)
        for rule in RULES:
            rule(self)

    @classmethod
    def of(cls, **settings: Any) -> JobConfig:
        """A config from flat settings by field name (`task="knn", k=3`), each put in its
        section; a name that is no setting is refused. A setting left out takes the task's
        default (`TASK_DEFAULTS`: logreg trains 100 full-batch rounds), else JobConfig's."""
        task, mode = settings.get("task", cls.task), settings.get("mode", "")
        if isinstance(task, str) and isinstance(mode, str):  # else refused below, by type
            settings = task_defaults(task, mode) | settings
        shared: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in settings.items():
            if name in SECTION_OF:
                sections[SECTION_OF[name]][name] = value
            elif name in SHARED_SETTINGS:
                shared[name] = value
            else:
                raise ConfigError(_unknown(name))
        return cls(**shared, **{name: SECTIONS[name](**sections[name]) for name in SECTIONS})

    def settings(self) -> dict[str, Any]:
        """Every setting by field name, flat: the shared ones, then each section's."""
        flat = {name: getattr(self, name) for name in SHARED_SETTINGS}
        for name in SECTIONS:
            section = getattr(self, name)
            flat |= {f.name: getattr(section, f.name) for f in fields(section)}
        return flat

    def with_settings(self, **settings: Any) -> JobConfig:
        """This config with some flat settings changed (`resume=True, query="encrypted"`)."""
        return JobConfig.of(**(self.settings() | settings))

    def to_run_config(self) -> dict[str, Any]:
        return {setting_key(name): value for name, value in self.settings().items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> JobConfig:
        """Read Flower's run_config: flat dashed keys, unknown keys refused, types coerced."""
        return cls.of(**{key.replace("-", "_"): value for key, value in run_config.items()})

    @property
    def parties_hold_keys(self) -> bool:
        """Every party holds a share of the key: no key holder apart from the parties."""
        return self.keyholders == PARTIES_HOLD_KEYS

    @property
    def keyholder_count(self) -> int:
        return self.parties if self.parties_hold_keys else int(self.keyholders)

    @property
    def activation_name(self) -> str:
        return self.fedavg.activation or DEFAULT_ACTIVATION.get(self.task, "relu")

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return parse_widths(self.fedavg.hidden or DEFAULT_HIDDEN.get(self.task, ""))

    @property
    def dataset_name(self) -> str:
        return self.dataset or DEFAULT_DATASET[self.task]

    @property
    def regression_mode(self) -> str:
        return self.regression.mode or DEFAULT_MODE.get(self.task, "")

    @property
    def num_nodes(self) -> int:
        """Simulated SuperNodes: every party plus the key holders (none apart from the parties
        when they hold the key's shares)."""
        return self.parties + (0 if self.parties_hold_keys else self.keyholder_count)

    @property
    def keyholder_node(self) -> int:
        """The first key holder's partition id (the others follow it)."""
        return self.parties if self.keyholder_partition_id < 0 else self.keyholder_partition_id

    @property
    def decryption_threshold(self) -> int:
        return self.threshold or self.keyholder_count


SHARED_SETTINGS: tuple[str, ...] = tuple(
    f.name for f in fields(JobConfig) if f.name not in SECTIONS
)


def _unknown(name: str) -> str:
    key = setting_key(name)
    known = sorted(setting_key(n) for n in CONSTRAINTS)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown setting {key!r}{hint}; known: {known}."
