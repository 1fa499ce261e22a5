"""The data wing: from files on disk to the batches the engines iterate over.

Owns the readers per on-disk format (`circor`, `physionet2016`, `readers`, `discovery`), strict WAV I/O
(`wav`), the synthetic CirCor-format set (`synthetic`), patient demographics (`demographics`), the record
every reader produces (`records`), log-mel features and their cache (`features`), patient splits (`splits`:
the one owner of a patient's labels, its stratum and the folds), the window datasets (`datasets`), the
loaders (`loaders`) and what a config's data turns into (`prepare`).

May import core, the standard library and third-party packages; never a wing after it (model, scoring,
runs, training, use, experiments).
"""
