"""The bad-input matrix (docs/bad-inputs.md): every row through ``cli.main``, exit code 2, one ``error:`` line
naming the culprit, no traceback, and nothing that existed before overwritten or any checkpoint written.

Each row is a mistake a user makes with real files; a row that crashed with a traceback, trained on a short
array, or silently replaced a run would be a bug the table promises is not there.
"""

import errno
import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch

import cli
from conftest import tiny_config
from ignite_trainer.runs.checkpoint import load_checkpoint
from ignite_trainer.data.synthetic import write_synthetic
from ignite_trainer.training.events import TrainerEvents
from ignite_trainer.training.run import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["n_mels=8", "sample_rate=1000", "hop_ms=20.0", "n_fft=64", "window_seconds=4.0", "val_fraction=0.34"]


@pytest.fixture(autouse=True)
def fresh_log_stream():
    """`setup_logging` keeps its stderr handler across runs in one process; pytest swaps stderr per test."""
    logger = logging.getLogger("ignite_trainer")
    for h in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
        logger.removeHandler(h)
    yield


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("pristine") / "data", 12, 4)


@pytest.fixture
def data(pristine, tmp_path):
    """A private copy of the synthetic set for a row to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def train_args(tmp_path, data, *extra, name="r"):
    args = ["train", "--data", str(data), "--epochs", "2", "--batch-size", "4", "--no-progress", "--device", "cpu",
            "--output-dir", str(tmp_path / "runs"), "--name", name, "--patience", "0",
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    for item in SMALL:
        args += ["--set", item]
    return args + list(extra)


def tree_digest(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def expect_error(capsys, args, *needles, root: Path | None = None):
    """Run the CLI and check the contract of a row: exit 2, exactly one ``error:`` line, all needles in it."""
    before = tree_digest(root) if root is not None else None
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    if root is not None:
        after = tree_digest(root)
        assert {k: v for k, v in after.items() if k in before} == before, "an existing file was changed"
        assert not [k for k in after if k not in before and k.endswith(".pt")], "a checkpoint was written"
    return errors[0]


def wav_of(data: Path) -> Path:
    return sorted((data / "training_data").glob("*.wav"))[0]


# ------------------------------------------------------------------------------------------------- data
def test_nonexistent_data_path(tmp_path, capsys):
    expect_error(capsys, train_args(tmp_path, tmp_path / "nowhere"), "nowhere", "does not exist", root=tmp_path)


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty" / "training_data").mkdir(parents=True)
    expect_error(capsys, train_args(tmp_path, tmp_path / "empty", "--format", "circor2022"), "empty", "no patient",
                 root=tmp_path)


def test_zero_byte_wav(tmp_path, data, capsys):
    wav = wav_of(data)
    wav.write_bytes(b"")
    expect_error(capsys, train_args(tmp_path, data), wav.name, "empty file (0 bytes)", root=tmp_path)


def test_non_riff_wav(tmp_path, data, capsys):
    wav = wav_of(data)
    wav.write_bytes(b"ID3" + bytes(200))  # an MP3 renamed to .wav
    expect_error(capsys, train_args(tmp_path, data), wav.name, "not a WAV file", root=tmp_path)


def test_truncated_wav_fails_fast_instead_of_training_on_the_short_array(tmp_path, data, capsys):
    wav = wav_of(data)
    raw = wav.read_bytes()
    wav.write_bytes(raw[: len(raw) // 2])
    expect_error(capsys, train_args(tmp_path, data), wav.name, "truncated WAV", root=tmp_path)
    assert not list((tmp_path / "runs").rglob("*.pt"))


def test_wav_rate_disagreeing_with_the_txt(tmp_path, data, capsys):
    txt = data / "training_data" / "1065.txt"
    lines = txt.read_text().splitlines()
    lines[0] = "1065 4 2000"
    txt.write_text("\n".join(lines) + "\n")
    expect_error(capsys, train_args(tmp_path, data), "1065", "4000 Hz", "2000 Hz", root=tmp_path)


def test_wav_rate_disagreeing_with_the_hea(tmp_path, data, capsys):
    hea = data / "training_data" / "1065_AV.hea"
    lines = hea.read_text().splitlines()
    lines[0] = "1065_AV 1 8000 80228"
    hea.write_text("\n".join(lines) + "\n")
    expect_error(capsys, train_args(tmp_path, data), "1065_AV", "4000 Hz", "8000 Hz", root=tmp_path)


def test_label_file_naming_a_missing_recording(tmp_path, data, capsys):
    (data / "training_data" / "1065_PV.wav").unlink()
    expect_error(capsys, train_args(tmp_path, data), "1065.txt", "1065_PV.wav", "does not exist", root=tmp_path)


def test_unknown_label_value(tmp_path, data, capsys):
    txt = data / "training_data" / "1065.txt"
    txt.write_text(txt.read_text().replace("#Murmur: Absent", "#Murmur: Maybe"))
    csv = data / "training_data.csv"
    csv.write_text(csv.read_text().replace("1065,AV+PV+TV+MV,Child,Male,129.9,23.0,False,Absent",
                                           "1065,AV+PV+TV+MV,Child,Male,129.9,23.0,False,Maybe"))
    expect_error(capsys, train_args(tmp_path, data), "1065.txt", "'Maybe'", "Present, Absent or Unknown",
                 root=tmp_path)


def test_empty_validation_split(tmp_path, pristine, capsys):
    one = tmp_path / "one" / "training_data"
    one.mkdir(parents=True)
    txt = pristine / "training_data" / "1065.txt"
    shutil.copy(txt, one)
    for name in [ln.split()[1:] for ln in txt.read_text().splitlines()[1:5]]:
        for n in name:
            shutil.copy(pristine / "training_data" / n, one)
    expect_error(capsys, train_args(tmp_path, tmp_path / "one", "--format", "circor2022"), "1 patient(s)", "validation",
                 root=tmp_path)


# ------------------------------------------------------------------------------------------------- values
def test_negative_learning_rate(tmp_path, pristine, capsys):
    expect_error(capsys, train_args(tmp_path, pristine, "--lr", "-0.001"), "learning_rate=-0.001", "out of range",
                 root=tmp_path)


def test_zero_epochs(tmp_path, pristine, capsys):
    args = train_args(tmp_path, pristine)
    args[args.index("--epochs") + 1] = "0"
    expect_error(capsys, args, "epochs=0", root=tmp_path)


def test_batch_size_larger_than_the_dataset(tmp_path, pristine, capsys):
    args = train_args(tmp_path, pristine)
    args[args.index("--batch-size") + 1] = "500"
    expect_error(capsys, args, "batch_size=500", root=tmp_path)


# ------------------------------------------------------------------------------------------------- output
def test_output_directory_that_cannot_be_written(tmp_path, pristine, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the output folder should be")  # works as root too, unlike chmod
    expect_error(capsys, train_args(tmp_path, pristine), "runs", "cannot write the run directory", root=tmp_path)
    assert blocker.read_text().startswith("a file")


def test_disk_full_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path, pristine, capsys, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    line = expect_error(capsys, train_args(tmp_path, pristine), "No space left on device", "previous checkpoint")
    ckpt_dir = tmp_path / "runs" / "r" / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert "last_checkpoint_1.pt" in names and not [n for n in names if "_2" in n or n.endswith(".partial")], names
    assert load_checkpoint(ckpt_dir / "last_checkpoint_1.pt")["epoch"] == 1
    assert "last_checkpoint" in line or "best_checkpoint" in line


class _FullDisk:
    """A file whose disk fills during the first large write; the small writes after it land in the file's
    buffer (as they do on a real full disk, until the buffer is flushed)."""

    def __init__(self, f):
        self.f, self.failed = f, False

    def write(self, data):
        data = bytes(data)
        if not self.failed and len(data) > 100:
            self.failed = True
            self.f.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def flush(self):
        self.f.flush()


@pytest.mark.parametrize("failure", ["zip-writer", "bare-enforce-fail"])
def test_disk_full_while_the_last_checkpoint_is_written_keeps_the_previous_one(tmp_path, pristine, capsys,
                                                                                monkeypatch, failure):
    # torch.save does not raise OSError on a full disk: its zip writer raises RuntimeError ("[enforce fail at
    # inline_container.cc:672] ..."), with the OSError of the failed write as its context, or none at all
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "last_checkpoint_2" not in getattr(f, "name", ""):
            return real_save(obj, f, *args, **kwargs)
        if failure == "zip-writer":
            return real_save(obj, _FullDisk(f), *args, **kwargs)  # the real RuntimeError, from the real writer
        f.write(b"\0" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 43904 vs 43800")

    monkeypatch.setattr(torch, "save", save)
    line = expect_error(capsys, train_args(tmp_path, pristine), "last_checkpoint_2.pt", "cannot write checkpoint",
                        "previous checkpoint is intact")
    assert ("No space left on device" if failure == "zip-writer" else "is the disk full?") in line
    ckpt_dir = tmp_path / "runs" / "r" / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert "last_checkpoint_1.pt" in names and "last_checkpoint_2.pt" not in names, names
    assert not [n for n in names if n.endswith(".partial")], names
    assert load_checkpoint(ckpt_dir / "last_checkpoint_1.pt")["epoch"] == 1


def test_resume_on_a_folder_with_no_checkpoint(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "notes.txt").write_text("keep me")
    expect_error(capsys, ["train", "--resume", str(tmp_path / "notarun")], "notarun", "nothing to resume",
                 root=tmp_path)


def test_existing_run_directory_without_resume_or_overwrite(tmp_path, pristine, capsys):
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last_checkpoint_1.pt").write_bytes(b"precious")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    expect_error(capsys, train_args(tmp_path, pristine), str(run), "already exists", "--resume", "--overwrite",
                 root=tmp_path)



def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last_checkpoint_1.pt").write_bytes(b"precious")
    expect_error(capsys, train_args(tmp_path, tmp_path / "nowhere", "--overwrite"), "does not exist")
    assert (run / "checkpoints" / "last_checkpoint_1.pt").read_bytes() == b"precious"


# ------------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    """Unpickling this calls ``open(target, "w")``: the file appearing would prove the pickle ran code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _evil(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": {}, "trainer": {}, "epoch": 1, "evil": _Payload(str(marker))}, path)
    assert not marker.exists()
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(tmp_path, pristine, capsys, command):
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pt", marker)
    args = {"evaluate": ["evaluate", str(evil)], "predict": ["predict", str(evil), str(wav_of(pristine))],
            "export": ["export", str(evil), str(tmp_path / "out.safetensors")]}[command]
    expect_error(capsys, args, "evil.pt", "refused", "it was not loaded", root=tmp_path)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _evil(tmp_path / "run" / "checkpoints" / "last_checkpoint_1.pt", marker)
    expect_error(capsys, ["train", "--resume", str(tmp_path / "run")], "no complete checkpoint", "refused",
                 root=tmp_path)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_reported_by_evaluate_and_predict(trained_run, tmp_path, capsys):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained_run.checkpoint.read_bytes()[:5000])
    expect_error(capsys, ["evaluate", str(cut)], "cut.pt", "truncated or corrupt", root=tmp_path)
    expect_error(capsys, ["predict", str(cut), str(wav_of(trained_run.data))], "cut.pt", "truncated or corrupt")


def test_a_corrupt_checkpoint_is_reported(trained_run, tmp_path, capsys):
    raw = bytearray(trained_run.checkpoint.read_bytes())
    raw[100:4100] = b"\xff" * 4000  # overwritten bytes inside the zip: its directory no longer matches
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    expect_error(capsys, ["evaluate", str(bad)], "bad.pt", root=tmp_path)


def test_a_checkpoint_of_another_architecture_gets_a_clear_message(trained_run, tmp_path, capsys):
    ckpt = load_checkpoint(trained_run.checkpoint)
    other_model = "mean_pool_cnn" if ckpt["config"]["model"] != "mean_pool_cnn" else "attention_cnn"
    ckpt["config"] = {**ckpt["config"], "model": other_model}  # weights of one model, labelled as another
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    expect_error(capsys, ["evaluate", str(other)], "other.pt", "weights do not fit model", "key(s)",
                 root=tmp_path)


def test_every_torch_load_passes_weights_only_true():
    """A static check: a later ``torch.load`` without ``weights_only=True`` would reopen the hole."""
    import ast

    calls = []
    for source in [ROOT / "cli.py", *(ROOT / "ignite_trainer").rglob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load"):
                if ast.unparse(node.func) == "load" and "torch" not in source.read_text():
                    continue
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((source.name, node.lineno, kw.get("weights_only")))
    assert calls and all(w == "True" for _, _, w in calls), calls


def test_setup_cfg_requires_a_torch_without_the_torch_load_flaws():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "torch>=2.10" in cfg["options"]["install_requires"].split()


# ------------------------------------------------------------------------------------------------- no traceback
def _riff_size(wav: Path, size: int) -> Path:
    raw = bytearray(wav.read_bytes())
    raw[4:8] = size.to_bytes(4, "little")
    wav.write_bytes(bytes(raw))
    return wav


def test_a_riff_size_smaller_than_the_data_is_one_line_and_skippable(tmp_path, data, capsys):
    from ignite_trainer.data.bad_input import BadInputPolicy
    from ignite_trainer.data.readers import read_recordings

    wav = _riff_size(wav_of(data), 100)
    expect_error(capsys, train_args(tmp_path, data), wav.name, "RIFF size field says 100 bytes", root=tmp_path)
    policy = BadInputPolicy(skip=True)
    kept = read_recordings(data, "circor2022", policy=policy)
    assert wav.stem not in {r.recording_id for r in kept} and any(wav.name in s for s in policy.skipped)


def test_a_riff_size_of_zero_through_predict(trained_run, tmp_path, capsys):
    wav = _riff_size(Path(shutil.copy(wav_of(trained_run.data), tmp_path / "zero.wav")), 0)
    expect_error(capsys, ["predict", str(trained_run.checkpoint), str(wav)], "zero.wav", "RIFF size field says 0")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_swapped_arguments_say_the_wav_is_not_a_checkpoint(trained_run, capsys, command):
    wav = wav_of(trained_run.data)
    args = ["predict", str(wav), str(trained_run.checkpoint)] if command == "predict" else ["evaluate", str(wav)]
    expect_error(capsys, args, wav.name, "not a checkpoint", "WAV")


@pytest.mark.parametrize("name, content", [("config.yaml", b"epochs: 1\n"), ("table.csv", b"a,b\n1,2\n"),
                                           ("figure.png", b"\x89PNG\r\n\x1a\n" + bytes(40))])
def test_predict_given_a_file_that_is_no_checkpoint(trained_run, tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    line = expect_error(capsys, ["predict", str(path), str(wav_of(trained_run.data))], name, "not a checkpoint")
    assert "run code" not in line


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_config_file_that_is_not_utf8(tmp_path, pristine, capsys, encoding):
    config = tmp_path / "c.yaml"
    config.write_bytes("name: café\n".encode(encoding))
    expect_error(capsys, train_args(tmp_path, pristine, "--config", str(config)), "c.yaml", "not UTF-8",
                 root=tmp_path)


@pytest.mark.parametrize("command", ["cv-splits", "sweep-space"])
def test_a_split_or_space_file_that_is_not_utf8(tmp_path, pristine, capsys, command):
    """(A run whose config.yaml is not UTF-8 is one unreadable row of the runs table: tests/test_runs_table.py.)"""
    if command == "cv-splits":
        bad = tmp_path / "folds.csv"
        bad.write_bytes("patient_id,fold\n1065,0\n# café\n".encode("latin-1"))
        args = ["cv", "--data", str(pristine), "--splits", str(bad), "--output-dir", str(tmp_path / "exps"),
                "--name", "e", "--no-progress"]
    elif command == "sweep-space":
        bad = tmp_path / "space.yaml"
        bad.write_bytes("params: {}  # café\n".encode("utf-16"))
        args = ["sweep", str(bad), "--trials", "1", "--dir", str(tmp_path / "sweep")]
    before = sorted(tmp_path.rglob("*"))
    expect_error(capsys, args, str(bad), "not UTF-8", "as UTF-8")
    assert sorted(tmp_path.rglob("*")) == before, "something was created"


@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--seed", str(2**32)), ("--patients", "0"),
                                         ("--patients", "100000000000000000000")])
def test_synth_refuses_a_count_or_seed_out_of_range_before_creating_anything(tmp_path, capsys, flag, value):
    name = flag[2:]
    expect_error(capsys, ["synth", str(tmp_path / "d"), flag, value, "--no-progress"], f"{name}={value}",
                 "out of range")
    assert not list(tmp_path.iterdir()), "a folder was created"


@pytest.mark.parametrize("uri", ["http://localhost:1", "http://bob:s3cret@localhost:1/"])
def test_an_unreachable_tracking_server_is_refused_before_the_run_directory(tmp_path, pristine, capsys, uri):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra (ignite_trainer[mlflow]); not installed here")
    line = expect_error(capsys, train_args(tmp_path, pristine, "--tracker", "mlflow", "--tracking-uri", uri),
                        "localhost:1", "cannot reach the MLflow tracking server", root=tmp_path)
    assert "s3cret" not in line
    assert not (tmp_path / "runs").exists()


def test_an_fft_size_that_would_allocate_gigabytes(tmp_path, pristine, capsys):
    expect_error(capsys, train_args(tmp_path, pristine, "--set", "n_fft=100000000"), "n_fft=100000000",
                 "out of range", root=tmp_path)


@pytest.mark.parametrize("command", ["export", "synth"])
def test_export_or_synth_into_a_folder_that_cannot_be_written(trained_run, tmp_path, capsys, command):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where a folder should be")  # as root too, unlike a read-only mode
    args = (["export", str(trained_run.checkpoint), str(blocker / "m.safetensors")] if command == "export"
            else ["synth", str(blocker / "d"), "--patients", "2"])
    expect_error(capsys, args, str(blocker), root=tmp_path)


@pytest.mark.parametrize("what", ["name", "data", "predict"])
def test_a_300_character_name_or_path(trained_run, tmp_path, pristine, capsys, what):
    long = "x" * 300
    if what == "name":
        args = train_args(tmp_path, pristine, "--name", long)
    elif what == "data":
        args = train_args(tmp_path, tmp_path / long)
    else:
        args = ["predict", str(trained_run.checkpoint), str(tmp_path / f"{long}.wav")]
    expect_error(capsys, args, "x" * 40, root=tmp_path)


def test_a_distributed_timeout_that_is_not_a_number(tmp_path, pristine, capsys, monkeypatch):
    monkeypatch.setenv("IGNITE_TRAINER_DIST_TIMEOUT", "45s")
    expect_error(capsys, train_args(tmp_path, pristine, "--nproc-per-node", "2"), "IGNITE_TRAINER_DIST_TIMEOUT",
                 "'45s'", root=tmp_path)


def test_a_cache_root_that_is_a_file(tmp_path, pristine, capsys, monkeypatch):
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    monkeypatch.setenv("IGNITE_TRAINER_CACHE", str(cache))
    args = train_args(tmp_path, pristine)
    del args[args.index(f"cache_dir={tmp_path / 'cache'}") - 1:args.index(f"cache_dir={tmp_path / 'cache'}") + 1]
    expect_error(capsys, args, str(cache), "not a folder", root=tmp_path)


def test_evaluate_with_the_wrong_format_flag_names_the_format(trained_run, capsys):
    expect_error(capsys, ["evaluate", str(trained_run.run_dir), "--data", str(trained_run.data), "--format",
                          "physionet2016"], "circor2022", "format=physionet2016")


# ------------------------------------------------------------------------------------------------- run files
def _stop_after_first_epoch(trainer, evaluator):
    trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED(once=1), lambda e: e.terminate())


def _unfinished_run(trained_run, tmp_path) -> Path:
    """A run stopped after epoch 1 of 2 (resumable), on the shared run's data and feature cache."""
    config = tiny_config(trained_run.data, tmp_path, cache_dir=str(trained_run.base / "cache"))
    return Path(train(config, setup=_stop_after_first_epoch)["run_dir"])


def test_resume_with_an_epoch_log_that_is_not_utf8(trained_run, tmp_path, capsys):
    run = _unfinished_run(trained_run, tmp_path)
    (run / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes() + b'{"epoch": 2, "note": "\xe9"}\n')
    expect_error(capsys, ["train", "--resume", str(run)], "metrics.jsonl", "not UTF-8 text (byte 0xe9 at offset",
                 root=tmp_path)


def test_evaluate_a_run_whose_epoch_log_is_not_utf8(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run, ignore=shutil.ignore_patterns("report"))
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe" + (run / "metrics.jsonl").read_text().encode("utf-16-le"))
    expect_error(capsys, ["evaluate", str(run)], "metrics.jsonl", "not UTF-8 text (byte 0xff at offset 0)",
                 root=tmp_path)
    assert not (run / "report").exists()


@pytest.mark.parametrize("damage", ["config not UTF-8", "config not YAML", "log not UTF-8", "log cut short"])
def test_the_runs_table_lists_a_damaged_run_as_one_row(trained_run, tmp_path, capsys, damage):
    for name in ("good", "damaged"):
        shutil.copytree(trained_run.run_dir, tmp_path / name, ignore=shutil.ignore_patterns("report"))
    config, log = tmp_path / "damaged" / "config.yaml", tmp_path / "damaged" / "metrics.jsonl"
    if damage == "config not UTF-8":
        config.write_text(config.read_text(), encoding="utf-16")
    elif damage == "config not YAML":
        config.write_text("model: [attention_cnn\n")
    elif damage == "log not UTF-8":
        log.write_bytes(log.read_text().replace("}", ', "note": "\xe9"}').encode("latin-1"))
    else:
        log.write_text(log.read_text()[:-20])
    assert cli.main(["runs", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "Traceback" not in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:3]}
    assert " finished " in rows["good"]
    expected = {"config not UTF-8": ("unreadable", "config.yaml: not UTF-8 text"),
                "config not YAML": ("unreadable", "config.yaml: line 2 not valid YAML"),
                "log not UTF-8": ("unreadable", "metrics.jsonl: not UTF-8 text"),
                "log cut short": ("finished", "metrics.jsonl: line 2 (the last) is cut short")}[damage]
    assert f" {expected[0]} " in rows["damaged"] and expected[1] in rows["damaged"]
