"""Training: run configs, the training loop, run records, sweeps, and the TokenMix teacher's cache build.

Layer: imports ``tokenmix.models``, ``tokenmix.data`` and ``tokenmix.methods``; imported by
``tokenmix.analysis``, ``tokenmix.report`` and the CLI.
"""
