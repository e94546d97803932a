"""Evolutionary search of a trained supernet under FLOPs constraints (AlphaNet §4.2).

Entry point: ``python search/run.py`` or ``python -m search``.  Modules: ``config`` (the ``search:``
section), ``evolution`` (selection, mutation/crossover under the FLOPs range, Pareto rules),
``candidates`` (scores on disk, resumable), ``pareto`` (front JSON + plot), ``export`` (chosen
sub-networks to safetensors + YAML + ONNX), ``run`` (load → calibrate → evolve → report → export).
"""
