"""Benchmarks that print ratios against a baseline measured in the same run.

Every script runs as a module from the repository root, ``.venv/bin/python -m bench.NAME [--help]``, so that it
imports this checkout's packages and the bench's shared modules without touching ``sys.path``:

- :mod:`bench.common`: the repository's paths, command lines, child processes, bundled data and figures;
- :mod:`bench.engines`: the sandwich step as the step benches run it (model, engines, batches, timing);
- :mod:`bench.ablation`: trainer runs in their own processes, their evaluation, and the seeds × variants
  harness of ``kd_ablation`` and ``strategies``.
"""
