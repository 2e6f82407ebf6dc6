"""The training stage's error."""

from deepercluster.errors import DeeperClusterError

ERROR_PREFIX = "deepercluster train error"  # how a worker reports a TrainError (and the like) on stderr


class TrainError(DeeperClusterError):
    """Training failed or cannot start (bad inputs, non-finite loss, a crashed rank)."""
