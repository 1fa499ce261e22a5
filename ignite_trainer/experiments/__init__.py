"""Experiments: many training runs as one study, cross-validation over patient folds and Optuna sweeps.

Owns the experiment layout (`layout`: members, their run directories and status files), cross-validation
(`cv`), its members handed out to several machines (`member_queue`) and its report (`cv_report`), and sweeps: the search space (`space`), one trial (`trials`), the
sampler and pruner (`sampler`), the study's storage (`storage`), workers and the trial budget (`workers`),
the orchestration (`sweeps`) and its report (`sweep_report`).

May import core, data, model, scoring, runs, training and use: an experiment trains with `train`,
predicts with `evaluate` and scores with the scoring wing.
"""
