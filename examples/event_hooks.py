"""Hook research code into the trainer's custom events, without touching the standard training run.

``train(config, setup=hooks)`` builds the usual run (the same as ``cli.py train``) and calls
``hooks(trainer, evaluator)`` just before training starts. The hooks here:

- ``VALIDATION_COMPLETED``: list the validation recordings the model gets wrong at this epoch's tuned
  thresholds (from ``state.validation_output`` and ``state.thresholds``), worst first;
- ``BEST_MODEL_SAVED``: load the new best checkpoint (``state.best_model_path``) and write its attention
  over a few validation windows to TensorBoard as an image (tag ``attention/best_model``);
- ``EARLY_STOPPED``: note the epoch (``state.early_stopped_epoch``).

Every event seen is also appended to ``<run>/hooks.jsonl`` with the state it carried.

Run::

    python examples/event_hooks.py --patients 40 --epochs 8 --out runs --name hooks
    make tensorboard        # or: pip install -e '.[tensorboard]' && tensorboard --logdir runs/hooks/tb
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import TensorboardLogger

from ignite_trainer import (
    LABELS,
    MACRO_F1,
    PREDICTIONS,
    VAL_LOSS,
    TrainConfig,
    TrainerEvents,
    load_trained_model,
    recording_predictions,
    train,
    write_synthetic,
)


class ResearchHooks:
    """The research code: three handlers on `TrainerEvents` and the files they write.

    A class (not closures) so that an instance can be sent to spawned workers with ``nproc_per_node > 1``;
    rank 0 is the only one that should write, hence the ``idist`` check in `__call__`.
    """

    def __init__(self, run_dir: Path, n_windows: int = 8, show: int = 5) -> None:
        self.run_dir = Path(run_dir)
        self.n_windows = n_windows
        self.show = show
        self.tb: TensorboardLogger | None = None

    def __call__(self, trainer: Engine, evaluator: Engine) -> None:
        import ignite.distributed as idist

        if idist.get_rank() != 0:
            return
        self.tb = TensorboardLogger(log_dir=str(self.run_dir / "tb" / "hooks"))  # Ignite's, over tensorboardX
        trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, self.list_misclassified)
        trainer.add_event_handler(TrainerEvents.BEST_MODEL_SAVED, self.attention_maps)
        trainer.add_event_handler(TrainerEvents.EARLY_STOPPED, self.early_stopped)
        trainer.add_event_handler(Events.COMPLETED, lambda _: self.tb.close())  # also after an early stop

    # ------------------------------------------------------------------ handlers
    def list_misclassified(self, engine: Engine) -> None:
        output = engine.state.validation_output  # the evaluator's state after this validation
        dataset = output.dataloader.dataset  # the validation EvalWindows
        recs = recording_predictions(output.metrics[PREDICTIONS], dataset.window_recording, dataset.recordings)
        thresholds = engine.state.thresholds
        wrong = []
        for i, rec_id in enumerate(recs.ids):
            for j, label in enumerate(LABELS):
                if not recs.mask[i, j]:
                    continue
                predicted = recs.probs[i, j] >= thresholds[label]
                if predicted != (recs.targets[i, j] > 0.5):
                    margin = abs(float(recs.probs[i, j]) - thresholds[label])
                    wrong.append({"recording": rec_id, "label": label, "prob": round(float(recs.probs[i, j]), 4),
                                  "target": int(recs.targets[i, j]), "margin": round(margin, 4)})
        wrong.sort(key=lambda w: -w["margin"])
        m = engine.state.validation_metrics
        self.log("validation_completed", engine, misclassified=wrong, **{MACRO_F1: m[MACRO_F1], VAL_LOSS: m[VAL_LOSS]})
        names = ", ".join(f"{w['recording']}:{w['label']}" for w in wrong[: self.show])
        print(f"epoch {engine.state.epoch}: {len(wrong)} misclassified of {len(recs)} recordings; worst: {names}")

    def attention_maps(self, engine: Engine) -> None:
        path = engine.state.best_model_path
        trained = load_trained_model(path)  # the best weights, as evaluate/predict would load them
        dataset = engine.state.validation_output.dataloader.dataset
        picks = torch.linspace(0, len(dataset) - 1, steps=min(self.n_windows, len(dataset))).round().long()
        x = torch.stack([dataset[int(i)][0] for i in picks])
        with torch.no_grad():
            _, attention = trained.model(x)  # [K, T']
        image = attention / attention.amax(dim=1, keepdim=True).clamp_min(1e-12)  # each row scaled to [0, 1]
        self.tb.writer.add_image("attention/best_model", image.unsqueeze(0), engine.state.epoch, dataformats="CHW")
        self.tb.writer.flush()
        self.log("best_model_saved", engine, best_model_path=str(path), best_score=engine.state.best_score,
                 attention_shape=list(attention.shape))

    def early_stopped(self, engine: Engine) -> None:
        self.log("early_stopped", engine, early_stopped_epoch=engine.state.early_stopped_epoch)
        print(f"early stopping after epoch {engine.state.early_stopped_epoch}")

    def log(self, event: str, engine: Engine, **fields: object) -> None:
        with open(self.run_dir / "hooks.jsonl", "a") as f:
            f.write(json.dumps({"event": event, "epoch": engine.state.epoch, **fields}) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CirCor 2022 folder; default: write --patients synthetic patients under --out")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=3, help="early-stopping patience (epochs)")
    p.add_argument("--monitor", default=MACRO_F1, help=f"{VAL_LOSS}, {MACRO_F1}, heart.f1, murmur.f1, ...")
    p.add_argument("--out", default="runs", help="parent folder of the run directory")
    p.add_argument("--name", default="event_hooks", help="run directory name (replaced if it exists)")
    p.add_argument("--cache-dir", help="feature cache (default: the standard one)")
    p.add_argument("--tiny", action="store_true", help="8 mel bands at 1 kHz: seconds per epoch, for smoke tests")
    args = p.parse_args(argv)

    out = Path(args.out)
    if args.data:
        data = Path(args.data)
    else:  # synthetic patients, written on the first run and reused after
        data = out / f"{args.name}_data_p{args.patients}"
        if not data.is_dir():
            write_synthetic(data, args.patients, seed=1)
    tiny = dict(n_mels=8, sample_rate=1000, hop_ms=20.0, n_fft=64) if args.tiny else {}
    config = TrainConfig(data=str(data), epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                         early_stopping_patience=args.patience, monitor=args.monitor, output_dir=str(out),
                         name=args.name, cache_dir=args.cache_dir, device="cpu", progress=False, val_fraction=0.3,
                         **tiny)
    hooks = ResearchHooks(out / args.name)
    summary = train(config, overwrite=True, setup=hooks)
    print(f"run directory: {summary['run_dir']}; hook log: {hooks.run_dir / 'hooks.jsonl'}")
    return summary


if __name__ == "__main__":
    main()
