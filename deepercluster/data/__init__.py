"""Image sources, the shard stage, torch datasets and transforms."""
