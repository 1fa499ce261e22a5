"""`atomic`: a file or folder is replaced whole or not at all."""

from pathlib import Path

import pytest

from ignite_trainer.core.atomic import atomic_directory, atomic_path, atomic_write


@pytest.mark.parametrize("durable", [True, False])
def test_a_write_replaces_the_file_whole_and_a_failed_one_leaves_it(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_write(target, durable=durable) as f:
        f.write("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_write(target, durable=durable) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_path_writer_gets_a_fresh_hidden_name_each_time(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.name.startswith(".model.safetensors.") and first.suffix == ".partial"
        first.write_bytes(b"a")
        second.write_bytes(b"b")
    assert target.read_bytes() == b"a" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # last to finish wins


def test_a_folder_appears_complete_and_a_lost_race_keeps_the_winner(tmp_path: Path) -> None:
    target = tmp_path / "set"
    with atomic_directory(target) as staging:
        staging.mkdir()
        (staging / "a.txt").write_text("1")
        assert not target.exists()
    with atomic_directory(target) as loser:  # another process finished first: its copy stays
        loser.mkdir()
        (loser / "a.txt").write_text("2")
    assert (target / "a.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["set"]
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "other") as staging:
            staging.mkdir()
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
