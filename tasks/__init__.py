"""Prefect tasks: thin wrappers over the library's stage functions. They take a run URI and small values
(round, shard, super-cluster ids) and return small values (counts, ids); never tensors or models."""
