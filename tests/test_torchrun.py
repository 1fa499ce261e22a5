"""``torchrun --nproc-per-node 2`` as the user runs it: the joined (not spawned) launch path end to end.

Under torchrun every rank enters `train`; rank 0 alone opens the run directory and broadcasts the outcome
(or its error), and a rank that fails must end the whole run with one ``error:`` line instead of leaving
its peer waiting. Tiny data, 2 epochs, gloo on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from ignite_trainer.runs.checkpoint import find_resume_checkpoint
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.runs.rundir import MetricsLog

REPO = Path(__file__).resolve().parents[1]

#: Runs ``cli.main`` with an optional setup hook that makes rank 1 fail with a `DataError` at its 2nd step.
LAUNCHER = '''
import functools, sys
import cli
import ignite_trainer.training.run as run

def fail_on_rank_1(trainer, evaluator):
    import ignite.distributed as idist
    from ignite.engine import Events
    from ignite_trainer.core.errors import DataError
    if idist.get_rank() == 1:
        @trainer.on(Events.ITERATION_COMPLETED(once=2))
        def fail(engine):
            raise DataError("injected: rank 1 cannot read its batch")

if sys.argv[1] == "--fail-rank-1":
    run.train = functools.partial(run.train, setup=fail_on_rank_1)
sys.exit(cli.main(sys.argv[2:]))
'''

pytestmark = pytest.mark.slow


def torchrun(tmp_path: Path, *args: str, fail: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "IGNITE_TRAINER_DIST_TIMEOUT": "30"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--monitor-interval", "0.5", str(script), "--fail-rank-1" if fail else "--plain", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("torchrun")
    write_synthetic(base / "data", 12, 4)
    return base


def test_torchrun_trains_and_resumes(base: Path) -> None:
    config = tiny_config(base / "data", base, name="joined", epochs=2)
    (base / "joined.yaml").write_text(config.to_yaml())
    done = torchrun(base, "train", "--config", str(base / "joined.yaml"), "--backend", "gloo")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = base / "runs" / "joined"
    assert [r["epoch"] for r in MetricsLog(run_dir / "metrics.jsonl").records()] == [1, 2]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone speaks for the run

    # Drop the last epoch's checkpoint: the run now resumes after epoch 1 and trains epoch 2 again.
    (run_dir / "checkpoints" / "last_checkpoint_2.pt").unlink()
    resumed = torchrun(base, "train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in MetricsLog(run_dir / "metrics.jsonl").records()] == [1, 2]
    path, ckpt = find_resume_checkpoint(run_dir)
    assert path.name == "last_checkpoint_2.pt" and ckpt["finished"] and ckpt["epoch"] == 2
    assert "resumed from" in (run_dir / "train.log").read_text()

    again = torchrun(base, "train", "--resume", str(run_dir))
    assert again.returncode == 0 and "run already finished at epoch 2" in again.stdout


def test_under_torchrun_a_failing_rank_ends_the_run_with_one_line(base: Path) -> None:
    config = tiny_config(base / "data", base, name="failing", epochs=2)
    (base / "failing.yaml").write_text(config.to_yaml())
    done = torchrun(base, "train", "--config", str(base / "failing.yaml"), "--backend", "gloo", fail=True)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert errors == ["error: injected: rank 1 cannot read its batch"], done.stderr[-3000:]


def test_under_torchrun_a_bad_input_on_rank_0_reaches_every_rank_as_its_own_error(base: Path) -> None:
    done = torchrun(base, "train", "--data", str(base / "no-such-folder"), "--output-dir", str(base / "runs"),
                    "--name", "bad", "--backend", "gloo", "--device", "cpu")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1 and "no-such-folder" in errors[0], done.stderr[-3000:]
    assert not (base / "runs" / "bad").exists()  # nothing was created
