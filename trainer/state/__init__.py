"""What a run keeps across processes: sharded checkpoints with a commit marker, safe loading, RNG states."""
