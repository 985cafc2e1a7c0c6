"""Experiments: grids of training runs -> the paper's tables and figures (L3).

- :mod:`~dispersive.experiments.grid`: the grid file format and its expansion into runs;
- :mod:`~dispersive.experiments.runner`: resumable execution, ``jobs`` runs at a time;
- :mod:`~dispersive.experiments.results`: per-run records, per-arm statistics, tables;
- :mod:`~dispersive.experiments.plots`, :mod:`~dispersive.experiments.report`: figures and
  ``report.md``.
"""
