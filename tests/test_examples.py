"""Each script in ``examples/`` runs as ``python examples/X.py`` on tiny synthetic data and does what it says.

One subprocess per example (the model registry is per process, and this is how a user runs them), all on one
shared 12-patient data set and feature cache, with tiny features (8 mels at 1 kHz) and one torch thread.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ignite_trainer
from ignite_trainer import write_synthetic
from ignite_trainer.runs.checkpoint import load_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY_SETS = ["--set", "n_mels=8", "--set", "sample_rate=1000", "--set", "hop_ms=20", "--set", "n_fft=64",
             "--set", "val_fraction=0.34"]


#: What an example may import besides the package's top-level names: the standard library, torch and Ignite,
#: and ``cli`` (the repository's command line, which ``custom_model.py`` drives in its own process).
ALLOWED_MODULES = {*sys.stdlib_module_names, "__future__", "torch", "ignite", "cli"}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every import in ``path``, nested ones included: ``(line, module, names)``; ``names`` empty for ``import m``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or ""), [a.name for a in node.names]))
    return found


@pytest.mark.parametrize("script", sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.py")))
def test_examples_use_only_the_public_face(script):
    """An example is what a user may copy: ``from ignite_trainer import X`` of names in ``__all__`` only, never a
    wing module, and otherwise nothing but the standard library, torch and Ignite."""
    wrong = []
    for line, module, names in _imports(EXAMPLES / script):
        top = module.split(".")[0]
        if module == "ignite_trainer":
            wrong += [f"{line}: {name} is not a public name" for name in names if name not in ignite_trainer.__all__]
        elif top == "ignite_trainer":
            wrong.append(f"{line}: imports the wing module {module}; use a top-level name")
        elif top not in ALLOWED_MODULES:
            wrong.append(f"{line}: imports {module}")
    assert not wrong, f"examples/{script}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("script", sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.py")))
def test_examples_name_metrics_through_the_constants(script):
    """The metric names the standard handlers read are written through the package's constants, never as strings."""
    names = {ignite_trainer.VAL_LOSS, ignite_trainer.MACRO_F1, ignite_trainer.PREDICTIONS, ignite_trainer.PER_LABEL}
    tree = ast.parse((EXAMPLES / script).read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node)}
    bare = [f"{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings]
    assert not bare, f"examples/{script} spells metric names as strings:\n" + "\n".join(bare)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = tmp_path_factory.mktemp("examples")
    return {"data": write_synthetic(base / "data", 12, 4), "cache": base / "cache"}


def run_example(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_custom_training_trains_and_checkpoints_an_ema(shared, tmp_path):
    out = tmp_path / "out"
    stdout = run_example("custom_training.py", "--data", str(shared["data"]), "--epochs", "2", "--batch-size", "4",
                         "--out", str(out), "--cache-dir", str(shared["cache"]), "--tiny", cwd=tmp_path)
    rows = [json.loads(line) for line in (out / "ema_metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["ema_updates"] == 2 * rows[0]["ema_updates"] > 0  # one update per optimiser step
    assert all(r["ema_val_loss"] != r["val_loss"] for r in rows)  # the EMA evaluator scored other weights
    assert "(EMA" in stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the standard handler ran alongside

    [best] = (out / "checkpoints").glob("best_checkpoint_*.pt")
    ckpt = load_checkpoint(best)
    assert {"model_state_dict", "optimizer_state_dict", "trainer", "rng", "thresholds", "ema"} <= set(ckpt)
    assert ckpt["ema"]["updates"] > 0  # the script's own object went in next to the standard set
    ema = ckpt["ema"]["weights"]
    assert ema.keys() == ckpt["model_state_dict"].keys()
    differs = [k for k, v in ema.items() if v.is_floating_point() and not torch.equal(v, ckpt["model_state_dict"][k])]
    assert differs, "the EMA weights should lag behind the trained ones"


def test_event_hooks_see_every_custom_event(shared, tmp_path):
    # lr 1e-6: the scores barely move, so early stopping (patience 1 on macro F1) fires within a few epochs
    stdout = run_example("event_hooks.py", "--data", str(shared["data"]), "--epochs", "6", "--batch-size", "4",
                         "--lr", "1e-6", "--patience", "1", "--monitor", "macro_f1", "--out", str(tmp_path),
                         "--name", "hooked", "--cache-dir", str(shared["cache"]), "--tiny", cwd=tmp_path)
    run_dir = tmp_path / "hooked"
    events = [json.loads(line) for line in (run_dir / "hooks.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    validations = [e for e in events if e["event"] == "validation_completed"]
    assert [e["epoch"] for e in validations] == list(range(1, len(validations) + 1))
    for v in validations:
        assert isinstance(v["misclassified"], list) and isinstance(v["macro_f1"], float)
        for w in v["misclassified"]:
            assert w["label"] in ("heart", "murmur") and w["target"] in (0, 1)

    best = [e for e in events if e["event"] == "best_model_saved"]
    assert best and best[0]["epoch"] == 1
    assert all(Path(b["best_model_path"]).parent == run_dir / "checkpoints" for b in best)
    assert best[0]["attention_shape"][0] == 8  # attention of the best model over 8 validation windows
    tb_files = list((run_dir / "tb" / "hooks").glob("events.out.tfevents.*"))
    assert tb_files and b"attention/best_model" in tb_files[0].read_bytes()

    [stopped] = [e for e in events if e["event"] == "early_stopped"]
    assert stopped["early_stopped_epoch"] == stopped["epoch"] == validations[-1]["epoch"] < 6
    assert kinds.index("early_stopped") < len(kinds) - 1  # fired during the last validation, before our own handler
    assert "early stopping after epoch" in stdout and "misclassified" in stdout


def test_custom_model_is_registered_and_trained_through_the_cli(shared, tmp_path):
    runs = tmp_path / "runs"
    stdout = run_example("custom_model.py", "--", "--data", str(shared["data"]), "--epochs", "1", "--batch-size", "4",
                         "--output-dir", str(runs), "--name", "gru", "--device", "cpu", "--no-progress",
                         "--set", f"cache_dir={shared['cache']}", *TINY_SETS, cwd=tmp_path)
    assert f"run directory: {runs / 'gru'}" in stdout
    assert " INFO epoch 1/1  train_loss " in (runs / "gru" / "train.log").read_text()  # the epoch line
    [best] = (runs / "gru" / "checkpoints").glob("best_checkpoint_*.pt")
    ckpt = load_checkpoint(best)
    assert ckpt["config"]["model"] == "gru_attention"
    assert "gru.weight_ih_l0" in ckpt["model_state_dict"]  # the GRU's weights, not the default CNN's

    # evaluate rebuilds the model by the stored name: it works through the script, which registers it
    run_example("custom_model.py", "--command", "evaluate", "--", str(runs / "gru"), cwd=tmp_path)
    assert (runs / "gru" / "report" / "metrics.json").is_file()
