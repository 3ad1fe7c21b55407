"""bench/weights_quality's report: every low-precision setting beside float32."""

from __future__ import annotations

from pathlib import Path

from bench import weights_quality as wq


def test_report_puts_each_setting_beside_float32() -> None:
    speed = {"float32": {"1": 30.0}, "int8": {"1": 20.0}, "bfloat16": {"1": 24.0}}
    r = {
        "command": "python -m bench.weights_quality",
        "date": "2026-12-04",
        "machine": {"cpu": "x"},
        "cpu_matrix_flags": ["amx_bf16"],
        "step_ms_by_rows": speed,
        "speedup_by_rows": {"int8": {"1": 1.5}, "bfloat16": {"1": 1.25}},
        "requests": 2,
        "greedy_same_output_pct": {"int8": 50.0, "bfloat16": 100.0},
        "tokens_before_first_difference_pct": {"int8": 75.0, "bfloat16": 100.0},
        "exact_match_pct": {"float32": 50.0, "int8": 0.0, "bfloat16": 50.0},
        "per_task": {
            "city": {
                "n": 2, "float32": 50.0, "int8": 0.0, "bfloat16": 50.0,
                "same_int8": 50.0, "same_bfloat16": 100.0,
            }
        },
    }  # fmt: skip
    text = wq.report(r)
    assert "| 1 | 30.0 | 20.0 | 1.5 | 24.0 | 1.25 |" in text
    assert "| city | 2 | 50.0% | 0.0% | 50.0% | 50.0% | 100.0% |" in text
    assert "int8 75.0%, bfloat16 100.0%" in text and "amx_bf16" in text
    # every setting but float32
    assert set(wq.OTHERS) == {"int8", "int4", "bfloat16", "float32-packed"}


def test_cpu_matrix_flags_reads_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    assert wq.cpu_matrix_flags(info) == ["amx_bf16", "avx512f", "avx2"]  # the wanted order
    info.write_text("processor\t: 0\n")
    assert wq.cpu_matrix_flags(info) == []
    assert wq.cpu_matrix_flags(tmp_path / "missing") == []
