"""The core wing: the words, errors, file writes and settings every other wing shares.

Owns the vocabulary (`vocabulary`: label order, score names and the one rule for which direction of a score
is better, Challenge classes and their weights), the user-error types and their exit codes (`errors`),
all-or-nothing file writes (`atomic`), and every setting of a run with its default written once
(`config`: `TrainConfig`; `augmentation`: the augmentation settings and their defaults).

May import nothing but the standard library and third-party packages (no torch: a config can be read and
checked without it); it is the bottom of the wings core, data, model, scoring, runs, training, use,
experiments, and nothing in it imports a wing above.
"""
