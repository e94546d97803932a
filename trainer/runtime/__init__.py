"""The run's machinery, no strategy: ranks and their agreement, the engine, the data of a run, timing, requeue."""
