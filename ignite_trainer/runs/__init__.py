"""The runs wing: a run directory on disk, the only reader and writer of its files.

Owns the run directory's layout and file names, opening a run (new, overwrite, resume), the metrics log and
the best epoch (`rundir`), checkpoint files, their names and safe loading (`checkpoint`), what a run records
about itself: identity, split, environment (`record`), the lock of a run that is training now (`lock`),
where a run's messages go (`logs`) and the table that compares runs (`table`).

May import core, data, model and scoring, the standard library and third-party packages; never a wing after
it (training, use, experiments).
"""
