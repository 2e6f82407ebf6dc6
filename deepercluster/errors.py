"""Errors a user can hit. Each carries a one-line message that says what was wrong and what to do."""


class DeeperClusterError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(DeeperClusterError, ValueError):
    """The configuration (or a stage's parameters) cannot work."""


class StoreError(DeeperClusterError):
    """The run store is missing something a stage needs, or holds something inconsistent."""


class DataError(DeeperClusterError):
    """The input data cannot be used (for example non-finite features in a shard)."""
