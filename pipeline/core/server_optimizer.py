"""The server's optimiser: how the aggregate of a round moves the global model (Reddi et al., ICLR 2021).

The aggregate ``delta`` (the defense's step, a change of the parameters) is the negative of a
pseudo-gradient. ``sgd`` adds ``lr x delta`` (with ``lr = 1``, FedAvg and the paper: the global model
plus the step, bit for bit); ``momentum`` is FedAvgM (Hsu et al. 2019): ``m = beta1 m + delta``, the
model plus ``lr x m``; ``adam`` is FedAdam: ``m = beta1 m + (1 - beta1) delta``,
``v = beta2 v + (1 - beta2) delta^2``, the model plus ``lr x m / (sqrt(v) + tau)``, without bias
correction, as Reddi et al. write it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.lazy import torch

from pipeline.core.errors import check, positive

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass
class ServerConfig:
    """The server's optimiser; the defaults are FedAvg's (the global model plus the aggregate)."""

    optimizer: str = "sgd"  # sgd | momentum (FedAvgM) | adam (FedAdam)
    lr: float = 1.0  # the server's learning rate, on the aggregate
    beta1: float = 0.9  # momentum's and adam's first-moment decay
    beta2: float = 0.99  # adam's second-moment decay
    tau: float = 1.0e-3  # adam's adaptivity: added to sqrt(v)

    def validate(self) -> None:
        check(self.optimizer in SERVER_OPTIMIZERS, "server.optimizer",
              f"must be one of {', '.join(SERVER_OPTIMIZERS)}", self.optimizer)
        check(positive(self.lr), "server.lr", "must be a finite number > 0", self.lr)
        for name in ("beta1", "beta2"):
            check(0 <= getattr(self, name) < 1, f"server.{name}", "must be in [0, 1)", getattr(self, name))
        check(positive(self.tau), "server.tau", "must be a finite number > 0", self.tau)


def server_step(cfg: ServerConfig, params: torch.Tensor, delta: torch.Tensor,
                state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The global parameters after one round's aggregate ``delta`` (both (P,)), and the optimiser's
    new state (``{}`` at the first round; ``m``, and ``v`` for adam)."""
    if cfg.optimizer == "sgd":
        return (params + delta if cfg.lr == 1 else params + cfg.lr * delta), state
    if cfg.optimizer == "momentum":
        m = delta if "m" not in state else cfg.beta1 * state["m"].to(delta.device) + delta
        return params + cfg.lr * m, {"m": m}
    m = (1 - cfg.beta1) * delta + (cfg.beta1 * state["m"].to(delta.device) if "m" in state else 0)
    v = (1 - cfg.beta2) * delta.square() + (cfg.beta2 * state["v"].to(delta.device) if "v" in state else 0)
    return params + cfg.lr * m / (v.sqrt() + cfg.tau), {"m": m, "v": v}
