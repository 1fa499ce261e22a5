"""The model wing: what turns a batch of log-mel windows into per-label logits.

Owns the model registry (`registry`: the one way a model is built from its name, with the front-end a
published model declares), the shared building blocks (`blocks`), the built-in models (`cnn`, `resnet`, and
`cnn14`: PANNs CNN14, for its published pretrained weights), the one rule of what a model's trunk and head
are (`trunk`: what ``--init-from`` loads and ``--freeze-trunk`` freezes), late fusion of patient demographics
(`fusion`), and the optional fused CPU kernel (`fused_block`, `cpu_kernels`).

May import core and data (the demographics encoding), the standard library and third-party packages; never
a wing after it (scoring, runs, training, use, experiments).

Importing the wing registers the built-in models, so ``build_model("attention_cnn", ...)`` works wherever the
registry is imported from.
"""

from ignite_trainer.model import cnn, cnn14, resnet  # noqa: F401  (each registers its models by name)
