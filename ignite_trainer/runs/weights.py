"""A weights file named by the user (``--init-from``): found, read safely and fingerprinted.

Owns:

- `read_safetensors`: the one reader of a safetensors file (``use.model_files`` reads exports through it);
- `resolve_weights_file`: a run directory (a training or pretraining run: its best checkpoint, else its
  newest last checkpoint), a ``.pt``/``.pth`` checkpoint or a ``.safetensors`` export -> the one file read;
- `read_weights`: that file's model state dict and stored config. A ``.pt``/``.pth`` is read by
  `checkpoint.load_checkpoint` (``weights_only=True``: a pickle that would run code is refused); its state
  dict is ``model_state_dict`` (our checkpoints) or ``model`` (the published PANNs checkpoints, which hold
  no config); a file holding neither is not a model;
- `weights_digest`: the blake2b digest of the file's bytes, part of a run's identity (`record.run_identity`),
  so that a resume whose init file changed is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import safetensors
import torch
import yaml

from ignite_trainer.core.errors import CheckpointError
from ignite_trainer.runs.checkpoint import CHECKPOINTS_DIR, best_checkpoint_file, last_checkpoint_files, load_checkpoint

__all__ = ["InitWeights", "read_safetensors", "resolve_weights_file", "read_weights", "weights_digest"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class InitWeights:
    """What a weights file gives a fine-tuning run: ``state`` (a model state dict), ``config`` (the mapping
    stored with it, None for a published checkpoint) and ``path`` (the file read)."""

    path: Path
    state: dict[str, torch.Tensor]
    config: Mapping[str, Any] | None


def read_safetensors(path: str | Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file (``tensors=False``: the metadata only, no tensor read);
    an unreadable file is a one-line `CheckpointError`.

    Example::

        metadata, _ = read_safetensors("cv-a.safetensors", tensors=False)
    """
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return metadata, state


def resolve_weights_file(path: str | Path) -> Path:
    """The file ``--init-from PATH`` reads: a run directory's best checkpoint, else its newest last
    checkpoint; a file as it is. A missing path, or a folder without checkpoints, is a `CheckpointError`.

    Example::

        resolve_weights_file("runs/pretrain")   # runs/pretrain/checkpoints/best_checkpoint_9_...pt
    """
    path = Path(path).expanduser()
    if path.is_dir():
        ckpt_dir = path / CHECKPOINTS_DIR
        best = best_checkpoint_file(ckpt_dir)
        if best is not None:
            return best[2]
        last = last_checkpoint_files(ckpt_dir)
        if last:
            return last[0]
        raise CheckpointError(f"{path}: a folder without checkpoints ({ckpt_dir} holds no best_checkpoint_*.pt or "
                              "last_checkpoint_*.pt); init_from takes a run directory, a .pt or a .safetensors file")
    if not path.exists():
        raise CheckpointError(f"{path}: init_from: no such run directory or weights file")
    return path


def read_weights(path: str | Path) -> InitWeights:
    """The model state dict and stored config of the weights file at ``path`` (`resolve_weights_file`).

    Example::

        weights = read_weights("runs/quick")
        weights.state["trunk.blocks.0.weight"].shape, weights.config["n_mels"]
    """
    file = resolve_weights_file(path)
    if file.suffix == ".safetensors":
        metadata, state = read_safetensors(file)
        config = None
        if "config" in metadata:
            try:
                config = yaml.safe_load(metadata["config"])
            except yaml.YAMLError as e:
                raise CheckpointError(f"{file}: damaged config metadata ({type(e).__name__})") from None
        if not state:
            raise CheckpointError(f"{file}: holds no tensors; not a model's weights")
    else:
        ckpt = load_checkpoint(file)
        state = ckpt.get("model_state_dict", ckpt.get("model"))
        config = ckpt.get("config")
        if not isinstance(state, Mapping) or not state:
            keys = ", ".join(sorted(map(str, ckpt))[:5]) or "nothing"
            raise CheckpointError(f"{file}: not a model file: it holds no model_state_dict (nor a published "
                                  f"'model' state dict), only {keys}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: not a model state dict ({bad[0]!r} is not a tensor)")
    if config is not None and not isinstance(config, Mapping):
        raise CheckpointError(f"{file}: its stored config is a {type(config).__name__}, not a mapping of fields")
    return InitWeights(file, dict(state), config)


def weights_digest(path: str | Path) -> str:
    """The blake2b digest of the bytes of the file ``--init-from PATH`` reads (`resolve_weights_file`).

    Example::

        weights_digest("cnn14.pth")   # '5c1f...'
    """
    file = resolve_weights_file(path)
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read the init weights ({e.strerror or e})") from None
    return h.hexdigest()
