"""``lofit experiment``: the paper's experiments as declarative grids, run cell by cell,
resumable, and reported (see docs/experiments.md).

- :mod:`.grid`: grid YAML files (shipped: ``*.yaml`` here) expanded into keyed cells;
- :mod:`.runner`: runs the cells through :func:`lofit.runs.pipeline.run_cell` into ``results.jsonl``;
- :mod:`.results`: the append-only results file;
- :mod:`.report`: ``report.md``, ``report.csv`` and the figures, from ``results.jsonl`` alone;
- :mod:`.bootstrap`: the paired bootstrap test of the cross-task experiment.
"""

from lofit.experiments.grid import Cell, Grid, load_grid, shipped_grids
from lofit.experiments.runner import ModelPool, Runner

__all__ = ["Cell", "Grid", "ModelPool", "Runner", "load_grid", "shipped_grids"]
