"""MLflow tracking read back through MLflow's own client: params, per-epoch metrics at the epoch step, the
best checkpoint and the report as artifacts, how the run ended; and one clear error without MLflow."""

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import TinyModel, make_batches
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.training.engine import create_evaluator, create_trainer
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.training.handlers import attach_best_checkpoint, attach_early_stopping, attach_validation
from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics
from ignite_trainer.training.metrics import PredictionCollector


def bce(logits, y, mask=None):
    return F.binary_cross_entropy_with_logits(logits, y)


def tracked_run(tmp_path, epochs=3, patience=0, error=None):
    """A real trainer/evaluator whose run directory is ``tmp_path/runs/r``, tracked in the default local store."""
    from ignite_trainer.training.tracking import attach_mlflow, close_mlflow

    config = TrainConfig(output_dir=str(tmp_path / "runs"), name="r", epochs=epochs, learning_rate=0.5,
                         early_stopping_patience=patience)
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "report").mkdir(parents=True)
    (run_dir / "report" / "report.md").write_text("# Evaluation report\n")
    (run_dir / "config.yaml").write_text(config.to_yaml())
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    trainer = create_trainer(model, optimizer, bce)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(bce), "labels": PerLabelMetrics(),
                                         "predictions": PredictionCollector()})
    attach_validation(trainer, evaluator, make_batches(n_batches=3, seed=1))
    if patience:
        attach_early_stopping(trainer, patience, "val_loss")
    best = attach_best_checkpoint(trainer, {"model": model}, run_dir / "checkpoints", "val_loss")
    seen = {}
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED,
                              lambda e: seen.update({e.state.epoch: e.state.validation_metrics["val_loss"]}))
    tracker = attach_mlflow(trainer, optimizer, config, run_dir, best_checkpoint=best)
    caught = None
    try:
        if error is not None:
            def fail(_):
                raise error

            trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED(once=epochs), fail)
        trainer.run(make_batches(n_batches=2), max_epochs=epochs)
    except BaseException as e:
        caught = e
    finally:
        close_mlflow(tracker, caught)
    return run_dir, seen, caught


def the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "runs" / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("ignite_trainer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_run_holds_params_epoch_metrics_and_artifacts(tmp_path):
    pytest.importorskip("mlflow")
    run_dir, seen, _ = tracked_run(tmp_path)
    client, run = the_run(tmp_path)

    assert run.info.run_name == "r" and run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir.resolve()) and run.data.tags["state"] == "finished"
    assert run.data.params["learning_rate"] == "0.5" and run.data.params["monitor"] == "val_loss"
    history = client.get_metric_history(run.info.run_id, "val val_loss")
    assert [(m.step, m.value) for m in history] == [(e, pytest.approx(v)) for e, v in sorted(seen.items())]
    for key in ("val murmur.f1", "val heart.auroc", "epoch train_loss", "epoch best_epoch", "lr group_0"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    best_epoch = min(seen, key=lambda e: (seen[e], e))
    assert client.get_metric_history(run.info.run_id, "epoch best_epoch")[-1].value == best_epoch

    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoints == [f"checkpoints/{p.name}" for p in (run_dir / "checkpoints").glob("best_*.pt")]
    assert checkpoints[0].startswith(f"checkpoints/best_checkpoint_{best_epoch}_")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/report.md"]
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "report"} <= top


def test_mlflow_run_says_how_it_ended(tmp_path):
    pytest.importorskip("mlflow")
    _, _, caught = tracked_run(tmp_path / "a", epochs=2, error=RuntimeError("boom"))
    assert isinstance(caught, RuntimeError)
    _, run = the_run(tmp_path / "a")
    assert run.info.status == "FAILED" and run.data.tags["state"] == "failed"

    tracked_run(tmp_path / "b", epochs=30, patience=1)
    _, run = the_run(tmp_path / "b")
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "stopped early"


def test_without_mlflow_one_config_error(monkeypatch):
    from ignite_trainer.training.tracking import require_mlflow

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError, match=r"pip install 'ignite_trainer\[mlflow\]'"):
        require_mlflow()


def test_a_resumed_training_continues_its_mlflow_run(tmp_path):
    pytest.importorskip("mlflow")
    from ignite_trainer.training.tracking import attach_mlflow, close_mlflow

    run_dir, first, _ = tracked_run(tmp_path, epochs=2)
    _, before = the_run(tmp_path)

    config = TrainConfig(output_dir=str(tmp_path / "runs"), name="r", epochs=3, learning_rate=0.5)
    model = TinyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    trainer = create_trainer(model, optimizer, bce)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(bce), "labels": PerLabelMetrics()})
    attach_validation(trainer, evaluator, make_batches(n_batches=3, seed=1))
    trainer.load_state_dict({"epoch": 2, "epoch_length": 2, "max_epochs": 3})  # as a resume restores it
    tracker = attach_mlflow(trainer, optimizer, config, run_dir)
    trainer.run(make_batches(n_batches=2), max_epochs=3)
    close_mlflow(tracker)

    client, after = the_run(tmp_path)  # still one run
    assert after.info.run_id == before.info.run_id
    assert [m.step for m in client.get_metric_history(after.info.run_id, "val val_loss")] == [1, 2, 3]
