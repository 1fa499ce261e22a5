"""A resume trains with the torch thread count the run was trained with, whatever the resuming process uses.

On the CPU the intra-op thread count changes the order of float sums (convolutions, reductions): on this
tiny set a run trained with 2 threads ends with 27 of the model's 32 tensors different from the same run
trained with 1 thread (measured with the plain modules; the fused CPU kernel's own sums do not depend on
the count, the convolutions around it still do). `test_the_thread_count_changes_the_result_here` keeps that
premise checked, so the resume tests below cannot pass by accident. So each checkpoint records the count
(``torch_threads``) and a resume trains with it, then hands the caller its own count back.
"""

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from conftest import tiny_config
from cv_experiment import FOLDS, cv_config, cv_data
from ignite_trainer.experiments.cv import cross_validate, resume_cross_validation
from ignite_trainer.experiments.layout import member_status
from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.training.run import train
from ignite_trainer.training.runtime import intra_op_threads

EPOCHS = 2
#: The count the runs train with, and the different one of the process that resumes them.
TRAINED, RESUMING = 2, 1
QUIET = dict(bootstrap=0, figures=False, echo=lambda _: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("threads")
    return write_synthetic(base / "data", 12, 4), base


@pytest.fixture(scope="module")
def reference(data):
    """The run never interrupted, trained with `TRAINED` threads."""
    with intra_op_threads(TRAINED):
        return Path(train(tiny_config(*data, name="straight", epochs=EPOCHS))["run_dir"])


def _stop_after_epoch_1(trainer, evaluator):
    """Like a kill right after the epoch-1 checkpoint, but in-process (the checkpoint handler runs first)."""
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())


def _result(run_dir: Path) -> tuple[dict, list[dict]]:
    """The final checkpoint's model tensors and every epoch's metrics without the wall-clock timings."""
    weights = load_checkpoint(run_dir / "checkpoints" / f"last_checkpoint_{EPOCHS}.pt")["model_state_dict"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_the_thread_count_changes_the_result_here(data, reference):
    with intra_op_threads(RESUMING):
        other = Path(train(tiny_config(*data, name="one_thread", epochs=EPOCHS))["run_dir"])
    weights, metrics = _result(reference)
    other_weights, other_metrics = _result(other)
    assert _differing(weights, other_weights) and metrics != other_metrics


def test_a_resume_on_another_thread_count_repeats_the_run_bit_for_bit(data, reference):
    with intra_op_threads(TRAINED):
        run_dir = Path(train(tiny_config(*data, name="stopped", epochs=EPOCHS), setup=_stop_after_epoch_1)["run_dir"])
    assert not (run_dir / "checkpoints" / f"last_checkpoint_{EPOCHS}.pt").exists()
    assert load_checkpoint(run_dir / "checkpoints" / "last_checkpoint_1.pt")["torch_threads"] == TRAINED

    with intra_op_threads(RESUMING):
        train(TrainConfig(), resume=run_dir)
        assert torch.get_num_threads() == RESUMING  # the caller's count is given back

    weights, metrics = _result(run_dir)
    straight_weights, straight_metrics = _result(reference)
    assert _differing(weights, straight_weights) == []
    assert metrics == straight_metrics
    sessions = json.loads((run_dir / "environment.json").read_text())["sessions"]
    assert [s["torch_threads"] for s in sessions] == [TRAINED, TRAINED]
    assert "resuming with 2 torch threads" in (run_dir / "train.log").read_text()


def test_a_checkpoint_without_a_recorded_count_resumes_with_the_current_one(data):
    """Checkpoints of older versions hold no ``torch_threads``: they resume as before, on this process's count."""
    with intra_op_threads(TRAINED):
        run_dir = Path(train(tiny_config(*data, name="older", epochs=EPOCHS), setup=_stop_after_epoch_1)["run_dir"])
    path = run_dir / "checkpoints" / "last_checkpoint_1.pt"
    ckpt = load_checkpoint(path)
    del ckpt["torch_threads"]
    torch.save(ckpt, path)

    with intra_op_threads(RESUMING):
        train(TrainConfig(), resume=run_dir)
    assert load_checkpoint(run_dir / "checkpoints" / f"last_checkpoint_{EPOCHS}.pt")["torch_threads"] == RESUMING
    sessions = json.loads((run_dir / "environment.json").read_text())["sessions"]
    assert [s["torch_threads"] for s in sessions] == [TRAINED, RESUMING]


def test_a_cv_member_of_a_parallel_experiment_resumes_in_process_bit_for_bit(tmp_path_factory):
    """``cv --jobs 2`` runs a member as its own process with ``threads`` torch threads; killed, it may be resumed
    by ``cv --resume`` in this process with another count and must still end as the member never stopped."""
    base, _ = cv_data(tmp_path_factory)
    config = cv_config(tmp_path_factory, epochs=EPOCHS)
    member = "fold1_seed0"

    # the member never stopped: a process of its own with TRAINED threads, as --jobs 2 starts it
    straight = cross_validate(config, FOLDS, [0], exp_dir=base / "threads_straight", jobs=2, threads=TRAINED,
                              only=["1:0"], **QUIET)
    assert straight["failed"] == {}

    # the same member stopped after its first epoch (in-process with TRAINED threads: what the member process
    # does, with a hook that a separate process cannot take), then resumed here with RESUMING threads
    def interrupt(trainer, evaluator):
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda _: (_ for _ in ()).throw(KeyboardInterrupt))

    exp_dir = base / "threads_resumed"
    with intra_op_threads(TRAINED), pytest.raises(KeyboardInterrupt):
        cross_validate(config, FOLDS, [0], exp_dir=exp_dir, only=["1:0"], setup=interrupt, **QUIET)
    assert member_status(exp_dir / "runs" / member) == "partial"
    assert torch.get_num_threads() == RESUMING
    resumed = resume_cross_validation(exp_dir, only=["1:0"], **QUIET)
    assert resumed["failed"] == {}

    a, b = exp_dir / "runs" / member, base / "threads_straight" / "runs" / member
    weights, metrics = _result(a)
    straight_weights, straight_metrics = _result(b)
    assert _differing(weights, straight_weights) == []
    assert metrics == straight_metrics
    assert (a / "oof" / "patients.csv").read_text() == (b / "oof" / "patients.csv").read_text()
