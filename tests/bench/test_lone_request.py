"""bench.lone_request's report: each compiled server's figure against its eager one."""

from __future__ import annotations

from bench import lone_request


def test_report_sets_each_compiled_run_against_its_eager_run() -> None:
    r = {
        "command": "python -m bench.lone_request",
        "date": "2026-12-05",
        "machine": {"cpu": "x"},
        "tokens": 96,
        "rounds": 2,
        "runs": {
            "int8": {"forward": "fused-int8", "ready_s": [9.0, 8.0], "tok_s_median": 64.0},
            "int8+compiled": {
                "forward": "fused-int8+compiled",
                "ready_s": [67.1, 65.1],
                "tok_s_median": 112.0,
            },
        },
    }
    r["runs"]["int8+torch-kernels"] = {
        "forward": "fused-int8",
        "kernels": "torch",
        "ready_s": [7.0],
        "tok_s_median": 48.0,
    }
    text = lone_request.report(r)
    assert "| int8 | fused-int8 | - | 64.0 | 9.0/8.0 | - |" in text
    assert "| int8+compiled | fused-int8+compiled | - | 112.0 | 67.1/65.1 | 1.75 |" in text
    assert "| int8+torch-kernels | fused-int8 | torch | 48.0 | 7.0 | 0.75 |" in text
    assert "96 tokens" in text and "over 2 servers" in text
