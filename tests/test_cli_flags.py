"""One owner for config defaults and flags: the run-config flags of `train` and `cv` are built from `TrainConfig`,
show the dataclass's defaults, are the same for both commands, keep their old spellings, and reach the config;
the cv flag rules (`ignite_trainer.experiments.cv_flags`) keep every message and exit code.

Nothing here trains: the library calls the commands end in are replaced by stubs that record their arguments.
"""

import dataclasses
import re
import typing

import click
import pytest

import cli
import ignite_trainer.experiments.cv_flags as cv_flags
import ignite_trainer.training.run as training_run
from ignite_trainer.core.config import TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)
COMMANDS = ("train", "cv")
#: Every flag spelling `train` had before its flags were built from the dataclass, and the field it set.
OLD_SPELLINGS = {
    "--data": "data", "--format": "format", "--epochs": "epochs", "--batch-size": "batch_size", "--lr": "learning_rate",
    "--weight-decay": "weight_decay", "--patience": "early_stopping_patience", "--grad-clip": "gradient_clip",
    "--seed": "seed", "--output-dir": "output_dir", "--name": "name", "--device": "device", "--amp": "amp",
    "--num-workers": "num_workers", "--model": "model", "--skip-bad": "skip_bad", "--progress": "progress",
    "--nproc-per-node": "nproc_per_node", "--backend": "backend", "--monitor": "monitor",
    "--window-seconds": "window_seconds", "--n-folds": "n_folds", "--fold": "fold", "--cache-dir": "cache_dir",
    "--tracker": "tracker", "--tracking-uri": "tracking_uri", "--amp-dtype": "amp_dtype",
    "--feature-dtype": "feature_dtype", "--sync-every": "sync_every", "--resident-features": "resident_features",
    "--compile": "compile", "--eval-batch-size": "eval_batch_size", "--demographics": "demographics",
}
#: Flags added since.
NEW_SPELLINGS = {"--cpu-kernel": "cpu_kernel", "--init-from": "init_from", "--freeze-trunk": "freeze_trunk",
                 "--trunk-lr-scale": "trunk_lr_scale", "--warmup-epochs": "warmup_epochs", "--heads": "heads",
                 "--attribute-loss-weight": "attribute_loss_weight",
                 "--segmentation-loss-weight": "segmentation_loss_weight", "--patient-model": "patient_model"}


def config_params(command: str) -> dict[str, click.Option]:
    """The command's options that set a config field (cv's own --split-seed is an argument of the experiment)."""
    return {p.name: p for p in cli.cli.commands[command].params if p.name in cli.CONFIG_FLAGS}


def test_the_config_flags_are_the_fields_train_had_flags_for():
    assert cli.CONFIG_FLAGS == set(OLD_SPELLINGS.values()) | set(NEW_SPELLINGS.values())
    assert cli.CONFIG_FLAGS <= set(FIELDS)


def expected_default(name: str, flag: str) -> str | None:
    value = FIELDS[name].default
    if value is None:
        return None
    if isinstance(value, bool):
        return flag[2:] if value else "no-" + flag[2:]
    return str(value)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_flag_shows_the_dataclass_default_and_help(command):
    params = config_params(command)
    assert set(params) == set(OLD_SPELLINGS.values()) | set(NEW_SPELLINGS.values())
    ctx = click.Context(cli.cli.commands[command], info_name=command)
    for name, param in params.items():
        help_text = param.get_help_record(ctx)[1]
        shown = re.findall(r"\[default: ([^\]]*)\]", help_text)
        expected = expected_default(name, param.opts[0])
        assert shown == ([] if expected is None else [expected]), (name, help_text)
        if command == "train":  # cv says --name and --output-dir place the experiment directory
            assert help_text.startswith(FIELDS[name].metadata["help"]), (name, help_text)
        assert param.default is None  # only what the user typed overrides --config


@pytest.mark.parametrize("command", COMMANDS)
def test_no_help_text_writes_a_default_of_its_own(command):
    """The old hand-written "[100]", "[32]" ... are gone: a default shown is click's or the dataclass's."""
    ctx = click.Context(cli.cli.commands[command], info_name=command)
    for param in cli.cli.commands[command].params:
        record = param.get_help_record(ctx)
        if record and param.name in cli.CONFIG_FLAGS:
            rest = re.sub(r"\[default: [^\]]*\]|'[^']*'", "", record[1])  # click's default, quoted text
            assert "[" not in rest, record


@pytest.mark.parametrize("command", COMMANDS)
def test_flag_types_and_choices_are_the_fields(command):
    for name, param in config_params(command).items():
        hint = HINTS[name]
        args = typing.get_args(hint)
        base = next(a for a in args if a is not type(None)) if type(None) in args else hint
        if base is bool:
            assert param.is_flag and param.secondary_opts == ["--no-" + param.opts[0][2:]], name
        elif typing.get_origin(base) is typing.Literal:
            assert list(param.type.choices) == list(typing.get_args(base)), name
        elif typing.get_origin(base) is list:  # a comma-separated list of names
            assert param.type.name == "text" and param.callback is cli._comma_list, name
        else:
            assert param.type.name == {int: "integer", float: "float", str: "text"}[base], name


def test_train_and_cv_take_the_same_config_flags():
    def signature(command):
        return {name: (tuple(p.opts), tuple(p.secondary_opts), p.type.name, getattr(p.type, "choices", None))
                for name, p in config_params(command).items()}

    assert signature("train") == signature("cv")
    for command in COMMANDS:
        options = {opt for p in cli.cli.commands[command].params for opt in p.opts}
        assert {"--config", "--set"} <= options


@pytest.mark.parametrize("command", COMMANDS)
def test_old_spellings_are_still_the_flags(command):
    params = config_params(command)
    assert {flag: name for name, p in params.items() for flag in p.opts} == {**OLD_SPELLINGS, **NEW_SPELLINGS}


@pytest.fixture
def calls(monkeypatch):
    """Stub the library calls `train` and `cv` end in; each call is recorded as (what, config or path, kwargs)."""
    seen = []

    def fake_train(config, **kw):
        seen.append(("train", config, kw))
        return {"run_dir": "runs/x", "already_finished": True, "epoch": 1}

    def fake_cross_validate(config, folds, seeds, **kw):
        seen.append(("cross_validate", config, {"folds": folds, "seeds": seeds, **kw}))
        return {"collected": False, "failed": {}}

    def fake_resume(exp_dir, **kw):
        seen.append(("resume", exp_dir, kw))
        return {"collected": False, "failed": {"fold1_seed0": "RuntimeError: boom"}, "exp_dir": exp_dir}

    def fake_collect(exp_dir, **kw):
        seen.append(("collect", exp_dir, kw))
        return {}

    monkeypatch.setattr(training_run, "train", fake_train)
    monkeypatch.setattr(cv_flags, "cross_validate", fake_cross_validate)
    monkeypatch.setattr(cv_flags, "resume_cross_validation", fake_resume)
    monkeypatch.setattr(cv_flags, "collect_experiment", fake_collect)
    return seen


TYPED = ["--lr", "0.01", "--patience", "3", "--grad-clip", "0.5", "--format", "physionet2016", "--batch-size", "8",
         "--amp", "--skip-bad", "--no-progress", "--backend", "gloo", "--amp-dtype", "float16", "--no-compile",
         "--eval-batch-size", "16", "--window-seconds", "5", "--device", "cpu", "--n-folds", "3"]
EXPECTED = dict(learning_rate=0.01, early_stopping_patience=3, gradient_clip=0.5, format="physionet2016",
                batch_size=8, amp=True, skip_bad=True, progress=False, backend="gloo", amp_dtype="float16",
                compile=False, eval_batch_size=16, window_seconds=5.0, device="cpu", n_folds=3)


@pytest.mark.parametrize("command", COMMANDS)
def test_typed_flags_reach_the_config_between_the_file_and_set(command, calls, tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 7\nweight_decay: 0.5\nlearning_rate: 0.1\n")
    args = [command, "--config", str(config_file), *TYPED, "--epochs", "3", "--set", "epochs=5"]
    assert cli.main(args) == 0, capsys.readouterr().err
    (what, config, kw), = calls
    assert what == ("train" if command == "train" else "cross_validate")
    assert {k: getattr(config, k) for k in EXPECTED} == EXPECTED
    assert (config.epochs, config.weight_decay) == (5, 0.5)  # --set beats the flag, the flag the file
    untouched = {k for k in FIELDS if k not in EXPECTED and k not in ("epochs", "weight_decay", "learning_rate")}
    assert {k: getattr(config, k) for k in untouched} == {k: getattr(TrainConfig(), k) for k in untouched}
    if command == "cv":
        assert kw["folds"] == 3 and kw["seeds"] == [0]  # no --folds: the config's n_folds


def test_cv_without_folds_or_n_folds_deals_five(calls):
    assert cli.main(["cv", "--seeds", "0,2"]) == 0
    assert calls[0][2]["folds"] == cv_flags.DEFAULT_FOLDS == 5 and calls[0][2]["seeds"] == [0, 2]


def test_a_typed_value_outside_the_fields_range_is_one_config_error(calls, capsys):
    for command in COMMANDS:
        assert cli.main([command, "--batch-size", "0"]) == 2
        assert capsys.readouterr().err == "error: command line: batch_size=0 is out of range (must be >= 1)\n"
    assert calls == []


# The messages and exit codes the cv flag rules had in cli.py, unchanged.
CV_REFUSALS = [
    (["--bootstrap", "-1"], "error: cli.py cv: Invalid value: --bootstrap=-1 must be >= 0"),
    (["--jobs", "0"], "error: cli.py cv: Invalid value: --jobs=0 must be >= 1"),
    (["--only", "bad", "--resume", "x", "--collect", "y"], "error: --only 'bad': expected FOLD:SEED, e.g. 2:0"),
    (["--resume", "x", "--collect", "y"], "error: cli.py cv: --resume and --collect cannot be combined"),
    (["--resume", "x", "--data", "d"],
     "error: cli.py cv: --data cannot be combined with --resume/--collect (the experiment's own settings are used)"),
    (["--resume", "x", "--seeds", "0,1"],
     "error: cli.py cv: --seeds cannot be combined with --resume/--collect (the experiment's own settings are used)"),
    (["--collect", "x", "--no-progress"],
     "error: cli.py cv: --progress cannot be combined with --resume/--collect (the experiment's own settings are used)"),
    (["--resume", "x", "--data", "d", "--epochs", "2", "--set", "a=1"],
     "error: cli.py cv: --data, --epochs, --set cannot be combined with --resume/--collect (the experiment's own "
     "settings are used)"),
    (["--collect", "x", "--lr", "0.1"],  # a flag cv gained is refused the same way
     "error: cli.py cv: --lr cannot be combined with --resume/--collect (the experiment's own settings are used)"),
    (["--collect", "x", "--only", "1:0"], "error: cli.py cv: --collect takes no --only or --overwrite"),
    (["--collect", "x", "--overwrite"], "error: cli.py cv: --collect takes no --only or --overwrite"),
    (["--resume", "x", "--overwrite"], "error: cli.py cv: --overwrite cannot be combined with --resume"),
    (["--seeds", "a,b"],
     "error: cli.py cv: Invalid value: --seeds='a,b': expected integers separated by commas, e.g. 0,1,2"),
]


@pytest.mark.parametrize("args, message", CV_REFUSALS, ids=[" ".join(a) for a, _ in CV_REFUSALS])
def test_cv_flag_rules_keep_their_messages_and_exit_code(args, message, calls, capsys):
    assert cli.main(["cv", *args]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert calls == []  # refused before any work


def test_cv_resume_and_collect_take_only_what_does_not_set_up_an_experiment(calls, capsys):
    code = cli.main(["cv", "--resume", "x", "--jobs", "2", "--only", "1:0", "--bootstrap", "5", "--no-figures",
                     "--seeds", "0"])
    assert code == 2  # the stub's member failed: one line naming it, after the others finished
    assert capsys.readouterr().err == ("error: 1 run(s) of x failed: fold1_seed0 (RuntimeError: boom); the others "
                                       "finished; rerun them with cv --resume\n")
    (what, exp_dir, kw), = calls
    assert (what, exp_dir, kw["jobs"], kw["bootstrap"], kw["figures"]) == ("resume", "x", 2, 5, False)
    assert [(m.fold, m.seed) for m in kw["only"]] == [(1, 0)]


def test_train_resume_rules_are_unchanged(calls, capsys):
    assert cli.main(["train", "--resume", "r", "--config", "c.yaml"]) == 2
    assert capsys.readouterr().err == ("error: cli.py train: --config cannot be combined with --resume (the run's own "
                                       "config is used)\n")
    assert cli.main(["train", "--resume", "r", "--lr", "0.1", "--device", "cpu", "--set", "epochs=3"]) == 0
    (_, _, kw), = calls
    assert kw == {"resume": "r", "overrides": {"learning_rate": 0.1, "device": "cpu", "epochs": 3}}
