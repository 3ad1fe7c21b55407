"""server_bench's answer-length spread: the share of bare generate's row-steps that are useful."""

from __future__ import annotations

import pytest

from bench.server_bench import engine_usage, length_spread, usage_lines


def test_even_answers_leave_generate_nothing_to_waste() -> None:
    spread = length_spread([8, 8, 8, 8], batch=4)
    assert spread == {"min": 8, "median": 8, "max": 8, "bare_busy": 1.0, "bound": 1.0}


def test_one_long_answer_makes_each_batch_run_as_long_as_it() -> None:
    # Two batches of 2: (2, 10) runs 10 steps on 2 rows, (4, 4) runs 4 steps.
    spread = length_spread([2, 10, 4, 4], batch=2)
    assert spread["bare_busy"] == pytest.approx((2 + 10 + 4 + 4) / (2 * 10 + 2 * 4))
    assert spread["bound"] == pytest.approx(1 / spread["bare_busy"])
    assert (spread["min"], spread["median"], spread["max"]) == (2, 4, 10)


def test_a_last_partial_batch_counts_its_own_rows_only() -> None:
    spread = length_spread([5, 5, 1], batch=2)
    assert spread["bare_busy"] == pytest.approx(11 / (2 * 5 + 1 * 1))


def test_engine_usage_splits_the_wall_time_by_phase() -> None:
    before = {"prefill_s": 1.0, "decode_s": 2.0, "steps": 10.0, "step_rows": 100.0}
    after = {"prefill_s": 3.0, "decode_s": 7.0, "steps": 60.0, "step_rows": 1100.0}
    usage = engine_usage(before, after, wall_s=10.0)
    assert usage["prefill_share"] == pytest.approx(0.2)
    assert usage["decode_share"] == pytest.approx(0.5)
    assert usage["idle_share"] == pytest.approx(0.3)
    assert usage["rows_per_step"] == pytest.approx(20.0)
    assert usage["decode_step_ms"] == pytest.approx(100.0)


def test_usage_lines_report_the_split_or_nothing() -> None:
    usage = engine_usage(
        {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0.0, "step_rows": 0.0},
        {"prefill_s": 1.0, "decode_s": 8.0, "steps": 40.0, "step_rows": 1000.0},
        wall_s=10.0,
    )
    text = usage_lines(usage)[0]
    assert "80% of the run decoding" in text and "10% prefilling" in text and "10% idle" in text
    assert "40 decode steps of 25.0 rows" in text and "200 ms each" in text
    assert usage_lines(None) == []
