"""The trainer and evaluator Engines: Ignite's loop with our own update step.

Ignite's `create_supervised_trainer` has no hook between ``backward()`` and ``step()`` and its AMP is
CUDA-only, so the update step is written here: autocast on the model's device, GradScaler on CUDA
(unscaled before clipping), gradient accumulation, clipping with the *pre-clip* norm reported, and a
step that is skipped (never applied) when the loss or the gradient is not finite.

A batch is ``(x, y, mask, index)``: features ``[B, n_mels, T]``, targets and label mask ``[B, 2]``,
and the window/recording index ``[B]`` (see `ignite_trainer.data.datasets`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Engine
from ignite.metrics import Average, Metric

from ignite_trainer.events import TrainerEvents


def amp_dtype(device: torch.device) -> torch.dtype:
    """fp16 with a GradScaler on CUDA; bf16 (no scaler needed) on CPU, the only fast autocast type there."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def prepare_batch(batch: Sequence[torch.Tensor], device: torch.device, non_blocking: bool = True):
    x, y, mask, index = batch
    return (x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking),
            mask.to(device, non_blocking=non_blocking), index)


def create_trainer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    device: str | torch.device = "cpu",
    *,
    gradient_clip: float = 1.0,
    amp: bool = False,
    accumulation_steps: int = 1,
    scaler: torch.amp.GradScaler | None = None,
) -> Engine:
    """An Ignite `Engine` running one optimisation step per batch (or per ``accumulation_steps`` batches).

    ``engine.state.output`` is ``{"loss": float, "grad_norm": float, "finite": bool}``; ``grad_norm`` is
    the total gradient norm *before* clipping (NaN on accumulation micro-steps, where no step is taken).
    A non-finite loss or gradient skips the optimizer step and sets ``finite=False``;
    `ignite_trainer.handlers.attach_nan_guard` turns that into a stop that names the iteration.
    The mean training loss of each epoch is in ``engine.state.metrics["train_loss"]``.
    The custom `TrainerEvents` are registered on the returned engine.

    Example::

        model = build_model("attention_cnn", n_mels=64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        trainer = create_trainer(model, optimizer, WeightedBCELoss(), "cpu", gradient_clip=1.0)
        trainer.run(train_loader, max_epochs=2)
    """
    device = torch.device(device)
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1")
    if scaler is None and amp and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    max_norm = gradient_clip if gradient_clip > 0 else math.inf
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = amp_dtype(device)

    def update(engine: Engine, batch: Sequence[torch.Tensor]) -> dict[str, Any]:
        model.train()
        x, y, mask, _ = prepare_batch(batch, device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=amp):
            logits, _ = model(x)
        loss = loss_fn(logits.float(), y, mask)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            return {"loss": loss_value, "grad_norm": math.nan, "finite": False}

        scaled = loss / accumulation_steps
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if engine.state.iteration % accumulation_steps != 0:
            return {"loss": loss_value, "grad_norm": math.nan, "finite": True}

        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        finite = math.isfinite(grad_norm)
        if scaler is not None:
            scaler.step(optimizer)  # skips the step itself when the unscaled gradients are not finite
            scaler.update()
            finite = True  # an overflow under fp16 scaling is expected; the scaler lowers its scale
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": grad_norm, "finite": finite}

    trainer = Engine(update)
    # Counted by epoch, so Ignite's filters work on them: VALIDATION_COMPLETED(every=5), BEST_MODEL_SAVED(once=3).
    trainer.register_events(*TrainerEvents, event_to_attr={event: "epoch" for event in TrainerEvents})
    Average(output_transform=lambda out: out["loss"], device=device if device.type != "mps" else "cpu").attach(
        trainer, "train_loss"
    )
    trainer.state.scaler = scaler
    return trainer


def create_evaluator(
    model: torch.nn.Module,
    metrics: Mapping[str, Metric],
    device: str | torch.device = "cpu",
    *,
    amp: bool = False,
) -> Engine:
    """An Ignite `Engine` that runs the model without gradients and feeds the attached metrics.

    ``engine.state.output`` is ``{"logits", "y", "mask", "index"}`` (logits in float32), the input
    of every metric in `ignite_trainer.metrics`.

    Example::

        evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn), "labels": PerLabelMetrics()})
        state = evaluator.run(val_loader)
        print(state.metrics["murmur.f1"])
    """
    device = torch.device(device)
    dtype = amp_dtype(device)

    @torch.no_grad()
    def step(engine: Engine, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        model.eval()
        x, y, mask, index = prepare_batch(batch, device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=amp):
            logits, _ = model(x)
        return {"logits": logits.float(), "y": y, "mask": mask, "index": index}

    evaluator = Engine(step)
    for name, metric in metrics.items():
        metric.attach(evaluator, name)
    return evaluator

