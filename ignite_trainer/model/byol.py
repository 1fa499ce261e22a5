"""BYOL-A: the networks of self-supervised pretraining (Niizumi et al., "BYOL for Audio: Self-Supervised
Learning for General-Purpose Audio Representation", IJCNN 2021).

Two augmented views of one window go through an *online* network (the registered model's encoder, then a
projector MLP, then a predictor MLP) and a *target* network (a copy of the encoder and projector whose
weights are an exponential moving average of the online ones, never trained by gradients). The loss is the
normalised MSE between the online prediction of one view and the target projection of the other,
symmetrised over the two views (`byol_loss`). No negative pairs are needed, so it works on small batches.

The encoder is the registered model itself: `encode` takes its ``embed`` (trunk, per-step projection and
pooling, every built-in model has one), or, for a model with only a ``trunk``, the trunk's output pooled by
mean plus max over time as BYOL-A does. The model's classification head is never touched, so after
pretraining ``BYOL.encoder`` is a plain model of the registry whose state dict loads strictly into
``build_model(name, n_mels=...)``.

The pieces that exist only for pretraining (projector, predictor, target network) are `BYOLHeads`, a
separate module, so that a checkpoint can hold the plain model under its usual key and these beside it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ignite_trainer.core.errors import ConfigError

__all__ = ["BYOL", "BYOLHeads", "mlp", "encode", "embedding_size", "byol_loss", "normalised_mse"]


def mlp(in_features: int, hidden: int, out: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear -> BatchNorm -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def embedding_size(model: nn.Module) -> int:
    """The size of `encode`'s output for ``model``; a model with neither ``embed`` nor ``trunk`` is a `ConfigError`."""
    if hasattr(model, "embed") and hasattr(model, "embedding_size"):
        return int(model.embedding_size)
    trunk = getattr(model, "trunk", None)
    if trunk is not None and hasattr(trunk, "out_features"):
        return int(trunk.out_features)
    raise ConfigError(f"model {type(model).__name__} has neither embed() with embedding_size nor a trunk with "
                      "out_features; pretraining needs one of them")


def encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled embedding ``[B, D]`` of windows ``x [B, n_mels, T]``: ``model.embed``, or the trunk pooled by
    mean + max over time."""
    if hasattr(model, "embed") and hasattr(model, "embedding_size"):
        return model.embed(x)[0]
    h = model.trunk(x)  # [B, T', D]
    return h.mean(dim=1) + h.amax(dim=1)


def normalised_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per sample ``|p/|p| - z/|z||^2 = 2 - 2 cos(p, z)``, in [0, 4]."""
    return 2.0 - 2.0 * F.cosine_similarity(p, z, dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The symmetrised BYOL loss: online predictions of each view against the target projection of the other,
    averaged over the batch (the sum of both directions, so in [0, 8])."""
    return (normalised_mse(p1, z2.detach()) + normalised_mse(p2, z1.detach())).mean()


class BYOLHeads(nn.Module):
    """What pretraining adds around the encoder: the online projector and predictor, and the target network
    (encoder copy + projector copy), whose parameters take no gradient."""

    def __init__(self, encoder: nn.Module, projector_dim: int = 128, hidden_dim: int = 512) -> None:
        super().__init__()
        size = embedding_size(encoder)
        self.projector = mlp(size, hidden_dim, projector_dim)
        self.predictor = mlp(projector_dim, hidden_dim, projector_dim)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]


class BYOL(nn.Module):
    """The online network (``encoder``, the plain registered model, and ``heads``) and its EMA target.

    ``forward(view1, view2)`` returns the symmetrised loss; call `update_target` after each optimizer step.

    Example::

        model = build_model("attention_cnn", n_mels=64)
        byol = BYOL(model, ema=0.99)
        loss = byol(view1, view2); loss.backward(); optimizer.step(); byol.update_target()
    """

    def __init__(self, encoder: nn.Module, *, ema: float = 0.99, projector_dim: int = 128,
                 hidden_dim: int = 512) -> None:
        super().__init__()
        if not 0.0 <= ema <= 1.0:
            raise ConfigError(f"pretrain_ema={ema} is out of range (must be in [0, 1])")
        self.encoder = encoder
        self.heads = BYOLHeads(encoder, projector_dim, hidden_dim)
        self.ema = float(ema)

    def online_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the encoder (without its classification head, which gets no gradient),
        the projector and the predictor."""
        return [*self.encoder.parameters(), *self.heads.projector.parameters(), *self.heads.predictor.parameters()]

    def online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(projection, prediction)`` of the online network."""
        z = self.heads.projector(encode(self.encoder, x))
        return z, self.heads.predictor(z)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads.target_projector(encode(self.heads.target_encoder, x))

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        _, p1 = self.online(view1)
        _, p2 = self.online(view2)
        return byol_loss(p1, p2, self.target(view1), self.target(view2))

    @torch.no_grad()
    def update_target(self) -> None:
        """``target <- ema * target + (1 - ema) * online``, parameter by parameter (buffers such as BatchNorm's
        running statistics follow the target's own forward passes)."""
        pairs = [(self.heads.target_encoder, self.encoder), (self.heads.target_projector, self.heads.projector)]
        for target, online in pairs:
            for t, o in zip(target.parameters(), online.parameters()):
                t.mul_(self.ema).add_(o.detach(), alpha=1.0 - self.ema)
