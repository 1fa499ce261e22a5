"""The training wing: a run from a config to its checkpoints, on Ignite's engines.

Owns the trainer and evaluator engines (`engine`), the custom events research code hooks into (`events`),
the loss (`losses`), the evaluator's metrics (`metrics`), training-time augmentation (`augment`), the single
handlers (`handlers`), what validation decides each epoch (`decisions`), the standard handler set in its one
order (`standard`), graceful stop (`graceful`), the console lines (`console`), TensorBoard and MLflow
(`tensorboard`, `epoch_scalars`, `tracking`), the run itself (`run`: `train`), starting ranks (`launch`), the
device, backend and seeds (`runtime`) and every check before a run writes anything (`preflight`).

May import core, data, model, scoring and runs, the standard library and third-party packages; never a wing
after it (use, experiments). The wing is named ``training`` and not ``train`` so that the package's public
``train`` function is never replaced by a subpackage of the same name.
"""
