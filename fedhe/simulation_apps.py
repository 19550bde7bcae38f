"""fedhe's ServerApp and ClientApp as `fedhe.simulation` hands them to Flower's simulation
runtime: each imports the real one (torch, scikit-learn, TenSEAL: seconds) on first use, so
the ServerApp's thread loads it while the runtime starts Ray and its actors, and each Ray
worker loads the ClientApp itself (this process never needs it). Kept apart from
fedhe.simulation so that importing the CLI does not import Flower."""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedhe.config import JobConfig

__all__ = ["ClientAppOnFirstUse", "ServerAppOnFirstUse"]


class ServerAppOnFirstUse(ServerApp):
    """fedhe's ServerApp for `config`, imported (torch, scikit-learn, …: seconds) when Flower's
    runtime starts it in its own thread, while the runtime's main thread starts the actors."""

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self.config = config

    def __call__(self, grid: Grid, context: Context) -> None:
        from fedhe.aggregator.app import build_server_app
        from fedhe.aggregator.session import SIMULATION_WINDOW

        build_server_app(self.config, window=SIMULATION_WINDOW)(grid, context)


class ClientAppOnFirstUse(ClientApp):
    """`fedhe.simulation.simulation_client_app(kept_out)`, built in each Ray worker on its
    first message (the node discovery, before any job's clock starts), with torch's training
    warmed up there."""

    def __init__(self, kept_out: str | None) -> None:
        super().__init__()
        self.kept_out = kept_out

    def __call__(self, message: Message, context: Context) -> Message:
        return self.app()(message, context)

    def app(self) -> ClientApp:
        """The ClientApp itself (built and warmed up once per process)."""
        return _warm_client_app(self.kept_out)


@functools.cache
def _warm_client_app(kept_out: str | None) -> ClientApp:
    from fedhe.clients.party import warm_up_training
    from fedhe.simulation import simulation_client_app

    app = simulation_client_app(kept_out)
    warm_up_training()
    return app
