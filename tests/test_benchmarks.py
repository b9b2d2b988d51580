"""The step-time benchmark runs on the embedded default and reports a ratio from its own timings."""

import pytest

from benchmarks import step_time


def test_step_time_benchmark_reports_the_ratio_of_its_medians():
    result = step_time.main(["--steps", "4", "--warmup", "1", "--batch", "4"])
    assert result["steps"] == 4 and result["pairs_per_step"] == 4
    assert result["bt_step_ms"] > 0 and result["aplot_step_ms"] > 0 and result["ot_solve_ms"] > 0
    low, high = result["aplot_over_bt_iqr"]
    assert low <= result["aplot_over_bt"] <= high
    assert result["ot_solve_share_of_aplot_step"] == pytest.approx(
        result["ot_solve_ms"] / result["aplot_step_ms"])
