"""`HeadCollector`: what an evaluation pass of a model with auxiliary heads gives the heads' scores.

For every window, each murmur-descriptor head's class probabilities (softmax), and for the segmentation head
the predicted state of every step and the confusion matrix of predicted against annotated states over the
annotated steps (`ignite_trainer.training.head_loss.step_states`: the frame at each step's centre). It reads the
evaluator's ``"heads"`` and ``"head_targets"`` outputs (`create_evaluator` with ``head_targets``). One process
only: it is attached by the evaluation of a trained model, not by the training loop's validation.

Example::

    evaluator = create_evaluator(model, {"heads": HeadCollector(("systolic_timing",))}, head_targets=targets)
    found = evaluator.run(loader).metrics["heads"]      # WindowHeads
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from ignite_trainer.core.vocabulary import HEAD_TARGETS, HEADS, HEART_STATES, INDEX, SEGMENTATION
from ignite_trainer.data.annotations import MISSING, attribute_heads
from ignite_trainer.data.head_targets import STATES
from ignite_trainer.training.head_loss import step_states


@dataclass
class WindowHeads:
    """Per window (ordered by window index): descriptor probabilities, predicted states; the states' confusion."""

    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # head -> [windows, classes]
    states: np.ndarray | None = None  # [windows, T'] predicted state per step
    state_confusion: np.ndarray | None = None  # [true state, predicted state] over annotated steps


def _identity(output: Any) -> Any:
    return output


class HeadCollector(Metric):
    """Collects `WindowHeads` over one evaluation pass."""

    required_output_keys = (INDEX, HEADS, HEAD_TARGETS)

    def __init__(self, heads: Sequence[str], device: str | torch.device = "cpu") -> None:
        self.attribute_heads = attribute_heads(heads)
        self.segmentation = SEGMENTATION in heads
        super().__init__(output_transform=_identity, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._index: list[np.ndarray] = []
        self._probs: dict[str, list[np.ndarray]] = {h: [] for h in self.attribute_heads}
        self._states: list[np.ndarray] = []
        self._confusion = np.zeros((len(HEART_STATES), len(HEART_STATES)), dtype=np.int64)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        index, outputs, targets = output
        self._index.append(index.cpu().numpy())
        for head in self.attribute_heads:
            self._probs[head].append(torch.softmax(outputs[head], dim=1).cpu().numpy())
        if self.segmentation:
            logits = outputs[SEGMENTATION]
            predicted = logits.argmax(dim=1)
            truth = step_states(targets[STATES], logits.shape[-1])
            known = truth != MISSING
            pairs = (truth[known] * len(HEART_STATES) + predicted[known]).cpu().numpy()
            self._confusion += np.bincount(pairs, minlength=len(HEART_STATES) ** 2).reshape(self._confusion.shape)
            self._states.append(predicted.to(torch.int8).cpu().numpy())

    def compute(self) -> WindowHeads:
        if not self._index:
            return WindowHeads()
        order = np.argsort(np.concatenate(self._index), kind="stable")
        found = WindowHeads(attributes={h: np.concatenate(p)[order] for h, p in self._probs.items()})
        if self.segmentation:
            found.states = np.concatenate(self._states)[order]
            found.state_confusion = self._confusion.copy()
        return found
