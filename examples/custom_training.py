"""Compose a training engine by hand from ignite_trainer's public pieces, with a handler of our own.

The engines, data and loaders are built here; the standard handlers (validation, thresholds, early
stopping, checkpoints, LR schedule, logs) are attached by `attach_standard_handlers`, the same call the
CLI's training makes, so they run in the right order. Our handler is an exponential moving average (EMA)
of the weights: updated after every optimiser step, evaluated on the validation set after every
validation of the raw weights, and saved in both checkpoints under its own key. It shows the three things
a custom script usually needs: a handler on an Ignite event, a second evaluator fed by the same loader, and
an object with ``state_dict()`` that goes into checkpoints next to the standard ones. Everything comes from
``ignite_trainer``'s top-level names, metric names included.

Run::

    python examples/custom_training.py --patients 40 --epochs 5 --out runs/custom
    python examples/custom_training.py --data /path/to/circor --epochs 50 --out runs/custom_circor

Writes to ``--out`` a standard run directory (``checkpoints/`` with an ``ema`` key in every checkpoint,
``metrics.jsonl``, ``tb/``) and ``ema_metrics.jsonl`` (one line per epoch: raw and EMA validation scores).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from ignite_trainer import (
    MACRO_F1,
    PER_LABEL,
    PREDICTIONS,
    VAL_LOSS,
    EvalWindows,
    FeatureCache,
    FeatureSettings,
    MaskedLoss,
    PerLabelMetrics,
    PredictionCollector,
    TrainConfig,
    TrainerEvents,
    TrainWindows,
    WeightedBCELoss,
    attach_standard_handlers,
    build_model,
    create_evaluator,
    create_trainer,
    make_eval_loader,
    make_train_loader,
    read_recordings,
    split_patients,
    write_synthetic,
)


class WeightEMA:
    """A copy of ``model`` whose weights follow the trained ones as an exponential moving average.

    Averaged weights often validate better and more smoothly than the last step's on small, noisy data
    sets like PCG recordings. Float tensors (weights and BatchNorm statistics) are averaged; integer
    buffers (``num_batches_tracked``) are copied. ``state_dict()`` makes it checkpointable by Ignite.
    A step the trainer skipped (a non-finite loss or gradient) left the weights as they were, so averaging
    them once more is harmless, and the trainer's NaN guard stops the run at once anyway.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9) -> None:
        self.source = model
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, engine: Engine) -> None:
        for ema, live in zip(self.model.state_dict().values(), self.source.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.lerp_(live, 1.0 - self.decay)
            else:
                ema.copy_(live)
        self.updates += 1

    def attach(self, trainer: Engine) -> "WeightEMA":
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        return self

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates, self.decay = int(state["updates"]), float(state["decay"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CirCor 2022 folder; default: write --patients synthetic patients under --out")
    p.add_argument("--patients", type=int, default=40, help="synthetic patients when --data is not given")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ema-decay", type=float, default=0.9)
    p.add_argument("--out", default="runs/custom_training", help="output folder")
    p.add_argument("--cache-dir", help="feature cache (default: <out>/cache)")
    p.add_argument("--tiny", action="store_true", help="8 mel bands at 1 kHz: seconds per epoch, for smoke tests")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    logging.getLogger("ignite.distributed.auto.auto_dataloader").setLevel(logging.WARNING)  # one INFO per loader
    tiny = dict(n_mels=8, sample_rate=1000, hop_ms=20.0, n_fft=64) if args.tiny else {}
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device="cpu", monitor=MACRO_F1,
                         progress=False, **tiny)
    torch.manual_seed(config.seed)

    # data: folder -> recordings -> cached features -> patient split -> window datasets -> loaders
    if args.data:
        data = Path(args.data)
    else:  # synthetic patients, written on the first run and reused after
        data = out / f"synthetic_p{args.patients}"
        if not data.is_dir():
            write_synthetic(data, args.patients, seed=1)
    recordings = read_recordings(data, "circor2022")
    cache = FeatureCache(Path(args.cache_dir or out / "cache"), FeatureSettings.from_config(config))
    recordings = cache.prepare(recordings)
    train_recs, val_recs = split_patients(recordings, val_fraction=0.3, seed=config.seed)
    device = torch.device("cpu")
    train_loader = make_train_loader(TrainWindows(train_recs, cache, config.window_seconds), config.batch_size, 0, device)
    val_dataset = EvalWindows(val_recs, cache, config.window_seconds)
    val_loader = make_eval_loader(val_dataset, config.batch_size, 0, device)

    # engines
    model = build_model(config.model, n_mels=config.n_mels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = WeightedBCELoss(*config.pos_weight)
    trainer = create_trainer(model, optimizer, loss_fn, device, gradient_clip=config.gradient_clip)
    # metric names from the package: the standard handlers read PREDICTIONS (threshold tuning) and the monitored
    # score (VAL_LOSS, MACRO_F1, ...); PerLabelMetrics's scores are flattened, so PER_LABEL is never read back
    evaluator = create_evaluator(model, {VAL_LOSS: MaskedLoss(loss_fn), PER_LABEL: PerLabelMetrics(),
                                         PREDICTIONS: PredictionCollector()}, device)

    # our handler, and a second evaluator that scores its weights on the same loader
    ema = WeightEMA(model, decay=args.ema_decay).attach(trainer)
    ema_evaluator = create_evaluator(ema.model, {VAL_LOSS: MaskedLoss(loss_fn), PER_LABEL: PerLabelMetrics()}, device)

    # the standard handlers, in their order, with the EMA in every checkpoint
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    handlers = attach_standard_handlers(trainer, evaluator, model=model, optimizer=optimizer,
                                        train_loader=train_loader, val_loader=val_loader, val_dataset=val_dataset,
                                        config=config, run_dir=out, extra_to_save={"ema": ema})

    ema_log = out / "ema_metrics.jsonl"
    ema_log.unlink(missing_ok=True)

    @trainer.on(TrainerEvents.VALIDATION_COMPLETED)
    def validate_ema(engine: Engine) -> None:
        raw = engine.state.validation_metrics
        averaged = ema_evaluator.run(val_loader).metrics
        row = {"epoch": engine.state.epoch, "ema_updates": ema.updates}
        for name in (VAL_LOSS, MACRO_F1):
            row[name], row[f"ema_{name}"] = raw[name], float(averaged[name])
        with open(ema_log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"epoch {row['epoch']}: " + "  ".join(f"{name} {row[name]:.4f} (EMA {row[f'ema_{name}']:.4f})"
                                                    for name in (VAL_LOSS, MACRO_F1)))

    try:
        trainer.run(train_loader, max_epochs=config.epochs)
    finally:
        handlers.close()
    return {"out": out, "ema_updates": ema.updates}


if __name__ == "__main__":
    main()
