"""Two gloo processes on CPU: same validation metrics as one process, checkpoints that resume with any
process count, and a crashed rank that stops the whole run at once with one clear line.

Every spawn costs a few seconds of imports, so the module trains one 2-process run (through the CLI) and
one crashed run, and every test reads from those.

No test times anything. That a failed rank stops the others at once, rather than leaving them to wait for
a collective timeout, is checked by making that timeout (`NEVER`) longer than the suite's per-test limit
(setup.cfg): a survivor that waited for it would fail the test by that limit, never by chance, and a run
that does end names the failed rank (the crash-detection path), not a timeout.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Engine, Events

import ignite_trainer.training.run as run_module
from conftest import tiny_config
from ignite_trainer.runs.checkpoint import find_resume_checkpoint, load_checkpoint, load_model_weights
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import ConfigError
from ignite_trainer.data.datasets import EvalWindows
from ignite_trainer.data.loaders import ShardSampler, make_eval_loader
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.training.engine import create_evaluator
from ignite_trainer.training.losses import WeightedBCELoss
from ignite_trainer.training.metrics import MaskedLoss, PerLabelMetrics
from ignite_trainer.model.registry import build_model
from ignite_trainer.training.metrics import PredictionCollector
from ignite_trainer.core.errors import DistributedFailure
from ignite_trainer.training.launch import DIST_TIMEOUT_VARIABLE
from ignite_trainer.data.prepare import PreparedData, prepare_data
from ignite_trainer.training.run import train

ROOT = Path(__file__).resolve().parents[1]
#: Seconds of `launch.DIST_TIMEOUT` for the crash tests: far beyond any test's run, so only the detection of
#: the failed rank can end them.
NEVER = str(24 * 3600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _port(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh rendezvous port per test: concurrent suites on this machine must not meet each other."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dist")
    write_synthetic(path / "data", 12, 4)
    return path


def crash_on_rank_1(trainer: Engine, evaluator: Engine) -> None:
    """A setup hook: rank 1 raises in the second epoch, after epoch 1's checkpoints are complete."""
    def boom(engine: Engine) -> None:
        if idist.get_rank() == 1 and engine.state.epoch == 2:
            raise RuntimeError("injected fault")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, boom)


def kill_rank_1(trainer: Engine, evaluator: Engine) -> None:
    """A setup hook: rank 1 dies by SIGKILL (no exception, no cleanup) in the second epoch."""
    def die(engine: Engine) -> None:
        if idist.get_rank() == 1 and engine.state.epoch == 2:
            os.kill(os.getpid(), 9)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, die)


def evaluate_process(local_rank: int, config: TrainConfig, data: PreparedData, ckpt_path: Path, out: Path) -> None:
    """Validation metrics of a checkpoint's weights, built the way `training_process` builds them."""
    torch.set_num_threads(1)
    model = build_model(config.model, n_mels=config.n_mels)
    load_model_weights(model, load_checkpoint(ckpt_path)["model_state_dict"], ckpt_path)
    model = idist.auto_model(model)
    device = torch.device("cpu")
    loss_fn = WeightedBCELoss(*config.pos_weight)
    dataset = EvalWindows(data.val, data.feature_cache(), config.window_seconds)
    loader = make_eval_loader(dataset, config.batch_size, 0, device)
    evaluator = create_evaluator(model, {"val_loss": MaskedLoss(loss_fn, device=device),
                                         "labels": PerLabelMetrics(device=device),
                                         "predictions": PredictionCollector(device=device)}, device)
    evaluator.run(loader)
    m = evaluator.state.metrics
    if idist.get_rank() == 0:
        preds = m["predictions"]
        out.write_text(json.dumps({"world": idist.get_world_size(), "val_loss": m["val_loss"],
                                   "labels": {k: v for k, v in m.items() if "." in k or k == "macro_f1"},
                                   "n_predictions": len(preds)}))


@pytest.fixture(scope="module")
def two_process_run(base: Path) -> Path:
    """A 2-epoch run on 2 gloo processes, started the way a user would: ``cli.py train``."""
    config = tiny_config(base / "data", base, name="two")
    cfg = base / "two.yaml"
    cfg.write_text(config.to_yaml())
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--config", str(cfg), "--nproc-per-node", "2",
                           "--backend", "gloo"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DistributedDataParallel" not in done.stderr, "per-rank Ignite INFO lines must stay quiet"
    sessions = json.loads((base / "runs" / "two" / "environment.json").read_text())["sessions"]
    assert [s["outcome"] for s in sessions] == ["finished"]
    return base / "runs" / "two"


def test_two_processes_write_every_file_once(two_process_run: Path) -> None:
    records = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert len(list((two_process_run / "tb").glob("events.out.tfevents.*"))) == 1
    names = sorted(p.name for p in (two_process_run / "checkpoints").iterdir())
    assert names[-2:] == ["last_checkpoint_1.pt", "last_checkpoint_2.pt"] and len(names) == 3, names
    log = (two_process_run / "train.log").read_text()
    assert log.count("data ") == 1 and "train / " in log


def test_global_batch_is_the_users_batch(two_process_run: Path) -> None:
    """batch_size 4 on 2 ranks: 2 per rank, so an epoch has as many steps as a 1-process epoch."""
    ckpt = load_checkpoint(two_process_run / "checkpoints" / "last_checkpoint_2.pt")
    n_train = 34  # write_synthetic(12 patients, seed 4) with val_fraction 0.34, printed in train.log
    assert f"{n_train} train" in (two_process_run / "train.log").read_text()
    assert ckpt["trainer"]["epoch_length"] == (n_train // 2) // 2  # per rank: 17 windows, batches of 2


def test_validation_metrics_of_two_processes_equal_one_process(two_process_run: Path, base: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(base / "data", base)
    data = prepare_data(config)
    ckpt = two_process_run / "checkpoints" / "last_checkpoint_2.pt"
    one, two = base / "eval1.json", base / "eval2.json"
    evaluate_process(0, config, data, ckpt, one)
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(evaluate_process, config, data, ckpt, two)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world"], b["world"]) == (1, 2)
    assert a["n_predictions"] == b["n_predictions"] == len(EvalWindows(data.val, data.feature_cache(),
                                                                       config.window_seconds))
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    assert len(a["labels"]) >= 12 and a["labels"].keys() == b["labels"].keys()
    for key, value in a["labels"].items():  # an undefined score (None) is undefined on both
        assert b["labels"][key] is None if value is None else b["labels"][key] == pytest.approx(value, rel=1e-6), key
    # and the number the 2-process run logged for epoch 2 is the same one
    logged = json.loads((two_process_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_shard_sampler_covers_each_item_once() -> None:
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(ShardSampler(11, r, 3)) for r in range(3)] == [4, 4, 3]


@pytest.fixture(scope="module")
def crashed_run(base: Path) -> tuple[Path, int, str]:
    """A 3-epoch 2-process run whose rank 1 raises in epoch 2, through ``cli.main`` (exit code, message);
    rank 0 would wait in its next collective for `NEVER` seconds unless the failure stops it."""
    import cli

    patched = functools.partial(train, setup=crash_on_rank_1)
    config = tiny_config(base / "data", base, name="crash", epochs=3)
    cfg = base / "crash.yaml"
    cfg.write_text(config.to_yaml())
    mp = pytest.MonkeyPatch()
    mp.setattr(run_module, "train", patched)
    mp.setenv("MASTER_PORT", str(free_port()))
    mp.setenv(DIST_TIMEOUT_VARIABLE, NEVER)
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = cli.main(["train", "--config", str(cfg), "--nproc-per-node", "2", "--backend", "gloo"])
    finally:
        mp.undo()
    return base / "runs" / "crash", code, err.getvalue()


def test_a_crashed_rank_stops_the_run_with_one_line(crashed_run: tuple[Path, int, str]) -> None:
    run_dir, code, stderr = crashed_run  # ended at all: rank 0 did not wait out its collective timeout (NEVER)
    assert code == 3
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "rank 1 failed (RuntimeError: injected fault)" in lines[0]
    assert f"--resume {run_dir}" in lines[0] and "last_checkpoint_1.pt" in lines[0]
    assert "Traceback" not in stderr


def test_after_a_crash_the_last_checkpoint_loads_and_resumes_in_one_process(
        crashed_run: tuple[Path, int, str]) -> None:
    run_dir = crashed_run[0]
    path, ckpt = find_resume_checkpoint(run_dir)
    assert path.name == "last_checkpoint_1.pt" and ckpt["epoch"] == 1 and not ckpt["finished"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith((".", "tmp"))]
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    summary = train(TrainConfig(), resume=run_dir, overrides={"nproc_per_node": 1})
    assert summary["finished"] and summary["metrics"]["epoch"] == 3
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    final = load_checkpoint(find_resume_checkpoint(run_dir)[0])
    assert final["epoch"] == 3 and final["finished"]
    assert final["trainer"]["epoch_length"] == 34 // 4  # one process, the same global batch of 4


def test_a_killed_rank_stops_the_run_too(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL: no exception reaches the launcher, only the exit; the survivor must not wait on it. With the
    collective timeout at `NEVER`, the run ends only if the launcher saw rank 1's exit and stopped rank 0:
    the error names rank 1's SIGKILL, where a survivor that timed out would have named its own timeout."""
    monkeypatch.setenv(DIST_TIMEOUT_VARIABLE, NEVER)
    config = tiny_config(base / "data", base, name="killed", epochs=3, nproc_per_node=2, backend="gloo")
    with pytest.raises(DistributedFailure, match=r"rank 1 failed \(killed by SIGKILL\).*--resume"):
        train(config, setup=kill_rank_1)
    path, ckpt = find_resume_checkpoint(base / "runs" / "killed")
    assert ckpt["epoch"] == 1 and path.name == "last_checkpoint_1.pt"


def test_setup_hook_reaches_every_rank_and_args_are_picklable(base: Path, tmp_path: Path) -> None:
    """What `train` sends to the ranks pickles (spawn), so data preparation happens once, in the parent."""
    import pickle

    config = tiny_config(base / "data", base)
    data = prepare_data(config)
    args: tuple[Any, ...] = (config, tmp_path, data, None, crash_on_rank_1)
    assert pickle.loads(pickle.dumps(args))[2].train == data.train


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_refused(base: Path) -> None:
    config = tiny_config(base / "data", base, name="odd", batch_size=5, nproc_per_node=2, backend="gloo")
    with pytest.raises(ConfigError, match="batch_size=5 is the global batch.*multiple of 2"):
        train(config)
    assert not (base / "runs" / "odd").exists(), "refused before the run directory is created"


def _epoch_length(local_rank: int, n: int, batch: int, out: Path) -> None:
    from ignite_trainer.data.loaders import make_train_loader

    from ignite_trainer.training.handlers import attach_sampler_epoch

    loader = make_train_loader(torch.utils.data.TensorDataset(torch.arange(n)), batch, 0, torch.device("cpu"))
    seen: list[list[int]] = []
    engine = Engine(lambda e, b: seen[-1].extend(int(i) for i in b[0]))
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append([]))
    attach_sampler_epoch(engine, loader)
    engine.run(loader, max_epochs=2)
    (out / f"rank{idist.get_rank()}.json").write_text(json.dumps({"steps": len(loader), "seen": seen}))


def test_steps_per_epoch_do_not_depend_on_the_process_count_and_each_epoch_reshuffles(tmp_path: Path) -> None:
    """35 items, global batch 4: 8 steps in 1 process and in 2 (padding would give 9 in 2), disjoint ranks."""
    _epoch_length(0, 35, 4, tmp_path)
    one = json.loads((tmp_path / "rank0.json").read_text())
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_epoch_length, 35, 4, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert one["steps"] == r0["steps"] == r1["steps"] == 35 // 4
    for epoch in (0, 1):
        assert len(r0["seen"][epoch]) == len(r1["seen"][epoch]) == 16
        assert not set(r0["seen"][epoch]) & set(r1["seen"][epoch])
    assert r0["seen"][0] != r0["seen"][1], "set_epoch must give each epoch its own shuffle"
