"""The fused CPU kernel is an opt-in that never blocks: a killed build, a missing compiler, a failed build and a
long build in another process each end in the ordinary modules or a finished build, never in a wait without end;
a run takes one path (kernel or modules) for its whole life."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from conftest import tiny_config
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.model import cpu_kernels
from ignite_trainer.training.run import train

ROOT = Path(__file__).resolve().parents[1]
HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
#: Only a guard against the very hang these tests are about: a correct build finishes far sooner.
HANG_GUARD_S = 900

PREPARE = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
           "from ignite_trainer.model import cpu_kernels as k; ok = k.prepare(); print(ok, k.kernel_status())")


@pytest.fixture
def fresh(monkeypatch, tmp_path) -> Path:
    """This process as if it had never loaded the kernel, with its builds under ``tmp_path``."""
    monkeypatch.setattr(cpu_kernels, "_kernel", None)
    monkeypatch.setattr(cpu_kernels, "_status", "not used in this process")
    monkeypatch.setenv(cpu_kernels.DIR_ENV, str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def _env(kernels: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), cpu_kernels.DIR_ENV: str(kernels), **extra}


def stop_after_first_epoch(trainer, evaluator) -> None:
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())


def sessions(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "environment.json").read_text())["sessions"]


def test_without_a_compiler_the_run_falls_back_to_the_modules_and_says_why(fresh, monkeypatch, tmp_path,
                                                                           caplog) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    data = write_synthetic(tmp_path / "data", 12, 4)
    with caplog.at_level(logging.WARNING):
        summary = train(tiny_config(data, tmp_path, cpu_kernel=True, epochs=1))
    assert summary["finished"] and not cpu_kernels.loaded()
    line = sessions(Path(summary["run_dir"]))[-1]["cpu_kernel"]
    assert line.startswith("unfused (no C++ compiler") and "no-such-compiler-here" in line
    assert any("ordinary modules" in r.getMessage() and "no C++ compiler" in r.getMessage() for r in caplog.records)
    assert not (cpu_kernels.kernel_dir() / "failed.txt").exists()  # installing a compiler is enough to retry


def test_a_failed_build_is_remembered_and_not_retried(fresh, monkeypatch, tmp_path) -> None:
    calls = tmp_path / "calls"
    compiler = tmp_path / "broken-c++"
    compiler.write_text(f"#!/bin/sh\necho called >> {calls}\necho 'fatal error: broken compiler' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    assert cpu_kernels.prepare() is False
    assert (cpu_kernels.kernel_dir() / "failed.txt").is_file()
    first = calls.read_text().count("called")
    assert first >= 1
    monkeypatch.setattr(cpu_kernels, "_status", "not used in this process")
    assert cpu_kernels.prepare() is False  # a second process (or call) reads the record instead of compiling
    assert calls.read_text().count("called") == first
    status = cpu_kernels.kernel_status()
    assert "an earlier build" in status and "failed.txt" in status and "to try again" in status


def test_a_wait_for_another_processs_build_is_bounded(fresh, tmp_path) -> None:
    folder = cpu_kernels.kernel_dir()
    folder.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write(f'pid {os.getpid()}\\n'); f.flush(); print('held', flush=True); "
         "time.sleep(600)", str(folder / "build.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cpu_kernels.prepare(wait_s=0.5) is False
        status = cpu_kernels.kernel_status()
        assert f"pid {holder.pid}" in status and "over 0.5 s" in status and cpu_kernels.WAIT_ENV in status
        assert not (folder / "failed.txt").exists()  # a busy lock is not a failed build
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the kernel cannot be built here")
def test_a_build_killed_by_sigkill_does_not_block_the_next_process(tmp_path) -> None:
    """The old failure: a build killed while it held torch's lock file left it behind, and every later process
    waited for it forever. Now the OS lock dies with its holder and the next builder removes the stale file."""
    # Where this machine has no build yet (a fresh CI machine), the test builds into the ordinary folder, so that
    # the suite's other kernel tests load this build instead of compiling a second time.
    default = cpu_kernels.kernel_dir()
    kernels = default.parent if not default.exists() else tmp_path / "kernels"
    env = _env(kernels)
    folder = kernels / cpu_kernels.kernel_key()
    first = subprocess.Popen([sys.executable, "-c", PREPARE], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guard = time.monotonic() + HANG_GUARD_S
    while not (folder / "lock").exists() and first.poll() is None and time.monotonic() < guard:
        time.sleep(0.05)
    assert (folder / "lock").exists(), "the first process never started its build"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (folder / "lock").exists() and not (folder / "built.json").exists()  # the stale lock of the old hang
    second = subprocess.run([sys.executable, "-c", PREPARE], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=HANG_GUARD_S)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("True fused kernel in use"), second.stdout + second.stderr
    assert "building the CPU kernel once" in second.stderr
    assert (folder / "built.json").is_file() and not (folder / "lock").exists()
    third = subprocess.run([sys.executable, "-c", PREPARE], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
    assert third.stdout.startswith("True") and "building" not in third.stderr  # loaded, not built again


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the kernel cannot be built here")
def test_the_build_folder_is_keyed_by_torch_and_the_compiler(monkeypatch) -> None:
    key = cpu_kernels.kernel_key()
    monkeypatch.setattr(torch, "__version__", "0.0.0-another-torch")
    assert cpu_kernels.kernel_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "clang++")
    assert cpu_kernels.kernel_key() != key


@pytest.fixture
def kernel_run(tmp_path) -> Path:
    """A run trained one epoch (of two) with the kernel in use."""
    if not cpu_kernels.prepare():
        pytest.skip(f"the fused CPU kernel is not built here: {cpu_kernels.kernel_status()}")
    data = write_synthetic(tmp_path / "data", 12, 4)
    run_dir = Path(train(tiny_config(data, tmp_path, cpu_kernel=True), setup=stop_after_first_epoch)["run_dir"])
    assert sessions(run_dir)[-1]["cpu_kernel"].startswith(cpu_kernels.KERNEL_IN_USE)
    return run_dir


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_resume_that_would_switch_paths_is_refused_and_writes_nothing(kernel_run, fresh, monkeypatch) -> None:
    before = _tree(kernel_run)
    with pytest.raises(CheckpointError, match="cpu_kernel: checkpoint has True, now False.*differ bitwise"):
        train(TrainConfig(), resume=kernel_run, overrides={"cpu_kernel": False})
    monkeypatch.setenv("CXX", "no-such-compiler-here")  # and this "machine" cannot have the kernel
    with pytest.raises(CheckpointError, match="resume refused: the run computed its conv blocks with the fused CPU "
                                              "kernel, which cannot be had here .*no C\\+\\+ compiler"):
        train(TrainConfig(), resume=kernel_run)
    after = _tree(kernel_run)
    # this process still logs to the run's train.log from training it above; a warning may be appended, no more
    assert after.pop("train.log").startswith(before.pop("train.log"))
    assert after == before


def test_a_resume_on_the_kernel_continues_on_it(kernel_run) -> None:
    summary = train(TrainConfig(), resume=kernel_run)
    assert summary["finished"] and len((kernel_run / "metrics.jsonl").read_text().splitlines()) == 2
    assert [s["cpu_kernel"].startswith(cpu_kernels.KERNEL_IN_USE) for s in sessions(kernel_run)] == [True, True]
