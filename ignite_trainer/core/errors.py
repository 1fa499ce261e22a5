"""Errors caused by what the user gave us (a file, a value, a checkpoint).

The CLI prints each as one line and exits with code 2; anything else is a bug and keeps its traceback.
Messages name the thing (file, field or value) and say what is wrong with it.
"""


class UserError(Exception):
    """Base class: a problem with the user's input, reported as one line, exit code 2.

    Example::

        try:
            train(TrainConfig(data="/no/such/folder"))
        except UserError as e:  # what cli.py does
            print(f"error: {e}")
            sys.exit(2)
    """


class ConfigError(UserError):
    """A configuration key, type or value is not acceptable.

    Example::

        TrainConfig(epochs=0).validate()  # config: epochs=0 is out of range (must be >= 1)
    """


class DataError(UserError):
    """A data file or folder cannot be used (missing, unreadable, malformed, mislabelled).

    Example::

        read_recordings("/no/such/folder", "circor2022")  # names the folder and the problem
    """


class CheckpointError(UserError):
    """A checkpoint or run directory cannot be loaded, resumed or written.

    Example::

        load_checkpoint("evil.pt")  # evil.pt: refused: ... it was not loaded
    """


class TrainingAborted(UserError):
    """Training stopped on a fault it must not continue past (a non-finite loss or gradient).

    Example::

        trainer.run(loader)  # non-finite loss (nan) at epoch 3, iteration 57; ...
    """


class DistributedFailure(TrainingAborted):
    """A rank crashed or was killed, or a rank lost its peer on another node: the whole run stopped (exit
    code 3, like any aborted training).

    Example::

        train(TrainConfig(nproc_per_node=2))  # rank 1 failed (...); the whole run stopped; ...
    """
