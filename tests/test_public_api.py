"""The public API of ``ignite_trainer``: a small face of what a research script composes. Every exported name
resolves, is documented (its docstring, and ``docs/extending.md``), and the import stays cheap; plumbing stays
in its wing; the metric names are the constants the engines use; the custom events hand a researcher's
handler what the docs promise through ``engine.state``."""

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ignite_trainer
from conftest import TinyModel, make_batches

EXTENDING = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def test_every_public_name_resolves_to_its_defining_object():
    assert len(ignite_trainer.__all__) == len(set(ignite_trainer.__all__))
    for name in ignite_trainer.__all__:
        obj = getattr(ignite_trainer, name)
        module = __import__(ignite_trainer._EXPORTS[name], fromlist=[name])
        assert obj is getattr(module, name), name
    assert set(ignite_trainer.__all__) <= set(dir(ignite_trainer))


@pytest.mark.parametrize("name", ignite_trainer.__all__)
def test_every_public_name_has_its_own_docstring(name):
    obj = getattr(ignite_trainer, name)
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")  # its own, not one inherited from a base class
    elif callable(obj):
        doc = obj.__doc__
    else:  # a constant: documented in the package docstring
        doc = name if f"``{name}``" in (ignite_trainer.__doc__ or "") else None
    assert doc and doc.strip(), f"{name} has no docstring"


def test_every_public_callable_shows_an_example():
    """Each public building block's docstring says why it exists and shows a short example."""
    missing = [name for name in ignite_trainer.__all__
               if not isinstance(getattr(ignite_trainer, name), (str, tuple))
               and "Example" not in (inspect.getdoc(getattr(ignite_trainer, name)) or "")]
    assert missing == []


def test_every_public_name_is_described_in_the_extending_guide():
    """``docs/extending.md`` names each exported name in backticks (a table row or a section about it)."""
    text = EXTENDING.read_text()
    missing = [name for name in ignite_trainer.__all__ if not re.search(rf"`{re.escape(name)}[`(.]", text)]
    assert missing == [], f"docs/extending.md does not describe: {', '.join(missing)}"


def test_no_public_name_is_a_module_and_sweep_is_the_function():
    """A package-level name is the object itself; ``sweep`` is the function, not the module beside it."""
    assert not [name for name in ignite_trainer.__all__ if inspect.ismodule(getattr(ignite_trainer, name))]
    assert inspect.isfunction(ignite_trainer.sweep)
    assert ignite_trainer.sweep.__module__ == "ignite_trainer.experiments.sweeps"


@pytest.mark.parametrize("module, name", [
    ("ignite_trainer.data.loaders", "set_sampler_position"),
    ("ignite_trainer.data.loaders", "EpochSampler"),
    ("ignite_trainer.runs.checkpoint", "RNGStates"),
    ("ignite_trainer.runs.checkpoint", "load_checkpoint"),
    ("ignite_trainer.training.handlers", "training_state"),
    ("ignite_trainer.training.engine", "StepEvents"),
    ("ignite_trainer.core.vocabulary", "TRAIN_LOSS"),
    ("ignite_trainer.core.vocabulary", "LOGITS"),
])
def test_plumbing_stays_in_its_wing(module, name):
    """Names a research script does not compose with are not on the face, but still import from their module."""
    assert name not in ignite_trainer.__all__
    with pytest.raises(AttributeError, match=name):
        getattr(ignite_trainer, name)
    assert getattr(importlib.import_module(module), name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        ignite_trainer.no_such_name  # noqa: B018


def test_import_is_cheap_names_load_on_first_use():
    code = ("import sys, ignite_trainer; assert 'torch' not in sys.modules and 'ignite' not in sys.modules; "
            "ignite_trainer.TrainConfig; ignite_trainer.VAL_LOSS; ignite_trainer.label_score; "
            "assert 'torch' not in sys.modules; "
            "ignite_trainer.create_trainer; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metric_and_output_names_are_the_ones_the_engines_use():
    """The constants are what the engines and metrics actually produce, so a script reading them reads real keys."""
    from ignite_trainer import (LABELS, MACRO_F1, PER_LABEL, PREDICTIONS, VAL_LOSS, MaskedLoss, PerLabelMetrics,
                                PredictionCollector, WeightedBCELoss, create_evaluator, create_trainer, label_score)
    from ignite_trainer.core.vocabulary import (FINITE, GRAD_NORM, INDEX, LOGITS, LOSS, MASK, RUN_SCORES, STATS,
                                                TARGETS, TRAIN_LOSS, is_score, score_mode)

    assert RUN_SCORES == (VAL_LOSS, MACRO_F1)
    assert score_mode(VAL_LOSS) == "min" and score_mode(MACRO_F1) == score_mode(label_score("murmur", "f1")) == "max"
    assert all(is_score(label_score(label, stat)) for label in LABELS for stat in STATS)
    with pytest.raises(ValueError, match="auc"):
        label_score("murmur", "auc")

    torch.manual_seed(0)
    model, loss_fn = TinyModel(), WeightedBCELoss()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    evaluator = create_evaluator(model, {VAL_LOSS: MaskedLoss(loss_fn), PER_LABEL: PerLabelMetrics(),
                                         PREDICTIONS: PredictionCollector()})
    trainer.run(make_batches(n_batches=2), max_epochs=1)
    assert set(trainer.state.output) == {LOSS, GRAD_NORM, FINITE}
    assert TRAIN_LOSS in trainer.state.metrics

    state = evaluator.run(make_batches(n_batches=2, seed=1))
    assert set(state.output) == {LOGITS, TARGETS, MASK, INDEX}
    expected = {VAL_LOSS, MACRO_F1, PREDICTIONS} | {label_score(label, stat) for label in LABELS
                                                    for stat in (*STATS, "support")}
    assert set(state.metrics) == expected  # PerLabelMetrics is flattened: PER_LABEL itself is no key


def test_custom_events_give_handlers_their_state(tmp_path: Path):
    """Composed by hand with lr=0: the scores never change, so epoch 1 is the best and patience 1 stops at epoch 2."""
    from ignite_trainer import (MACRO_F1, PER_LABEL, VAL_LOSS, MaskedLoss, PerLabelMetrics, TrainerEvents,
                                WeightedBCELoss, attach_best_checkpoint, attach_early_stopping, attach_validation,
                                create_evaluator, create_trainer, label_score)

    torch.manual_seed(0)
    model = TinyModel()
    loss_fn = WeightedBCELoss()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn)
    evaluator = create_evaluator(model, {VAL_LOSS: MaskedLoss(loss_fn), PER_LABEL: PerLabelMetrics()})
    attach_validation(trainer, evaluator, make_batches(n_batches=2, seed=1))
    attach_early_stopping(trainer, patience=1, monitor=VAL_LOSS)
    attach_best_checkpoint(trainer, {"model_state_dict": model}, tmp_path, monitor=VAL_LOSS)

    seen = []
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, lambda e: seen.append(
        ("validation", e.state.epoch, dict(e.state.validation_metrics), e.state.validation_output.metrics)))
    trainer.add_event_handler(TrainerEvents.BEST_MODEL_SAVED, lambda e: seen.append(
        ("best", e.state.epoch, e.state.best_model_path, e.state.best_score)))
    trainer.add_event_handler(TrainerEvents.EARLY_STOPPED, lambda e: seen.append(
        ("stopped", e.state.epoch, e.state.early_stopped_epoch)))
    trainer.run(make_batches(n_batches=3), max_epochs=5)

    assert [(kind, epoch) for kind, epoch, *_ in seen] == [
        ("best", 1), ("validation", 1), ("stopped", 2), ("validation", 2)]  # standard handlers were attached first
    _, _, path, score = seen[0]
    assert isinstance(path, Path) and path.is_file() and path.parent == tmp_path
    metrics = seen[1][2]
    assert score == metrics[VAL_LOSS]
    murmur_f1 = label_score("murmur", "f1")
    assert {VAL_LOSS, MACRO_F1, label_score("heart", "f1"), murmur_f1, label_score("murmur", "specificity")} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert murmur_f1 in seen[1][3]  # the evaluator's own state is there too
    assert seen[2][2] == 2 and trainer.state.epoch == 2
