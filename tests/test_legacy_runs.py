"""Files an older version wrote (``tests/fixtures/legacy/``, see its README.md) still resume, evaluate, predict,
export and collect with that version's numbers, whatever the package's modules are called now.

Only ``cli.py`` runs, in subprocesses, in a copy of the fixture (the committed files are never touched) with the
commands and environment its ``fixture.json`` recorded; nothing here imports the package, so the test holds
across a reorganisation of its modules. The dataset is written again by ``cli.py synth`` and must match the
fixture's checksums first: every other number depends on it.

Floats are compared to `TOLERANCE`: on the machine that wrote the fixture every number comes back bit for bit,
but CPU kernels for another instruction set round the last bits differently (measured by forcing other ATen,
oneDNN and MKL code paths: up to 3e-8 on the probabilities, 2e-7 on the weights). Everything discrete (ids,
counts, labels, classes, file and checkpoint names, report text) must be equal. One label sits on a knife's edge
by construction: a tuned threshold is a validation recording's own probability (heart: recording 1501_TV's), so
where that probability rounds one step lower its label flips; none did on the code paths tried.

``IGNITE_TRAINER_LEGACY_EXACT=1`` asks for every number bit for bit, which holds on a machine like the one that
wrote the fixture (``fixture.json``) and also catches last-bit changes (another BatchNorm folding, the fused
kernel) that the tolerance lets through.
"""

import csv
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import yaml

from ignite_trainer.core.config import ADDED_LATER

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "legacy"
SPEC = json.loads((FIXTURE / "fixture.json").read_text())
EXACT = os.environ.get("IGNITE_TRAINER_LEGACY_EXACT") == "1"
TOLERANCE = 0.0 if EXACT else 1e-6
#: Wall-clock times in ``metrics.jsonl``: the only fields a resumed run may not share with the one never stopped.
TIMES = ("seconds", "val_seconds")
#: Checkpoint keys newer than the fixture: the torch thread count training ran with. A run resumed from the
#: fixture's checkpoints (which hold none) trains with the resuming process's count, as the old code did.
NEW_CHECKPOINT_KEYS = {"torch_threads": int(SPEC["environment"]["OMP_NUM_THREADS"])}
#: Decision-layer keys newer than the fixture: how many patients each label's layer was fitted on. Counts the old
#: layers did not write; everything they did write must be equal.
NEW_DECISION_KEYS = ("fitted_patients.murmur", "fitted_patients.outcome")
OUTPUT_FLAGS = ("--output-dir", "--output", "--challenge-dir")
#: attention_cnn's last attention bias adds the same to every frame's score, which the softmax over time ignores:
#: its gradient is zero up to rounding, and Adam scales that rounding noise into steps of the learning rate. Its
#: value is arbitrary and changes no output (on another CPU it ends 2e-3 away), so it is only held to the steps
#: training could have taken; bit for bit on the machine that wrote the fixture.
SOFTMAX_SHIFT = "pool.score.2.bias"


def _command(command: list[str]) -> list[str]:
    return [SPEC["checkpoint"] if arg == "CHECKPOINT" else arg for arg in command]


def _outputs(command: list[str]) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg in OUTPUT_FLAGS]


#: The old code's own evaluate/predict commands, by what they wrote: ``evaluate_run``, ``predict_cv``, ...
EXPECTED = {Path(_outputs(c)[0]).stem: _command(c) for c in SPEC["expected"]}


# ---------------------------------------------------------------------------------------------- comparison
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf)", re.IGNORECASE)


def differences(new, old, where: str = "") -> list[str]:
    """Where ``new`` is not ``old``: floats and float tensors to `TOLERANCE`, everything else exactly."""
    if isinstance(old, dict):
        if isinstance(new, dict):  # a config field added later, at the value every older run had, is no change
            new = {k: v for k, v in new.items() if k in old or k not in ADDED_LATER or v != ADDED_LATER[k]}
            if "murmur.kind" in old:  # a decision layer: the fitted-patient counts are new
                new = {k: v for k, v in new.items() if k in old or k not in NEW_DECISION_KEYS}
        if not isinstance(new, dict) or set(new) != set(old):
            return [f"{where}: keys {sorted(new) if isinstance(new, dict) else type(new).__name__} != {sorted(old)}"]
        return [d for k in old for d in differences(new[k], old[k], f"{where}/{k}")]
    if isinstance(old, (list, tuple)):
        if not isinstance(new, (list, tuple)) or len(new) != len(old):
            return [f"{where}: {new!r:.200} != {old!r:.200}"]
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(old, torch.Tensor):
        if not isinstance(new, torch.Tensor) or new.shape != old.shape or new.dtype != old.dtype:
            return [f"{where}: {new!r:.200} != tensor {tuple(old.shape)} {old.dtype}"]
        if old.is_floating_point():
            if torch.allclose(new, old, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True):
                return []
            return [f"{where}: differs by up to {(new - old).abs().max().item():.3g}"]
        return [] if torch.equal(new, old) else [f"{where}: tensors differ"]
    numbers = (int, float)
    if isinstance(old, float) and isinstance(new, numbers) and not isinstance(new, bool) \
            or isinstance(new, float) and isinstance(old, numbers) and not isinstance(old, bool):
        if math.isnan(old) and math.isnan(new) or math.isclose(new, old, rel_tol=TOLERANCE, abs_tol=TOLERANCE):
            return []
        return [f"{where}: {new!r} != {old!r}"]
    if type(new) is not type(old) or new != old:
        return [f"{where}: {new!r:.200} != {old!r:.200}"]
    return []


def _cell(text: str):
    return float(text) if _NUMBER.fullmatch(text) else text


def _content(path: Path):
    """A file as values to compare: JSON and CSV parsed (numbers as floats), anything else as bytes."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".yaml":
        return yaml.safe_load(path.read_text())
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [[_cell(c) for c in row] for row in csv.reader(f)]
    return path.read_bytes()


def file_differences(new: Path, old: Path) -> list[str]:
    """`differences` of two files or two folders (the new one may also hold figures, which the fixture dropped)."""
    if old.is_file():
        return differences(_content(new), _content(old), str(new)) if new.is_file() else [f"{new}: missing"]

    def files(folder: Path) -> set[Path]:
        return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()

    old_files, new_files = files(old), files(new)
    found = [f"{new / p}: missing" for p in sorted(old_files - new_files)]
    found += [f"{new / p}: not written by the old code" for p in sorted(new_files - old_files)
              if "figures" not in p.parts]
    return found + [d for p in sorted(old_files & new_files) for d in file_differences(new / p, old / p)]


def assert_no_differences(found: list[str]) -> None:
    assert not found, f"{len(found)} difference(s) from the old code's files:\n" + "\n".join(found[:25])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- the replay
@dataclass(frozen=True)
class Replay:
    work: Path  # the copy of the fixture (without expected/) every command but collect ran in
    collected: Path  # a folder holding data/ and a copy of cv/, where `cv --collect cv/exp` ran
    synth: subprocess.CompletedProcess
    jobs: dict[str, list[subprocess.CompletedProcess]]


def cli(cwd: Path, cache: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **SPEC["environment"], "PYTHONPATH": str(ROOT), "IGNITE_TRAINER_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def assert_ran(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"cli.py {' '.join(proc.args[2:])} exited {proc.returncode}:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> Replay:
    """Every command at once, two at a time (one torch thread each), each job with its own feature cache."""
    base = tmp_path_factory.mktemp("legacy")
    work = base / "work"
    shutil.copytree(FIXTURE, work, ignore=lambda folder, names: ["expected"] if Path(folder) == FIXTURE else [])
    synth = cli(work, base / "cache" / "synth", SPEC["synth"])
    if synth.returncode != 0:
        return Replay(work, base / "collect", synth, {})
    collected = base / "collect"
    shutil.copytree(work / "data", collected / "data")
    shutil.copytree(FIXTURE / "cv", collected / "cv")

    jobs = {
        "resume": (work, [["train", "--resume", "trained/stopped"]]),
        "export": (work, [["export", "trained/full", "new/full.safetensors"],
                          ["predict", "new/full.safetensors", "data", "--output", "new/predict_export.csv"]]),
        "collect": (collected, [SPEC["collect"]]),
        **{name: (work, [command]) for name, command in EXPECTED.items()},
    }

    def run_job(name: str) -> list[subprocess.CompletedProcess]:
        cwd, commands = jobs[name]
        done = []
        for command in commands:
            done.append(cli(cwd, base / "cache" / name, command))
            if done[-1].returncode != 0:
                break
        return done

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(run_job, jobs)))
    return Replay(work, collected, synth, results)


def ran(replay: Replay, job: str) -> list[subprocess.CompletedProcess]:
    assert_ran(replay.synth)
    for proc in replay.jobs[job]:
        assert_ran(proc)
    return replay.jobs[job]


# ---------------------------------------------------------------------------------------------- tests
def test_synth_writes_the_dataset_the_fixture_was_made_from(replay):
    assert_ran(replay.synth)
    data = replay.work / "data"
    manifest = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(replay.work).as_posix()}\n"
                       for p in sorted(data.rglob("*")) if p.is_file())
    old = (FIXTURE / "data.sha256").read_text()
    assert manifest == old, "cli.py synth no longer writes the same bytes; nothing else here can match"


def test_the_stopped_run_resumes_to_the_run_never_stopped(replay):
    ran(replay, "resume")
    run, full = replay.work / "trained" / "stopped", FIXTURE / "trained" / "full"
    stopped = FIXTURE / "trained" / "stopped"
    [reference_path] = (full / "checkpoints").glob("best_checkpoint_*.pt")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        sorted(["last_checkpoint_1.pt", "last_checkpoint_2.pt", reference_path.name])
    resumed, reference = load(run / "checkpoints" / reference_path.name), load(reference_path)
    last = load(run / "checkpoints" / "last_checkpoint_2.pt")
    assert last["epoch"] == 2 and last["finished"] is True
    for ckpt in (resumed, last):
        assert {k: ckpt.pop(k, None) for k in NEW_CHECKPOINT_KEYS} == NEW_CHECKPOINT_KEYS

    steps = 0.0 if EXACT else 2 * reference["config"]["learning_rate"] * reference["epoch"]  # Adam: ~lr a step
    shift = reference["model_state_dict"].pop(SOFTMAX_SHIFT)
    for weights in (resumed["model_state_dict"], last["model_state_dict"]):
        assert (weights.pop(SOFTMAX_SHIFT) - shift).abs().max() <= steps, SOFTMAX_SHIFT
    # The resumed run's best checkpoint is the uninterrupted run's in every field: weights, optimizer, trainer,
    # scheduler and RNG states, thresholds, decision layer, identity; only the run's name differs.
    assert (resumed["config"]["name"], reference["config"]["name"]) == ("stopped", "full")
    resumed["config"]["name"] = reference["config"]["name"]
    assert_no_differences(differences(resumed, reference, "best checkpoint"))
    assert_no_differences(differences(last["model_state_dict"], reference["model_state_dict"], "last weights"))
    # The identity (config and data fingerprints) the old code stored is the one the new code computes.
    stopped_identity = load(stopped / "checkpoints" / "last_checkpoint_1.pt")["run_identity"]
    assert last["run_identity"] == stopped_identity == reference["run_identity"]

    def epochs(path):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in path.read_text().splitlines()]

    assert_no_differences(differences(epochs(run / "metrics.jsonl"), epochs(full / "metrics.jsonl"), "metrics.jsonl"))
    assert (run / "metrics.jsonl").read_text().splitlines()[0] == (stopped / "metrics.jsonl").read_text().strip()
    sessions = json.loads((run / "environment.json").read_text())["sessions"]
    assert [s["outcome"] for s in sessions] == ["stopped by SIGTERM", "finished"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_evaluate_and_predict_give_the_old_numbers(replay, name):
    """evaluate of the old run directory, checkpoint, export and cv experiment (an ensemble), and predict of
    the run, export and experiment: every file they wrote, as the old code wrote it."""
    ran(replay, name)
    found = []
    for output in _outputs(EXPECTED[name]):
        found += file_differences(replay.work / output, FIXTURE / output)
    assert_no_differences(found)


def _metadata(path: Path) -> dict:
    with safetensors.safe_open(str(path), framework="pt") as f:
        values = dict(f.metadata())
    values["config"] = yaml.safe_load(values["config"])
    for key in ("thresholds", "decision"):
        values[key] = json.loads(values[key])
    return values


def test_export_of_the_old_run_is_the_old_export(replay):
    ran(replay, "export")
    new, old = replay.work / "new" / "full.safetensors", FIXTURE / "export" / "full.safetensors"
    # the weights are the checkpoint's, copied: equal to the bit on any machine
    new_weights, old_weights = safetensors.torch.load_file(str(new)), safetensors.torch.load_file(str(old))
    assert new_weights.keys() == old_weights.keys()
    assert all(torch.equal(new_weights[k], old_weights[k]) for k in old_weights)
    assert not differences(_metadata(new), _metadata(old))
    # ... and it predicts what the old export predicted with the old code
    assert_no_differences(file_differences(replay.work / "new" / "predict_export.csv",
                                           FIXTURE / "expected" / "predict_export.csv"))


def test_cv_collect_rebuilds_the_old_experiment(replay):
    """Pooled out-of-fold scores, intervals, thresholds, decision layer, ensemble manifest and report: as the old
    code collected them, and the member runs untouched."""
    ran(replay, "collect")
    assert_no_differences(file_differences(replay.collected / "cv" / "exp", FIXTURE / "cv" / "exp"))
