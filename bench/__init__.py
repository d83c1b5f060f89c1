"""Benchmarks: the project measured beside a floor on the same machine in the same run.

Each benchmark (``bench.rollout``, ``bench.scale``, ``bench.storm``) prints the project's
figure, the floor's and their ratio, and appends a dated section to ``bench/RESULTS.md``. They
are never timed tests; ``tests/bench`` only runs them at tiny sizes so they cannot rot.
"""
