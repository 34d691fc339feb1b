"""Leaderboards from a results store: per dataset x detector x explained attribute (a
*section*), method and metric column the mean with a seeded 95% bootstrap CI and the NaN
counts with their reasons; per section and column the rank of each method (direction-aware)
and paired Wilcoxon signed-rank tests between every pair of methods on the instances they
share, Holm-corrected within the column's family.

An instance is (dataset, detector, image_id, detection, attribute): every method of a detector
explains the same ones, so the tests pair them. Rows of detector-scope metrics (method
``DETECTOR_ROWS``) get means and CIs but no ranks or tests. Seconds per explanation (the
store's ``seconds``, one per instance and method) form one more column, ``seconds`` (lower is
better).

``build_leaderboard`` computes the tables (``board``), ``write_leaderboard`` writes every file
(``report``: Markdown, CSV, LaTeX, plots, suite.yaml, index.html) and ``print_leaderboard``
renders them on a console at 80 columns (``tables``); the statistics are in ``stats``.
"""

from xaibench.leaderboard.board import Leaderboard, build_leaderboard
from xaibench.leaderboard.report import write_leaderboard
from xaibench.leaderboard.tables import print_leaderboard

__all__ = ["Leaderboard", "build_leaderboard", "print_leaderboard", "write_leaderboard"]
