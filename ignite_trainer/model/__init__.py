"""The model wing: what turns a batch of log-mel windows into per-label logits.

Owns the model registry (`registry`: the one way a model is built from its name), the shared building
blocks (`blocks`), the built-in models (`cnn`, `resnet`), late fusion of patient demographics (`fusion`), and
the optional fused CPU kernel (`fused_block`, `cpu_kernels`).

May import core and data (the demographics encoding), the standard library and third-party packages; never
a wing after it (scoring, runs, training, use, experiments).

Importing the wing registers the built-in models, so ``build_model("attention_cnn", ...)`` works wherever the
registry is imported from.
"""

from ignite_trainer.model import cnn, resnet  # noqa: F401  (each registers its models by name)
