"""A first SIGTERM ends a run whose iteration can never end (waiting on something that does not come), after
a bound relative to its own iterations, with one line and the last complete checkpoint as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ignite_trainer.core.config import TrainConfig
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.training.graceful import MIN_STOP_WAIT_S
from ignite_trainer.training.run import train

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
#: Only a guard against the hang this test is about (the run must end by itself after the bound).
HANG_GUARD_S = 600

# 34 training recordings in batches of 4: 8 iterations an epoch; iteration 11 is in epoch 2, after epoch 1's
# checkpoint. Its batch never arrives: a wait the first signal cannot end by waiting for the iteration.
SCRIPT = """
import sys, time
from pathlib import Path
from ignite.engine import Events
from conftest import tiny_config
from ignite_trainer.training.run import train

def stuck(trainer, evaluator):
    @trainer.on(Events.GET_BATCH_STARTED(once=11))
    def never_ending(_):
        print("stuck", flush=True)
        while True:
            time.sleep(0.5)

train(tiny_config(Path(sys.argv[1]), Path(sys.argv[2]), epochs=3), setup=stuck)
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_first_sigterm_ends_an_iteration_that_cannot_end(tmp_path) -> None:
    data = write_synthetic(tmp_path / "data", 12, 4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(data), str(tmp_path)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stuck"
        run_dir = tmp_path / "runs" / "r"
        before = snapshot(run_dir / "checkpoints")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SIGTERM: the current iteration has not ended" in errors[0], err
    assert f"--resume {run_dir}" in errors[0]
    seconds = int(errors[0].split("has not ended in ")[1].split(" s")[0])
    assert seconds >= MIN_STOP_WAIT_S  # it waited the bound, no less: an ordinary iteration would have ended
    assert snapshot(run_dir / "checkpoints") == before  # nothing new, nothing half-written
    assert train(TrainConfig(), resume=run_dir)["finished"]


def test_a_stop_during_ordinary_iterations_still_waits_for_the_iteration(tmp_path) -> None:
    """The bound is never reached by a run that keeps moving: the stop is the graceful one, with a checkpoint."""
    from test_graceful_stop import _signal_at
    from ignite_trainer.training.graceful import TrainingStopped
    import pytest

    data = write_synthetic(tmp_path / "data", 12, 4)
    with pytest.raises(TrainingStopped) as info:
        train(tiny_config(data, tmp_path), setup=_signal_at(3))
    assert info.value.checkpoint == "last_checkpoint_1.pt"
