"""The trainer and evaluator Engines: Ignite's loop with our own update step.

Ignite's `create_supervised_trainer` has no hook between ``backward()`` and ``step()``, so the update step
is written here: autocast (bf16; fp16 with a GradScaler on request), gradient accumulation kept inside
each epoch, clipping with the *pre-clip* norm reported, and a step that is skipped (never applied) when
the loss or the gradient is not finite.

Two ways to skip a step, with the same results:

- *host check* (CPU, or an optimizer that cannot skip by itself): the loss and the norm are read each
  step and the step is skipped in Python. On CPU reading a value costs nothing, and the arithmetic is
  exactly a plain ``backward(); clip_grad_norm_(); step()`` loop.
- *device check* (CUDA with an optimizer that accepts ``found_inf``, i.e. ``AdamW(fused=True)``): nothing
  is read inside the iteration. A non-finite flag is formed on the device and handed to the fused
  kernel as ``found_inf`` (the mechanism GradScaler uses), which leaves weights and moments untouched
  and undoes the step count. The flag is *sticky*: after the first bad step every later step of the run
  is skipped too, so the weights stay those before the first fault until the next read stops the run,
  exactly as if it had stopped at once. Masking updates with ``torch.where`` would work for any
  optimizer but copies every parameter and moment twice per step; the fused kernel's flag costs nothing.

Per-step values are kept in `StepStats` on the device and read in one transfer every ``sync_every``
iterations and at the end of each epoch, when ``StepEvents.STATS_READ`` fires; the stats keep the
iteration of the *first* non-finite step, so a guard reading them late still names it.

A batch is ``(x, y, mask, index)``: features ``[B, n_mels, T]``, targets and label mask ``[B, 2]``,
and the window/recording index ``[B]`` (see `ignite_trainer.data.datasets`); datasets built with
``demographics=True`` add a fifth tensor ``[B, 2 * len(DEMOGRAPHIC_FEATURES)]`` (values, then known flags)
that the model receives as ``model(x, demographics=...)``; a patient model's bags (`ignite_trainer.data.bags`)
have ``x [B, N, n_mels, T]`` and a dict ``{"instance_mask": [B, N]}`` fifth, received as keyword arguments.
Training batches may be augmented (``augment``) between the move to the device and the forward pass;
evaluation never is.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from ignite.engine import Engine, EventEnum, Events
from ignite.metrics import Average, Metric

from ignite_trainer.core.errors import ConfigError
from ignite_trainer.core.vocabulary import (FINITE, GRAD_NORM, HEAD_TARGETS, HEADS, INDEX, LOGITS, LOSS, MASK,
                                            TARGETS, TRAIN_LOSS)
from ignite_trainer.data.head_targets import HeadTargets
from ignite_trainer.training.events import TrainerEvents

#: Default number of iterations between two reads of the step statistics (one host sync each).
SYNC_EVERY = 50


class StepEvents(EventEnum):
    """``STATS_READ``: `StepStats` were just read to the host (``engine.state.step_stats``).

    Per-iteration values reach the host in batches (every ``sync_every`` iterations and at epoch end), so
    handlers that want every step's loss read them here rather than on ``ITERATION_COMPLETED``.

    Example::

        trainer.add_event_handler(StepEvents.STATS_READ,
                                  lambda e: print(e.state.step_stats.iterations, e.state.step_stats.losses))
    """

    STATS_READ = "step_stats_read"


def amp_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """The autocast type: bf16 unless ``name`` asks for ``"float16"`` (fp16 needs a GradScaler on CUDA).

    bf16 has float32's range, so it needs no loss scaling, and it is the fast autocast type on CPU too.
    """
    if name in (None, "bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float16", "fp16"):
        return torch.float16
    raise ConfigError(f"amp_dtype={name!r} is not one of: bfloat16, float16")


def prepare_batch(batch: Sequence[Any], device: torch.device, non_blocking: bool = True):
    """Move ``x, y, mask`` (and the fifth element, if the batch has one) to ``device`` (asynchronously from
    pinned memory); ``index`` stays on the host. Returns ``(x, y, mask, index, extra or None)``: ``extra``
    is the demographics tensor, or a dict of the model's keyword inputs (a patient model's bags:
    ``{"instance_mask": ...}``, `ignite_trainer.data.bags`)."""
    x, y, mask, index = batch[:4]
    extra = batch[4] if len(batch) > 4 else None
    if isinstance(extra, Mapping):
        extra = {k: v.to(device, non_blocking=non_blocking) for k, v in extra.items()}
    elif extra is not None:
        extra = extra.to(device, non_blocking=non_blocking)
    return (x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking),
            mask.to(device, non_blocking=non_blocking), index, extra)


def run_model(model: torch.nn.Module, x: torch.Tensor, extra: torch.Tensor | Mapping[str, torch.Tensor] | None,
              auxiliary: bool = False):
    """``model(x)``; ``model(x, demographics=...)`` when the batch carries demographics, ``model(x, **extra)``
    when it carries keyword inputs, and ``auxiliary=True`` when the auxiliary heads' outputs are wanted
    (`ignite_trainer.model.heads`: a third returned value)."""
    kwargs: dict[str, Any] = {}
    if extra is not None:
        kwargs.update(extra if isinstance(extra, Mapping) else {"demographics": extra})
    if auxiliary:
        kwargs["auxiliary"] = True
    return model(x, **kwargs)


# ---------------------------------------------------------------------------------------------- accumulation
def check_accumulation(accumulation_steps: int, iterations_per_epoch: int) -> None:
    """Refuse an accumulation window that could never close inside an epoch.

    Example::

        check_accumulation(config.accumulation_steps, len(train_loader))  # before the run directory exists
    """
    if accumulation_steps < 1:
        raise ConfigError(f"accumulation_steps={accumulation_steps} is out of range (must be >= 1)")
    if accumulation_steps > iterations_per_epoch:
        raise ConfigError(f"accumulation_steps={accumulation_steps} is more than the {iterations_per_epoch} "
                          f"iterations of an epoch; use at most {iterations_per_epoch}")


def accumulation_window(position: int, accumulation_steps: int, epoch_length: int | None) -> tuple[int, bool]:
    """``(micro-batches in the window, whether this one closes it)`` for 1-based ``position`` in the epoch.

    Windows restart with every epoch; the last one of an epoch is shorter when ``accumulation_steps``
    does not divide ``epoch_length`` and closes on the epoch's last micro-batch, so no gradient crosses
    an epoch boundary and a run resumed at a boundary equals the uninterrupted one. ``epoch_length``
    None (an iterator without a length, first epoch) gives full windows counted from the run's start.

    Example::

        [accumulation_window(p, 3, 4) for p in (1, 2, 3, 4)]  # [(3, False), (3, False), (3, True), (1, True)]
    """
    start = (position - 1) // accumulation_steps * accumulation_steps + 1
    if epoch_length is None:
        return accumulation_steps, position % accumulation_steps == 0
    size = min(accumulation_steps, epoch_length - start + 1)
    return size, position == start + size - 1


def closes_window(engine: Engine, accumulation_steps: int) -> bool:
    """Whether the iteration just completed closed an accumulation window, i.e. no gradient is pending.

    A mid-epoch checkpoint (a graceful stop) must be written only then: gradients of an open window are
    not part of any checkpoint, so stopping inside one would lose them.

    Example::

        if stop_requested and closes_window(engine, config.accumulation_steps):
            engine.terminate()
    """
    return accumulation_window(position_in_epoch(engine), accumulation_steps, engine.state.epoch_length)[1]


def position_in_epoch(engine: Engine) -> int:
    """The 1-based number of the current iteration within its epoch."""
    length = engine.state.epoch_length
    return engine.state.iteration if length is None else (engine.state.iteration - 1) % length + 1


# ---------------------------------------------------------------------------------------------- step stats
class StepStats:
    """Per-iteration loss and pre-clip gradient norm, and the first non-finite step, kept on the device.

    `record` costs a few device kernels and never waits for the device; `read` brings everything recorded
    since the last read to the host in one transfer and fills the plain attributes:

    - ``iterations``, ``losses``, ``grad_norms``: lists for the iterations read (``grad_norm`` NaN on
      accumulation micro-steps, where no step is taken);
    - ``first_bad_iteration`` / ``first_bad_epoch``: the first non-finite step of the run (None if none),
      with ``first_bad_loss`` and ``first_bad_grad_norm`` its values.

    Example::

        trainer.add_event_handler(StepEvents.STATS_READ, lambda e: print(e.state.step_stats.losses))
    """

    def __init__(self, device: torch.device, capacity: int = SYNC_EVERY) -> None:
        self.device = torch.device(device)
        self.capacity = capacity
        dtype = torch.float64  # keeps every value and iteration number exact in one transfer
        self._NONE = 2**52  # "no bad step yet": above any iteration
        self._first_bad = torch.tensor(float(self._NONE), dtype=dtype, device=self.device)
        self._bad_values = torch.zeros(2, dtype=dtype, device=self.device)
        self._values = torch.zeros(capacity, 2, dtype=dtype, device=self.device)
        self._pending: list[int] = []
        self.iterations: list[int] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.first_bad_iteration: int | None = None
        self.first_bad_epoch: int | None = None
        self.first_bad_loss: float | None = None
        self.first_bad_grad_norm: float | None = None

    def poisoned(self) -> torch.Tensor:
        """A device bool: some step of the run was not finite."""
        return self._first_bad < self._NONE

    def record(self, iteration: int, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor) -> None:
        if len(self._pending) == self.capacity:
            self._grow()
        dtype = self._values.dtype
        values = torch.stack([loss.detach().to(dtype), grad_norm.detach().to(dtype)])
        self._values[len(self._pending)] = values
        self._pending.append(iteration)
        first = bad & ~self.poisoned()
        self._bad_values = torch.where(first, values, self._bad_values)
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, float(iteration)), self._first_bad)

    def _grow(self) -> None:
        self._values = torch.cat([self._values, torch.zeros_like(self._values)])
        self.capacity *= 2

    def read(self, epoch_length: int | None = None) -> "StepStats":
        """Bring the pending values to the host (one sync) and return self."""
        n = len(self._pending)
        packed = torch.cat([self._values[:n].flatten(), self._bad_values, self._first_bad[None]]).tolist()
        self.iterations, self._pending = self._pending, []
        self.losses = packed[0:2 * n:2]
        self.grad_norms = packed[1:2 * n:2]
        first = int(packed[-1])
        if first < self._NONE and self.first_bad_iteration is None:
            self.first_bad_iteration = first
            self.first_bad_epoch = (first - 1) // epoch_length + 1 if epoch_length else None
            self.first_bad_loss, self.first_bad_grad_norm = packed[-3], packed[-2]
        return self


def read_step_stats(engine: Engine) -> StepStats:
    """Read the trainer's `StepStats` now and fire ``STATS_READ`` (e.g. before a mid-epoch checkpoint).

    Example::

        stats = read_step_stats(trainer)   # the NaN guard and loggers on STATS_READ run now
        print(stats.first_bad_iteration)
    """
    stats: StepStats = engine.state.step_stats
    stats.read(engine.state.epoch_length)
    engine.fire_event(StepEvents.STATS_READ)
    return stats


# ---------------------------------------------------------------------------------------------- engines
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
    amp_dtype_name: str | None = None,
    sync_every: int = SYNC_EVERY,
    check_on_device: bool | None = None,
    augment: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    head_targets: HeadTargets | None = None,
    head_loss: Callable[..., torch.Tensor] | None = None,
) -> Engine:
    """An Ignite `Engine` running one optimisation step per batch (or per accumulation window).

    ``engine.state.output`` is ``{"loss", "grad_norm", "finite"}``; ``grad_norm`` is the total gradient
    norm *before* clipping (NaN on accumulation micro-steps, where no step is taken). With the host check
    they are Python values; with the device check 0-dim device tensors (reading one forces a sync: read
    ``engine.state.step_stats`` on ``StepEvents.STATS_READ`` instead). A non-finite loss or gradient skips
    the optimizer step and ``step_stats.first_bad_iteration`` names the first one;
    `ignite_trainer.training.handlers.attach_nan_guard` turns that into a stop that names the iteration.
    The mean training loss of each epoch is in ``engine.state.metrics["train_loss"]``.

    Accumulation windows of ``accumulation_steps`` micro-batches restart every epoch; a short last window
    (``accumulation_steps`` not dividing the epoch) is stepped on the epoch's last micro-batch with its
    losses divided by its real size, so that every step applies the mean gradient of the micro-batches it
    covers, as one step over their combined batch would. `check_accumulation` refuses windows longer
    than an epoch. ``amp`` autocasts to bf16, or to fp16 with ``amp_dtype_name="float16"`` (with a
    GradScaler on CUDA). ``check_on_device`` None picks the device check on CUDA when the optimizer accepts
    ``found_inf`` (``AdamW(fused=True)``), else the host check. The custom `TrainerEvents` and
    `StepEvents` are registered on the returned engine. fp16 autocast on CUDA needs loss scaling: pass the
    ``scaler`` (it belongs in the checkpoint, so its owner creates it). ``augment(x, y, mask, index, epoch)``
    (an `ignite_trainer.training.augment.Augmenter`) transforms each training batch on the device before the
    forward pass; ``index`` is the batch's sample index and ``epoch`` the trainer's (from 1). A model with
    auxiliary heads (`ignite_trainer.model.heads`) trains them with ``head_loss(outputs, targets)`` added to the
    labels' loss, the targets looked up from the batch's ``index`` and the epoch in ``head_targets``
    (`ignite_trainer.data.head_targets.HeadTargets`, on ``device``).

    Example::

        model = build_model("attention_cnn", n_mels=64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        trainer = create_trainer(model, optimizer, WeightedBCELoss(), "cpu", gradient_clip=1.0)
        trainer.run(train_loader, max_epochs=2)
    """
    device = torch.device(device)
    if (head_targets is None) != (head_loss is None):
        raise ConfigError("head_targets and head_loss go together: pass both or neither")
    if accumulation_steps < 1:
        raise ConfigError(f"accumulation_steps={accumulation_steps} is out of range (must be >= 1)")
    if sync_every < 1:
        raise ConfigError(f"sync_every={sync_every} is out of range (must be >= 1)")
    dtype = amp_dtype(device, amp_dtype_name)
    if scaler is None and amp and dtype == torch.float16 and device.type == "cuda":
        raise ConfigError("amp_dtype=float16 on CUDA needs loss scaling: pass scaler=torch.amp.GradScaler('cuda')")
    supports_found_inf = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
    if check_on_device is None:
        check_on_device = device.type == "cuda" and supports_found_inf
    if check_on_device and not supports_found_inf:
        raise ConfigError("check_on_device needs an optimizer that accepts found_inf, e.g. AdamW(fused=True)")
    max_norm = gradient_clip if gradient_clip > 0 else math.inf
    params = [p for p in model.parameters() if p.requires_grad]
    stats = StepStats(device, sync_every)
    nan = torch.tensor(math.nan, device=device)
    no = torch.tensor(False, device=device)

    def forward_loss(engine: Engine, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, y, mask, index, demographics = prepare_batch(batch, device)
        if augment is not None:
            x, y, mask = augment(x, y, mask, index, engine.state.epoch)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=amp):
            out = run_model(model, x, demographics, auxiliary=head_loss is not None)  # logits, attention[, heads]
        loss = loss_fn(out[0].float(), y, mask)
        if head_loss is None:
            return loss
        return loss + head_loss(out[2], head_targets.lookup(index, engine.state.epoch - 1))

    def backward(loss: torch.Tensor, window: int) -> None:
        scaled = loss / window
        (scaler.scale(scaled) if scaler is not None else scaled).backward()

    def host_update(engine: Engine, batch: Sequence[torch.Tensor]) -> dict[str, Any]:
        window, closes = accumulation_window(position_in_epoch(engine), accumulation_steps, engine.state.epoch_length)
        model.train()
        loss = forward_loss(engine, batch)
        loss_value = loss.item()
        iteration = engine.state.iteration
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            stats.record(iteration, loss, nan, torch.tensor(True, device=device))
            return {LOSS: loss_value, GRAD_NORM: math.nan, FINITE: False}
        backward(loss, window)
        if not closes:
            stats.record(iteration, loss, nan, no)
            return {LOSS: loss_value, GRAD_NORM: math.nan, FINITE: True}

        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = norm.item()
        finite = math.isfinite(grad_norm)
        if scaler is not None:
            scaler.step(optimizer)  # skips the step itself when the unscaled gradients are not finite
            scaler.update()
            finite = True  # an overflow under fp16 scaling is expected; the scaler lowers its scale
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats.record(iteration, loss, norm, torch.tensor(not finite, device=device))
        return {LOSS: loss_value, GRAD_NORM: grad_norm, FINITE: finite}

    def device_update(engine: Engine, batch: Sequence[torch.Tensor]) -> dict[str, Any]:
        window, closes = accumulation_window(position_in_epoch(engine), accumulation_steps, engine.state.epoch_length)
        model.train()
        loss = forward_loss(engine, batch)
        loss_detached = loss.detach()
        bad_loss = ~torch.isfinite(loss_detached)
        backward(loss, window)  # a non-finite loss makes non-finite gradients: that step is skipped below
        if not closes:
            stats.record(engine.state.iteration, loss_detached, nan, bad_loss)
            return {LOSS: loss_detached, GRAD_NORM: nan, FINITE: ~bad_loss}
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        bad = bad_loss if scaler is not None else bad_loss | ~torch.isfinite(norm)
        stats.record(engine.state.iteration, loss_detached, norm, bad)
        if scaler is not None:
            scaler.step(optimizer)  # with a fused optimizer the scaler hands it found_inf without a sync
            scaler.update()
        else:
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            optimizer.found_inf = stats.poisoned().to(torch.float32)  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
        optimizer.zero_grad(set_to_none=True)
        return {LOSS: loss_detached, GRAD_NORM: norm, FINITE: ~bad}

    trainer = Engine(device_update if check_on_device else host_update)
    # Counted by epoch, so Ignite's filters work on them: VALIDATION_COMPLETED(every=5), BEST_MODEL_SAVED(once=3).
    trainer.register_events(*TrainerEvents, event_to_attr={event: "epoch" for event in TrainerEvents})
    trainer.register_events(*StepEvents)
    trainer.state.step_stats = stats

    @trainer.on(Events.ITERATION_COMPLETED)
    def read_now_and_then(engine: Engine) -> None:
        length = engine.state.epoch_length
        if engine.state.iteration % sync_every == 0 or (length is not None and position_in_epoch(engine) == length):
            read_step_stats(engine)

    Average(output_transform=_loss_of, device=device).attach(trainer, TRAIN_LOSS)
    return trainer


def _loss_of(output: Mapping[str, Any]) -> Any:
    return output[LOSS]


def create_evaluator(
    model: torch.nn.Module,
    metrics: Mapping[str, Metric],
    device: str | torch.device = "cpu",
    *,
    amp: bool = False,
    amp_dtype_name: str | None = None,
    head_targets: HeadTargets | None = None,
) -> Engine:
    """An Ignite `Engine` that runs the model under `torch.inference_mode` and feeds the attached metrics.

    ``engine.state.output`` is ``{"logits", "y", "mask", "index"}`` (logits in float32, on the device),
    the input of every metric in `ignite_trainer.training.metrics`. With ``head_targets`` (a model with
    auxiliary heads) it also holds ``"heads"`` (the heads' outputs, float32) and ``"head_targets"`` (their
    targets, `HeadTargets.lookup`), for `ignite_trainer.training.head_metrics.HeadCollector`.

    Example::

        evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn), "labels": PerLabelMetrics()})
        state = evaluator.run(val_loader)
        print(state.metrics["murmur.f1"])
    """
    device = torch.device(device)
    dtype = amp_dtype(device, amp_dtype_name)

    @torch.inference_mode()
    def step(engine: Engine, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        model.eval()
        x, y, mask, index, demographics = prepare_batch(batch, device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=amp):
            out = run_model(model, x, demographics, auxiliary=head_targets is not None)  # logits, attention[, heads]
        output = {LOGITS: out[0].float(), TARGETS: y, MASK: mask, INDEX: index}
        if head_targets is not None:
            output[HEADS] = {k: v.float() for k, v in out[2].items()}
            output[HEAD_TARGETS] = head_targets.lookup(index)
        return output

    evaluator = Engine(step)
    for name, metric in metrics.items():
        metric.attach(evaluator, name)
    return evaluator
