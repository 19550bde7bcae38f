"""Job settings, validated once: from Flower's run_config (dashed keys) or from the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedhe.errors import FedHEError

TASKS = ("aggregate", "linreg", "logreg", "knn", "mlp")
QUERY_MODES = ("plain", "encrypted")
# auto: quantized while its rounding stays small (fedhe.tasks.aggregate.choose_packing)
UPDATE_PACKINGS = ("auto", "quantized", "complex")
MODES = ("exact", "gradient", "encrypted-model")
DEFAULT_DATASET = {
    "aggregate": "breast_cancer",
    "linreg": "diabetes",
    "logreg": "breast_cancer",
    "knn": "breast_cancer",
    "mlp": "digits",
}
ACTIVATIONS = ("relu", "square", "relu-poly", "silu-poly")
DEFAULT_ACTIVATION = {"mlp": "square"}
DEFAULT_HIDDEN = {"mlp": "32"}
DEFAULT_MODE = {"linreg": "exact", "logreg": "gradient"}


class ConfigError(FedHEError, ValueError):
    """A job setting is missing, of the wrong type or out of range."""


PARTIES_HOLD_KEYS = "parties"  # --keyholders parties: each party holds a share of the key


@dataclass(frozen=True)
class JobConfig:
    """Settings every task keeps (`parties` … `out`) and the ones secure aggregation adds."""

    task: str = "aggregate"
    parties: int = 5
    min_parties: int = 3
    rounds: int = 3
    dataset: str = ""  # empty: the task's default (DEFAULT_DATASET)
    data_dir: str = ""
    target: str = ""
    seed: int = 0
    out: str = "runs/latest"
    keyholder_partition_id: int = -1  # simulation: which virtual node is the key holder (-1: last)
    keyholders: str = "1"  # holders of the job's key: a count, or "parties" (each party a share)
    threshold: int = 0  # key holders needed to decrypt (0: all of them)
    local_epochs: int = 2
    batch_size: int = 32  # per party and step; gradient mode: 0 = all local samples
    lr: float = 0.1
    clip: float = 10.0  # |Δw| per coordinate is clipped to this; bounds the encrypted sum
    mode: str = ""  # linreg: exact (default), gradient, encrypted-model; logreg: the last two
    l2: float = 0.0  # L2 penalty per sample on standardized coefficients (not the intercept)
    hidden: str = ""  # MLP hidden widths, e.g. "32,16"; empty: logistic/softmax regression
    # Also run the same job in the clear, for result.json. Off: `fedhe simulate` turns it on;
    # a deployment never does, and parties refuse plaintext unless node config allows it.
    plaintext_twin: bool = False
    drop_party: int = -1  # simulation fault: this party index fails every training round
    timeout_s: float = 600.0
    keyholder_retries: int = 2  # more tries when the key holder stays silent (not on refusal)
    k: int = 5  # knn: neighbours per query
    query: str = "plain"  # knn: the querier sends its queries in the clear or encrypted
    query_batch: int = 32  # knn: queries per batch (one ranking and one vote release each)
    queries: int = 0  # knn, mlp: the querier's first this many test rows (0: all of them)
    querier: int = 0  # knn: the party index that asks the queries (the test set)
    standardize: bool = True  # knn: distances on globally standardized features (else raw)
    activation: str = ""  # hidden activation: relu (aggregate's default), square, relu-poly, …
    alpha: float = 0.0  # built-in data: Dirichlet(alpha) label skew across parties; 0: IID
    single_queries: int = 3  # mlp: test samples also sent one by one (latency path)
    optimizer: str = "sgd"  # local training: sgd or adam
    packing: str = "auto"  # model-update sums: quantized (4 values per slot), complex (2), auto
    resume: bool = False  # continue from the checkpoint in `out` after an aggregator crash

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r} is not one of {list(TASKS)}.")
        if self.parties < 1:
            raise ConfigError(f"parties must be ≥ 1, got {self.parties}.")
        if not 1 <= self.min_parties <= self.parties:
            raise ConfigError(
                f"min-parties must be between 1 and parties={self.parties}, got {self.min_parties}."
            )
        if self.rounds < 1:
            raise ConfigError(f"rounds must be ≥ 1, got {self.rounds}.")
        if self.local_epochs < 1 or self.batch_size < 0 or not self.lr > 0:
            raise ConfigError("local-epochs and lr must be positive, batch-size ≥ 0.")
        if self.batch_size == 0 and self.task == "aggregate":
            raise ConfigError("batch-size 0 (all local samples) is for gradient mode only.")
        if not self.clip >= 1.0:
            raise ConfigError(
                f"clip must be ≥ 1 (it also bounds the sample counts), got {self.clip}."
            )
        if self.mode and self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {list(MODES)}.")
        if self.task == "logreg" and self.mode == "exact":
            raise ConfigError("logreg has no exact mode (no closed form); use --mode gradient.")
        if self.task == "aggregate" and self.mode:
            raise ConfigError("--mode applies to linreg and logreg only.")
        if self.keyholder_retries < 0:
            raise ConfigError(f"keyholder-retries must be ≥ 0, got {self.keyholder_retries}.")
        self._check_keyholders()
        if self.l2 < 0:
            raise ConfigError(f"l2 must be ≥ 0, got {self.l2}.")
        if self.queries < 0:
            raise ConfigError(f"queries must be ≥ 0 (0: every test row), got {self.queries}.")
        if self.k < 1 or self.query_batch < 1:
            raise ConfigError(f"k and query-batch must be ≥ 1, got {self.k}, {self.query_batch}.")
        if self.query not in QUERY_MODES:
            raise ConfigError(f"query {self.query!r} is not one of {list(QUERY_MODES)}.")
        if not 0 <= self.querier < self.parties:
            raise ConfigError(f"querier must be a party index 0..{self.parties - 1}.")
        if self.activation and self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {list(ACTIVATIONS)}.")
        if self.task == "mlp" and self.activation_name == "relu":
            raise ConfigError(
                "the mlp task evaluates the model on encrypted inputs: choose a polynomial "
                "activation (square, relu-poly, silu-poly), not relu."
            )
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer {self.optimizer!r} is not one of ['sgd', 'adam'].")
        if self.packing not in UPDATE_PACKINGS:
            raise ConfigError(f"packing {self.packing!r} is not one of {list(UPDATE_PACKINGS)}.")
        if self.alpha < 0 or self.single_queries < 0:
            raise ConfigError("alpha and single-queries must be ≥ 0.")
        if self.data_dir and not self.target:
            raise ConfigError("--data-dir needs --target: the name of the label column.")
        self.hidden_widths  # noqa: B018 - validates the string

    def _check_keyholders(self) -> None:
        object.__setattr__(self, "keyholders", str(self.keyholders))  # JobConfig(keyholders=3)
        if self.keyholders != PARTIES_HOLD_KEYS and not (
            self.keyholders.isdigit() and int(self.keyholders) >= 1
        ):
            raise ConfigError(
                f"keyholders must be a count ≥ 1 or {PARTIES_HOLD_KEYS!r}, got {self.keyholders!r}."
            )
        count = self.keyholder_count
        if not 0 <= self.threshold <= count:
            raise ConfigError(
                f"threshold must be between 1 and the {count} key holders (0: all of them), got "
                f"{self.threshold}."
            )
        if count > 1 and self.decryption_threshold == 1:
            raise ConfigError(
                "threshold 1 lets any one key holder decrypt alone: that is a single key holder "
                "with copies. Choose a threshold of 2 or more."
            )
        if self.parties_hold_keys and self.regression_mode == "exact":
            raise ConfigError(
                "exact linreg releases the masked normal equations to one key holder, and every "
                "party knows the masks R, S: with --keyholders parties that holder would read "
                "the global XᵀX. Use --mode gradient, or dedicated key holders (--keyholders 3)."
            )

    @property
    def parties_hold_keys(self) -> bool:
        """Every party holds a share of the key: no key holder apart from the parties."""
        return self.keyholders == PARTIES_HOLD_KEYS

    @property
    def keyholder_count(self) -> int:
        return self.parties if self.parties_hold_keys else int(self.keyholders)

    @property
    def activation_name(self) -> str:
        return self.activation or DEFAULT_ACTIVATION.get(self.task, "relu")

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        hidden = self.hidden or DEFAULT_HIDDEN.get(self.task, "")
        try:
            widths = tuple(int(w) for w in hidden.split(",") if w.strip())
        except ValueError as err:
            raise ConfigError(
                f"hidden must be comma-separated widths, got {self.hidden!r}."
            ) from err
        if any(w < 1 for w in widths):
            raise ConfigError(f"hidden widths must be positive, got {self.hidden!r}.")
        return widths

    @property
    def dataset_name(self) -> str:
        return self.dataset or DEFAULT_DATASET[self.task]

    @property
    def regression_mode(self) -> str:
        return self.mode or DEFAULT_MODE.get(self.task, "")

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

    def to_run_config(self) -> dict[str, Any]:
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> JobConfig:
        """Read Flower's run_config: dashed keys, unknown keys refused, types coerced."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown setting {key!r}; known: {sorted(known)}.")
            values[name] = _coerce(key, raw, type(getattr(cls(), name)))
        return cls(**values)


def _coerce(key: str, raw: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, str):
                if raw.lower() not in {"true", "false", "1", "0"}:
                    raise ValueError(raw)
                return raw.lower() in {"true", "1"}
            return bool(raw)
        return kind(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"setting {key!r}={raw!r} is not a {kind.__name__}.") from err
