"""Prefect flows: the round loop and one flow per stage (so a single stage can be rerun)."""
