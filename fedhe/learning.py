"""The plaintext machine learning a party runs at home: a small torch classifier and its training.

Nothing here is encrypted: parties train locally on their own data, and only the resulting
update goes through a secure-aggregation job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedhe.config import ConfigError
from fedhe.errors import ShapeError
from fedhe.tasks import mlp
from fedhe.tasks.moments import Standardizer


@dataclass(frozen=True)
class ModelSpec:
    """A logistic/softmax regression (no hidden layer) or an MLP whose hidden layers use
    `activation`: "relu", or a polynomial one that encrypted inference can evaluate
    (`fedhe.tasks.mlp.ACTIVATIONS`: square, relu-poly, silu-poly)."""

    n_features: int
    n_classes: int
    hidden: tuple[int, ...] = ()
    activation: str = "relu"

    @property
    def n_outputs(self) -> int:
        return 1 if self.n_classes == 2 else self.n_classes

    def to_dict(self) -> dict[str, object]:
        return {
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "hidden": list(self.hidden),
            "activation": self.activation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelSpec:
        return cls(
            int(data["n_features"]),  # type: ignore[arg-type]
            int(data["n_classes"]),  # type: ignore[arg-type]
            tuple(data.get("hidden", ())),  # type: ignore[arg-type]
            str(data.get("activation", "relu")),
        )


OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.1
    seed: int = 0
    optimizer: str = "sgd"  # "sgd" or "adam" (fresh state each round: nothing carries over)


def build_model(spec: ModelSpec, *, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = spec.n_features
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), _activation(spec.activation)]
        width = hidden
    layers.append(nn.Linear(width, spec.n_outputs))
    return nn.Sequential(*layers).double()


class Polynomial(nn.Module):
    """c₀ + c₁x + c₂x²: an activation that CKKS evaluates with one multiplication."""

    def __init__(self, coefficients: tuple[float, float, float]) -> None:
        super().__init__()
        self.coefficients = coefficients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c0, c1, c2 = self.coefficients
        return c0 + c1 * x + c2 * x * x


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    return Polynomial(mlp.activation(name).coefficients)


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    try:
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})
    except RuntimeError as err:  # torch names the missing, unexpected or misshapen tensors
        raise ShapeError(f"the weights do not fit the model's layers: {err}") from err


def local_train(model: nn.Module, X: np.ndarray, y: np.ndarray, config: TrainConfig) -> float:
    """Mini-batch SGD on one party's data; returns the mean training loss of the last epoch."""
    generator = torch.Generator().manual_seed(config.seed)
    features, labels = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y)
    optimizer = _optimizer(model, config)
    loss_fn = _loss_fn(model)
    model.train()
    last = 0.0
    for _ in range(config.epochs):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(features[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        last = total / max(len(features), 1)
    return last


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    raise ConfigError(
        f"optimizer {config.optimizer!r} is not one of {list(OPTIMIZERS)}: set the job's "
        "optimizer to one of them."
    )


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy loss."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(X, dtype=torch.float64))
        labels = torch.as_tensor(y)
        loss = float(_loss_fn(model)(logits, labels))
        predicted = (logits.squeeze(1) > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return {"accuracy": float((predicted == labels).double().mean()), "loss": loss}


def _loss_fn(model: nn.Module):
    binary = _n_outputs(model) == 1
    if binary:
        bce = nn.BCEWithLogitsLoss()
        return lambda logits, labels: bce(logits.squeeze(1), labels.double())
    return nn.CrossEntropyLoss()


def _n_outputs(model: nn.Module) -> int:
    last: Sequence[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features


def standardize(X: np.ndarray, mean: np.ndarray, meansq: np.ndarray) -> np.ndarray:
    """Scale features by global moments (E[x], E[x²]) that secure aggregation computed."""
    return Standardizer.from_moments(mean, meansq).features(X)
