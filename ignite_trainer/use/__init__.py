"""The use wing: a trained model (or an ensemble of them) put to work on recordings it never trained on.

Owns model files (loading a run directory, checkpoint or safetensors export, and `model_files.rebuild_model`,
the one place a model is rebuilt from a stored config and weights), windows (`windows.run_windows`, every
window through the model), ensembles (`ensemble`: the mean of the members' probabilities), inference
(`inference.predict`), the in-memory `predictor.Predictor`, evaluation (`evaluation.evaluate`), the report's
figures (`report`), the output files (`writers`) and export to safetensors (`export`).

May import core, data, model, scoring, runs and training (and the standard library and third-party
packages); never experiments, which builds on it.

Modules, lowest first (each imports only modules before it): windows, model_files, ensemble, export,
inference, writers, report, predictor, evaluation.
"""
