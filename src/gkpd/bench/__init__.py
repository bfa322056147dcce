"""Benchmarks that compare compression methods (``gkpd bench ...``)."""

from gkpd.bench.accuracy import (
    DENSE,
    STUDENT,
    AccuracyConfig,
    cell_name,
    known_methods,
    load_results,
    run_accuracy,
)
from gkpd.bench.report import format_table, pareto_plot, require_matplotlib, write_reports
from gkpd.bench.student import build_student, pick_student_widths

__all__ = [
    "DENSE",
    "STUDENT",
    "AccuracyConfig",
    "build_student",
    "cell_name",
    "format_table",
    "known_methods",
    "load_results",
    "pareto_plot",
    "pick_student_widths",
    "require_matplotlib",
    "run_accuracy",
    "write_reports",
]
