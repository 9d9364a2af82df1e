"""Analysis: probes of attention and labels, the label-fidelity benchmark, the overhead benchmark.

Layer: imports ``tokenmix.methods``, ``tokenmix.models``, ``tokenmix.data`` and ``tokenmix.train``;
imported by ``tokenmix.report`` and the CLI.
"""
