"""Custom events the trainer fires, so research code can hook in without editing the engine.

Registered on the trainer by `create_trainer` through Ignite's ``register_events``; attach a handler
with ``trainer.add_event_handler(TrainerEvents.VALIDATION_COMPLETED, fn)`` or ``@trainer.on(...)``.
What each event leaves in ``trainer.state`` for its handlers:

- ``VALIDATION_COMPLETED``: ``state.validation_metrics`` (flat dict of scores: ``val_loss``, ``macro_f1``,
  ``heart.f1``, ...), ``state.validation_output`` (the evaluator's ``state``, for predictions or ids) and,
  once threshold tuning has run on this event, ``state.thresholds`` (``{"heart": t, "murmur": t}``).
- ``BEST_MODEL_SAVED``: ``state.best_model_path`` (a `Path`) and ``state.best_score``.
- ``EARLY_STOPPED``: ``state.early_stopped_epoch``; training ends after this epoch.

Example::

    from ignite_trainer import TrainerEvents

    @trainer.on(TrainerEvents.BEST_MODEL_SAVED)
    def announce(engine):
        print(f"new best {engine.state.best_score:.3f} at {engine.state.best_model_path}")
"""

from ignite.engine import EventEnum


class TrainerEvents(EventEnum):
    """The trainer's own events (see the module docstring for the state each one leaves in ``engine.state``).

    They are counted by epoch, so Ignite's filters apply: ``VALIDATION_COMPLETED(every=5)`` runs on epochs
    5, 10, ...; ``BEST_MODEL_SAVED(once=3)`` only if a best model is saved at epoch 3.

    Example::

        @trainer.on(TrainerEvents.VALIDATION_COMPLETED(every=5))
        def report(engine):
            print(engine.state.epoch, engine.state.validation_metrics["murmur.f1"])
    """

    VALIDATION_COMPLETED = "validation_completed"
    BEST_MODEL_SAVED = "best_model_saved"
    EARLY_STOPPED = "early_stopped"
