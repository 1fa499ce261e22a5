"""``torchrun --nnodes 2`` as two "nodes" on one machine: two launchers, node ranks 0 and 1, one process each.

A run on two nodes must train to the same weights as the same two processes on one node, resume with any
node count, and end with one ``error:`` line when a node is lost: no launcher on the surviving node sees
a rank of another node exit, so the survivor learns of it only from its own failed collective.

torchrun starts each worker in a session of its own, so a node is killed as a machine would die: its
launcher's process group and every worker's (`test_torchrun.kill_launcher`). Tiny data, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_distributed import free_port
from test_torchrun import (
    LAUNCH_TIMEOUT,
    kill_launcher,
    launched,
    signal_launcher,
    torchrun,
    torchrun_command,
    torchrun_env,
)

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.runs.checkpoint import find_resume_checkpoint, load_checkpoint
from ignite_trainer.runs.logs import last_error
from ignite_trainer.runs.rundir import MetricsLog
from ignite_trainer.training.run import train

pytestmark = pytest.mark.slow

#: What a record of ``metrics.jsonl`` holds besides the scores: how long the epoch took.
TIMINGS = ("seconds", "val_seconds")


def node(rank: int, port: int) -> tuple[str, ...]:
    """torchrun's arguments for node ``rank`` of two, one process each, meeting at 127.0.0.1:``port``."""
    return ("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--max-restarts", "0")


@contextlib.contextmanager
def two_nodes(base: Path, name: str, *args: str, env: dict[str, str],
              mode: str = "--plain") -> Iterator[list[subprocess.Popen]]:
    """Both nodes' launchers (`test_torchrun.LAUNCHER` in ``mode``), started; each writes ``NAME.nodeR.out`` and
    ``.err`` in ``base``; both are killed with their workers when the block ends, however it ends."""
    port = free_port()
    # launch.py is written before either node starts, never while one reads it
    commands = [torchrun_command(base, *args, mode=mode, node=node(rank, port)) for rank in (0, 1)]
    with contextlib.ExitStack() as stack:
        procs = []
        for rank, command in enumerate(commands):
            out = stack.enter_context(open(base / f"{name}.node{rank}.out", "w"))
            err = stack.enter_context(open(base / f"{name}.node{rank}.err", "w"))
            procs.append(stack.enter_context(launched(command, env, stdout=out, stderr=err)))
        yield procs


def output(base: Path, name: str, rank: int) -> str:
    return (base / f"{name}.node{rank}.out").read_text() + (base / f"{name}.node{rank}.err").read_text()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def model_state(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / f"last_checkpoint_{epoch}.pt")["model_state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


def scores(run_dir: Path) -> list[dict]:
    """``metrics.jsonl`` without the timings."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in MetricsLog(run_dir / "metrics.jsonl").records()]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("multinode")
    write_synthetic(base / "data", 12, 4)
    return base


@pytest.fixture(scope="module")
def one_node_run(base: Path) -> Path:
    """The reference: 2 epochs on one node of two processes."""
    (base / "one.yaml").write_text(tiny_config(base / "data", base, name="one", epochs=2).to_yaml())
    done = torchrun(base, "train", "--config", str(base / "one.yaml"), "--backend", "gloo")
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "runs" / "one"


@pytest.fixture(scope="module")
def two_node_run(base: Path) -> Path:
    """The same run on two nodes of one process each. Rank 0 opens it 2 s later than a collective may wait
    (``--slow-open``, as the input checks of a large data set can): node 1 waits for the opening all the same."""
    (base / "two.yaml").write_text(tiny_config(base / "data", base, name="two", epochs=2).to_yaml())
    with two_nodes(base, "two", "train", "--config", str(base / "two.yaml"), "--backend", "gloo",
                   env=torchrun_env(IGNITE_TRAINER_DIST_TIMEOUT="5"), mode="--slow-open") as procs:
        codes = [proc.wait(timeout=LAUNCH_TIMEOUT) for proc in procs]
    assert codes == [0, 0], output(base, "two", 0)[-3000:] + output(base, "two", 1)[-3000:]
    return base / "runs" / "two"


def test_two_nodes_train_to_the_weights_and_scores_of_one_node(base: Path, one_node_run: Path,
                                                              two_node_run: Path) -> None:
    assert_same_weights(model_state(two_node_run, 2), model_state(one_node_run, 2))
    assert [r["epoch"] for r in scores(two_node_run)] == [1, 2]
    assert scores(two_node_run) == scores(one_node_run)
    # rank 0 (on node 0) alone speaks for the run and writes it
    assert output(base, "two", 0).count("run directory:") == 1 and "run directory:" not in output(base, "two", 1)
    assert not error_lines(output(base, "two", 0) + output(base, "two", 1))
    sessions = json.loads((two_node_run / "environment.json").read_text())["sessions"]
    assert [s["outcome"] for s in sessions] == ["finished"]


def test_a_two_node_run_resumes_on_one_node(two_node_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop the last epoch's checkpoint: the run resumes after epoch 1 on one node (two spawned processes,
    the same world size) and reaches the uninterrupted run's weights and scores."""
    uninterrupted, records = model_state(two_node_run, 2), scores(two_node_run)
    (two_node_run / "checkpoints" / "last_checkpoint_2.pt").unlink()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    summary = train(TrainConfig(), resume=two_node_run, overrides={"nproc_per_node": 2, "backend": "gloo"})
    assert summary["finished"] and summary["metrics"]["epoch"] == 2
    assert_same_weights(model_state(two_node_run, 2), uninterrupted)
    assert scores(two_node_run) == records
    assert "resumed from" in (two_node_run / "train.log").read_text()


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_node_ends_the_other_with_one_line_and_exit_code_3(base: Path, how: str) -> None:
    """Node 1 (launcher and worker) is lost once an epoch is done: SIGKILLed (its sockets close, node 0's
    next collective fails at once) or SIGSTOPped (it stops answering, as an unreachable machine does: node
    0's collective gives up after ``IGNITE_TRAINER_DIST_TIMEOUT``; torch's own default would wait 30
    minutes, past this test's limits). Node 0's rank ends with one line naming its lost peer, exit code 3,
    and the checkpoint to resume from. torchrun itself exits 1 whatever its worker's code, and reports the
    worker's code in its summary."""
    name = f"lost-{how}"
    (base / f"{name}.yaml").write_text(tiny_config(base / "data", base, name=name, epochs=100).to_yaml())
    run_dir = base / "runs" / name
    env = torchrun_env(IGNITE_TRAINER_DIST_TIMEOUT="20" if how == "killed" else "5")
    with two_nodes(base, name, "train", "--config", str(base / f"{name}.yaml"), "--backend", "gloo",
                   env=env) as (node0, node1):
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not MetricsLog(run_dir / "metrics.jsonl").records():
            assert node0.poll() is None and node1.poll() is None, output(base, name, 0)[-3000:]
            assert time.monotonic() < deadline, "no epoch was completed"
            time.sleep(0.2)
        if how == "killed":
            kill_launcher(node1)
        else:
            signal_launcher(node1, signal.SIGSTOP)  # killed, stopped or not, when the block ends
        code = node0.wait(timeout=LAUNCH_TIMEOUT)
    text = output(base, name, 0)
    assert code != 0 and re.search(r"exitcode\s*:\s*3\b", text), text[-3000:]  # the worker's exit code
    errors = error_lines(text)
    assert len(errors) == 1, text[-3000:]
    path, ckpt = find_resume_checkpoint(run_dir)
    assert errors[0].startswith("error: rank 0 lost rank 1 (")
    assert ("Timed out" in errors[0]) == (how == "stopped")
    assert errors[0].endswith(f"the whole run stopped; resume from {path.name} with --resume {run_dir}")
    # the run is left resumable and reads as failed
    assert 1 <= ckpt["epoch"] < 100 and not ckpt["finished"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith((".", "tmp"))]
    assert last_error(run_dir / "train.log") == errors[0].removeprefix("error: ")
    sessions = json.loads((run_dir / "environment.json").read_text())["sessions"]
    assert sessions[-1]["outcome"] == "failed"
