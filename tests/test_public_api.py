"""The public API of ``ignite_trainer``: every exported name resolves, is documented, and the import stays cheap;
the custom events hand a researcher's handler what the docs promise through ``engine.state``."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ignite_trainer
from conftest import TinyModel, make_batches


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


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        ignite_trainer.no_such_name  # noqa: B018


def test_import_is_cheap_names_load_on_first_use():
    code = ("import sys, ignite_trainer; assert 'torch' not in sys.modules and 'ignite' not in sys.modules; "
            "ignite_trainer.TrainConfig; assert 'torch' not in sys.modules; "
            "ignite_trainer.create_trainer; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_custom_events_give_handlers_their_state(tmp_path: Path):
    """Composed by hand with lr=0: the scores never change, so epoch 1 is the best and patience 1 stops at epoch 2."""
    from ignite_trainer import (MaskedLoss, PerLabelMetrics, TrainerEvents, WeightedBCELoss, attach_best_checkpoint,
                                attach_early_stopping, attach_validation, create_evaluator, create_trainer)

    torch.manual_seed(0)
    model = TinyModel()
    loss_fn = WeightedBCELoss()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn), "labels": PerLabelMetrics()})
    attach_validation(trainer, evaluator, make_batches(n_batches=2, seed=1))
    attach_early_stopping(trainer, patience=1, monitor="val_loss")
    attach_best_checkpoint(trainer, {"model_state_dict": model}, tmp_path, monitor="val_loss")

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
    assert score == metrics["val_loss"]
    assert {"val_loss", "macro_f1", "heart.f1", "murmur.f1", "murmur.specificity"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert "murmur.f1" in seen[1][3]  # the evaluator's own state is there too
    assert seen[2][2] == 2 and trainer.state.epoch == 2


def test_every_public_callable_shows_an_example():
    """Each public building block's docstring says why it exists and shows a short example."""
    import inspect

    import ignite_trainer

    missing = [name for name in ignite_trainer.__all__
               if not isinstance(getattr(ignite_trainer, name), (str, tuple))
               and "Example" not in (inspect.getdoc(getattr(ignite_trainer, name)) or "")]
    assert missing == []
