"""Register a model of your own and train it through the normal command line, ``cli.py train --model``.

The model registry lives in the process, so the script registers its model and then calls ``cli.main``
in the same process; ``python cli.py train --model gru_attention`` on its own would not know the name.
Every option after the script's own is passed to ``cli.py train`` unchanged; ``--model gru_attention``
is added unless given. ``evaluate``, ``predict`` and ``export`` rebuild the model by the name stored in
the checkpoint, so they too need the registration: run them through this script with ``--command``.

Run::

    python examples/custom_model.py --patients 40 -- --epochs 5 --output-dir runs --name gru
    python examples/custom_model.py --command evaluate -- runs/gru
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from ignite_trainer import register_model, write_synthetic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # cli.py lives at the repository root, beside the package

MODEL_NAME = "gru_attention"


@register_model(MODEL_NAME)
class GRUAttention(nn.Module):
    """A bidirectional GRU over log-mel frames with attention pooling: sequence context instead of convolutions.

    Follows the registry's contract: built as ``GRUAttention(n_mels=..., **options)``, called on
    ``x [B, n_mels, T]``, returns ``(logits [B, 2], attention [B, T])`` with attention summing to 1 over time.
    """

    def __init__(self, n_mels: int, hidden: int = 32, n_labels: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(n_mels)
        self.gru = nn.GRU(n_mels, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(2 * hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, n_labels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.gru(self.norm(x.transpose(1, 2)))  # [B, T, 2H]
        attention = torch.softmax(self.score(h).squeeze(-1), dim=1)  # [B, T]
        pooled = torch.bmm(attention.unsqueeze(1), h).squeeze(1)
        return self.head(self.dropout(pooled)), attention


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s [--patients N] [--data-out DIR] [--command train] -- [cli.py options]")
    p.add_argument("--patients", type=int, default=40,
                   help="write this many synthetic patients to --data-out and train on them (unless --data is passed on)")
    p.add_argument("--data-out", default="runs/custom_model_data", help="where the synthetic patients go")
    p.add_argument("--command", default="train", choices=["train", "evaluate", "predict", "export"])
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(ours)

    from cli import main as cli_main

    if args.command != "train":
        return cli_main([args.command, *rest])
    if "--data" not in rest and not any(a.startswith("--data=") for a in rest):
        data = Path(args.data_out) / f"synthetic_p{args.patients}"  # written on the first run, reused after
        if not data.is_dir():
            write_synthetic(data, args.patients, seed=1)
        rest = ["--data", str(data), *rest]
    if "--model" not in rest:
        rest = ["--model", MODEL_NAME, *rest]
    return cli_main(["train", *rest])


if __name__ == "__main__":
    sys.exit(main())
