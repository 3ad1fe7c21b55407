"""bench.window_steps' report: each mark's compiled and eager step times and their ratio."""

from __future__ import annotations

from bench import window_steps


def test_report_lists_each_row_count_and_window_with_the_eager_over_compiled_ratio() -> None:
    r = {
        "command": "python -m bench.window_steps",
        "date": "2026-12-05",
        "machine": {"cpu": "x"},
        "note": "alone",
        "weights": "bfloat16",
        "threads": 2,
        "compile_s": 120.0,
        "misses": 0,
        "ms_per_step": {
            "1": {"100": {"compiled": 12.0, "eager": 24.0}},
            "8": {
                "100": {"compiled": 26.0, "eager": 28.6},
                "1060": {"compiled": 50.0, "eager": 52.5},
            },
        },
    }
    text = window_steps.report(r)
    assert "| 1 | 100 | 12.0 | 24.0 | 2.00 |" in text
    assert "| 8 | 100 | 26.0 | 28.6 | 1.10 |" in text
    assert "| 8 | 1060 | 50.0 | 52.5 | 1.05 |" in text
    assert "Weights `bfloat16`" in text and "(run eagerly): 0. alone." in text
