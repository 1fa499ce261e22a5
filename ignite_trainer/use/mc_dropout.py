"""Monte Carlo dropout: N stochastic passes of a trained model, each patient's mean probability and its spread.

Each pass runs the model in eval mode (BatchNorm uses its running statistics, as always at inference)
with its dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``) dropping as in training.
Their masks are not drawn from torch's global generator: a forward hook on each dropout module draws the
mask of every window from a `torch.Generator` seeded with ``(seed, pass, window index, dropout module)``
(`numpy.random.SeedSequence`), so a pass's result is the same for any batch size, batch order, device or
number of processes, and the same ``seed`` gives the same numbers. Dropout written as a function inside
a model's ``forward`` (``F.dropout``, e.g. in `cnn14`) is not a module and stays off.

Each pass's window probabilities (with the model's temperatures when it decides on calibrated ones) are
aggregated exactly as one ordinary pass is (windows -> recordings -> patients); per patient and label the
result is the mean over passes and the standard deviation over passes (``ddof=0``).

Example::

    mc = mc_dropout(load_trained_model("runs/quick"), recordings, passes=20, seed=0)
    print(mc.patients.probs, mc.patient_sd)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ignite_trainer.core.errors import ConfigError
from ignite_trainer.core.vocabulary import LABELS
from ignite_trainer.data.loaders import make_eval_loader
from ignite_trainer.scoring.calibration import calibrated_windows
from ignite_trainer.scoring.predictions import LevelPredictions, WindowPredictions
from ignite_trainer.training.engine import prepare_batch, run_model
from ignite_trainer.training.runtime import resolve_device
from ignite_trainer.use.windows import run_windows
from ignite_trainer.use.writers import write_csv

__all__ = ["MCDropoutResult", "mc_dropout", "check_passes", "write_mc_csv", "MC_COLUMNS"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
MC_COLUMNS = ("patient_id", "passes", "seed") + tuple(f"{label}_{k}" for label in LABELS for k in ("mean", "sd"))


def check_passes(passes: Any, what: str = "mc_dropout") -> int:
    """``passes`` as a count >= 1, or a `ConfigError` naming ``what``."""
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ConfigError(f"{what}={passes!r}: the number of Monte Carlo dropout passes must be an integer >= 1")
    return passes


@dataclass
class MCDropoutResult:
    """Per patient: mean probability over the passes (``patients.probs``) and the sd over passes (``patient_sd``)."""

    patients: LevelPredictions
    patient_sd: np.ndarray  # [n, 2]
    passes: int
    seed: int
    dropout_modules: int


def _window_seed(seed: int, pass_index: int, window: int, module: int) -> int:
    return int(np.random.SeedSequence([seed, pass_index, window, module]).generate_state(1, dtype=np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


class _SeededDropout:
    """Forward hooks replacing each dropout module's output with one drawn from per-window generators."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.seed, self.pass_index, self.windows = seed, 0, np.zeros(0, dtype=np.int64)
        self.handles = [m.register_forward_hook(self._hook(i, m))
                        for i, m in enumerate(m for m in model.modules() if isinstance(m, _DROPOUT))]

    def _hook(self, number: int, module: nn.Module):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x, p = inputs[0], float(module.p)
            if p <= 0.0:
                return output
            channel = isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d))
            shape = tuple(x.shape[1:2]) + (1,) * (x.dim() - 2) if channel else tuple(x.shape[1:])
            masks = []
            for w in self.windows.tolist():
                g = torch.Generator().manual_seed(_window_seed(self.seed, self.pass_index, int(w), number))
                masks.append(torch.rand(shape, generator=g) >= p)
            keep = torch.stack(masks).to(device=x.device, dtype=x.dtype)
            return x * keep / (1.0 - p)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def mc_dropout(trained: Any, recordings: Sequence[Any], passes: int, seed: int = 0, how: str | None = None,
               device: str = "cpu", batch_size: int | None = None) -> MCDropoutResult:
    """``passes`` seeded dropout passes of a `TrainedModel` over ``recordings`` (see the module's note)."""
    check_passes(passes)
    how = how or trained.config.aggregation
    base = run_windows(trained, recordings, device=device)  # features, windows and the dataset, once
    torch_device = resolve_device(device)
    model = trained.model.to(torch_device).eval()
    hooks = _SeededDropout(model, seed)
    loader = make_eval_loader(base.dataset, batch_size or trained.config.eval_batch_size or trained.config.batch_size,
                              0, torch_device)
    per_pass = []
    try:
        for k in range(passes):
            hooks.pass_index = k
            probs = np.zeros_like(base.raw_windows.probs)
            position = {int(i): row for row, i in enumerate(base.raw_windows.index.tolist())}
            with torch.inference_mode():
                for batch in loader:
                    x, _, _, index, demographics = prepare_batch(batch, torch_device)
                    hooks.windows = np.asarray(index, dtype=np.int64)
                    logits, _ = run_model(model, x, demographics)
                    rows = [position[int(i)] for i in hooks.windows.tolist()]
                    probs[rows] = torch.sigmoid(logits.float()).double().cpu().numpy()
            windows: WindowPredictions = replace(base.raw_windows, probs=probs)
            if getattr(trained, "applies_calibration", False):
                windows = calibrated_windows(windows, trained.temperatures)
            per_pass.append(base.patients(windows, how))
    finally:
        hooks.remove()
    stacked = np.stack([p.probs for p in per_pass])
    first = per_pass[0]
    patients = replace(first, probs=stacked.mean(axis=0))
    return MCDropoutResult(patients, stacked.std(axis=0), passes, seed, len(hooks.handles))


def write_mc_csv(result: MCDropoutResult, out: Any) -> None:
    """One row per patient: the passes, the seed, and per label the mean probability and its sd (full precision)."""
    rows = []
    for i, pid in enumerate(result.patients.ids):
        row: dict[str, Any] = {"patient_id": pid, "passes": result.passes, "seed": result.seed}
        for j, label in enumerate(LABELS):
            row[f"{label}_mean"] = repr(float(result.patients.probs[i, j]))
            row[f"{label}_sd"] = repr(float(result.patient_sd[i, j]))
        rows.append(row)
    write_csv(out, MC_COLUMNS, rows, what="Monte Carlo dropout predictions")
