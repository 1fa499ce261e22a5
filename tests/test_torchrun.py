"""``torchrun --nproc-per-node 2`` as the user runs it: the joined (not spawned) launch path end to end.

Under torchrun every rank enters `train`; rank 0 alone opens the run directory and broadcasts the outcome
(or its error), and a rank that fails must end the whole run with one ``error:`` line instead of leaving
its peer waiting. Tiny data, 2 epochs, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from collections.abc import Iterator

import pytest

from conftest import tiny_config
from ignite_trainer.runs.checkpoint import find_resume_checkpoint
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.runs.rundir import MetricsLog

REPO = Path(__file__).resolve().parents[1]

#: Runs ``cli.main``, after its first argument: ``--plain``; ``--fail-rank-1``, a setup hook makes rank 1 fail
#: with a `DataError` at its 2nd step; ``--slow-open``, rank 0 opens the run 2 s later than a collective
#: may wait (``$IGNITE_TRAINER_DIST_TIMEOUT``), as the input checks of a large data set can.
LAUNCHER = '''
import functools, os, sys, time
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

def slow_open(*args, **kwargs):
    time.sleep(float(os.environ["IGNITE_TRAINER_DIST_TIMEOUT"]) + 2)
    return open_run(*args, **kwargs)

if sys.argv[1] == "--fail-rank-1":
    run.train = functools.partial(run.train, setup=fail_on_rank_1)
if sys.argv[1] == "--slow-open":  # under torchrun, rank 0 alone opens the run
    open_run, run.open_run = run.open_run, slow_open
sys.exit(cli.main(sys.argv[2:]))
'''

pytestmark = pytest.mark.slow


#: torchrun's own arguments for one node of 2 processes; a multi-node test passes its node's instead.
ONE_NODE = ("--standalone", "--nproc-per-node", "2")
#: Seconds one torchrun launch may take before the test fails (and its processes are killed): a tiny run
#: takes a small fraction of it, a hung collective all of it.
LAUNCH_TIMEOUT = 180


def torchrun_env(**changes: str) -> dict[str, str]:
    """The environment of a torchrun launch: this checkout importable, one thread per rank, collectives
    that give up after 30 s (``changes`` override)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "IGNITE_TRAINER_DIST_TIMEOUT": "30", **changes}


def torchrun_command(tmp_path: Path, *args: str, mode: str = "--plain", node: tuple[str, ...] = ONE_NODE) -> list[str]:
    """``torchrun NODE --monitor-interval 0.5 launch.py MODE ARGS`` (`LAUNCHER` as ``launch.py`` in ``tmp_path``)."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    return [sys.executable, "-m", "torch.distributed.run", *node, "--monitor-interval", "0.5", str(script), mode,
            *args]


@contextlib.contextmanager
def launched(command: list[str], env: dict[str, str], **popen) -> Iterator[subprocess.Popen]:
    """A torchrun launcher in a session of its own, killed with its workers when the block ends (`kill_launcher`)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        kill_launcher(proc)


def signal_launcher(proc: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to a running launcher's process group and to its workers' groups. torchrun starts each
    worker in a session of its own: the launcher's group alone would leave its workers running, orphaned."""
    if proc.poll() is None:
        for group in (proc.pid, *child_pids(proc.pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signum)


def kill_launcher(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher with its workers (`signal_launcher`), then reap it."""
    signal_launcher(proc, signal.SIGKILL)
    proc.wait(timeout=LAUNCH_TIMEOUT)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def torchrun(tmp_path: Path, *args: str, mode: str = "--plain", node: tuple[str, ...] = ONE_NODE,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One torchrun launch to its end (`LAUNCH_TIMEOUT` at most), its output captured."""
    command = torchrun_command(tmp_path, *args, mode=mode, node=node)
    with launched(command, env or torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


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
    done = torchrun(base, "train", "--config", str(base / "failing.yaml"), "--backend", "gloo", mode="--fail-rank-1")
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
