"""Shard writers, loaders and multi-resolution rescaling (see the data pipeline issue)."""
