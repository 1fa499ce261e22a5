"""One owner per rule: each rule of the project is written in one module and every other module calls it.

The code is read with `ast`, so a second copy of a rule (a file name spelled again, a constant defined
twice) fails here even before it drifts from the first; the behaviour of each owner is pinned by a test of
its own below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ignite_trainer.core import vocabulary
from ignite_trainer.core.vocabulary import (CLASS_WEIGHTS, MURMUR_CLASSES, OUTCOME_CLASSES, best_epoch, score_mode,
                                            score_sign)
from ignite_trainer.data.records import Recording
from ignite_trainer.data.splits import patient_labels, patient_stratum
from ignite_trainer.scoring.decision import DECISION_WEIGHTS
from ignite_trainer.scoring.scores import binary_weighted_accuracy

PACKAGE = Path(__file__).resolve().parents[1] / "ignite_trainer"

#: A file name of the run directory (or one of its checkpoint folder) -> the one module that spells it.
FILE_NAMES = {
    "config.yaml": "runs/rundir.py",
    "resolved.yaml": "runs/rundir.py",
    "metrics.jsonl": "runs/rundir.py",
    "train.log": "runs/rundir.py",
    "checkpoints": "runs/checkpoint.py",
    "split.json": "runs/record.py",
    "environment.json": "runs/record.py",
}
#: A rule's constant -> the one module that defines it.
CONSTANTS = {
    "LABELS": "core/vocabulary.py",
    "MURMUR_CLASSES": "core/vocabulary.py",
    "OUTCOME_CLASSES": "core/vocabulary.py",
    "CHALLENGE_OUTPUT_CLASSES": "core/vocabulary.py",
    "CLASS_WEIGHTS": "core/vocabulary.py",
    "BEST_PATTERN": "runs/checkpoint.py",
    "LAST_PATTERN": "runs/checkpoint.py",
}
#: A rule's function -> the one module that defines it.
FUNCTIONS = {
    "score_mode": "core/vocabulary.py",
    "best_epoch": {"core/vocabulary.py", "use/report.py"},  # the report's reads its log, then calls the owner
    "parse_checkpoint_name": "runs/checkpoint.py",
    "read_safetensors": "runs/weights.py",
    "load_trunk": "model/trunk.py",
    "patient_labels": "data/splits.py",
    "patient_stratum": "data/splits.py",
    "assign_folds": "data/splits.py",
    "rebuild_model": "use/model_files.py",
    "build_model": "model/registry.py",
    "cache_root": "core/config.py",
}


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are code, not a docstring."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def _modules() -> dict[str, ast.AST]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(FILE_NAMES))
def test_a_run_file_name_is_spelled_by_its_owner_only(name):
    spelled = sorted(path for path, tree in MODULES.items()
                     if any(node.value == name or node.value.endswith("/" + name) for node in _code_strings(tree)))
    assert spelled == [FILE_NAMES[name]], f"{name!r} is spelled in {spelled}; use `runs.rundir.RunDirectory`"


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_a_rule_constant_is_defined_once(name):
    defined = sorted(path for path, tree in MODULES.items() for node in tree.body
                     if isinstance(node, (ast.Assign, ast.AnnAssign))
                     and any(isinstance(t, ast.Name) and t.id == name
                             for t in (node.targets if isinstance(node, ast.Assign) else [node.target])))
    assert defined == [CONSTANTS[name]], f"{name} is defined in {defined}"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_a_rule_function_is_defined_once(name):
    defined = {path for path, tree in MODULES.items() for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name}
    owners = FUNCTIONS[name]
    assert defined == (owners if isinstance(owners, set) else {owners}), f"{name} is defined in {sorted(defined)}"


# ---------------------------------------------------------------------------------------------- the rules
def test_the_loss_is_the_one_score_minimised():
    assert score_mode("val_loss") == "min" and score_sign("val_loss") == -1.0
    for name in ("macro_f1", "heart.f1", "murmur.specificity"):
        assert score_mode(name) == "max" and score_sign(name) == 1.0


def test_the_best_epoch_is_the_earliest_of_equal_epochs_everywhere(tmp_path):
    from ignite_trainer.runs.checkpoint import find_best_checkpoint
    from ignite_trainer.use.report import best_epoch as report_best_epoch

    assert best_epoch([(1, 0.5), (2, 0.7), (3, 0.7), (4, None)], "max") == 2
    assert best_epoch([(1, 0.4), (2, 0.3), (3, 0.3)], "min") == 2
    assert best_epoch([(1, None), (2, float("nan"))], "max") is None
    records = [{"epoch": 1, "macro_f1": 0.5}, {"epoch": 2, "macro_f1": 0.7}, {"epoch": 3, "macro_f1": 0.7}]
    assert report_best_epoch(records, "macro_f1") == 2
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("best_checkpoint_2_macro_f1=0.7000.pt", "best_checkpoint_3_macro_f1=0.7000.pt"):
        (ckpts / name).write_bytes(b"")
    assert find_best_checkpoint(tmp_path).name == "best_checkpoint_2_macro_f1=0.7000.pt"


def test_the_challenge_weights_are_the_decision_layers_and_the_outcome_scores():
    assert CLASS_WEIGHTS[MURMUR_CLASSES] == (5, 3, 1) and CLASS_WEIGHTS[OUTCOME_CLASSES] == (5, 1)
    assert DECISION_WEIGHTS == tuple(float(w) for w in CLASS_WEIGHTS[MURMUR_CLASSES])
    # TP 2, FN 1, FP 1, TN 3: (5 * 2 + 3) / (5 * 3 + 4)
    assert binary_weighted_accuracy([1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0]) == pytest.approx(13 / 19)
    assert vocabulary.CHALLENGE_OUTPUT_CLASSES == MURMUR_CLASSES + OUTCOME_CLASSES


def _recording(rid: str, murmur: float, murmur_class: str | None, heart: float = 0.0) -> Recording:
    return Recording(rid, "p1", Path(f"/nowhere/{rid}.wav"), (heart, murmur), (True, murmur_class != "Unknown"),
                     murmur_class=murmur_class)


def test_a_present_patient_is_murmur_positive_for_its_stratum_too():
    # Murmur locations that match none of its recordings: every recording is murmur 0, the patient Present.
    patient = [_recording("p1_AV", 0.0, "Present"), _recording("p1_MV", 0.0, "Present")]
    labels, mask, murmur_class = patient_labels(patient)
    assert (labels[1], mask[1], murmur_class) == (1.0, True, "Present")
    assert patient_stratum(patient) == ("0", "1")  # the fold dealing sees the label the scores see


def test_strata_follow_the_patient_labels():
    assert patient_stratum([_recording("a", 0.0, "Absent")]) == ("0", "0")
    assert patient_stratum([_recording("a", 0.0, "Unknown")]) == ("0", "?")
    assert patient_stratum([_recording("a", 1.0, None, heart=1.0), _recording("b", 0.0, None, heart=1.0)]) == ("1", "1")
