"""The benchmark guard's judgement (benchmarks/guard.py and the Guard of benchmarks/conftest.py) on CPU:
verdicts from ratios, the stored baseline's round trip, a regression failing its case, recording when
the GPU kind has no baseline, and the closing table. The GPU cases themselves run in `pytest benchmarks/`."""
import json

import pytest

from benchmarks.conftest import Guard
from benchmarks.guard import Result, baseline_file, gpu_slug, judge, load_baseline, save_baseline, table


def result(vs_compile=1.5, of_ceiling=0.8, case="modulated_norm-layer fwd+bwd"):
    return Result(case, 0.25, vs_compile, of_ceiling, "copy")


class FakeConfig:
    def __init__(self, record=False, margin=0.10):
        self.options = {"--bench-record": record, "--bench-margin": margin}

    def getoption(self, name):
        return self.options[name]


def test_verdicts_follow_the_ratios_and_the_margin():
    stored = {"vs_compile": 1.5, "of_ceiling": 0.8}
    assert judge(result(1.40, 0.80), stored, 0.10)[0] == "ok"  # 6.7% lower: inside the margin
    verdict, why = judge(result(1.30, 0.80), stored, 0.10)
    assert verdict == "slower" and "vs_compile" in why and "of_ceiling" not in why
    assert judge(result(1.5, 0.60), stored, 0.10)[0] == "slower"  # the ceiling fraction alone can fail it
    assert judge(result(1.5, 0.60), stored, 0.30)[0] == "ok"  # a wider margin lets it through
    verdict, why = judge(result(1.8, 0.8), stored, 0.10)
    assert verdict == "faster" and "--bench-record" in why
    assert judge(result(), None)[0] == "new"
    assert judge(Result("step", 200.0, None, 0.5, "bf16"), {"of_ceiling": 0.6}, 0.10)[0] == "slower"  # no compile ratio


def test_baseline_round_trip_keeps_cases_not_measured_now(tmp_path):
    path = baseline_file("NVIDIA H200", tmp_path)
    assert path.name == "nvidia-h200.json" and gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert load_baseline(path) is None
    save_baseline(path, "NVIDIA H200", "abc123", [result(case="a"), Result("b", 9.0, None, 0.5, "bf16")])
    save_baseline(path, "NVIDIA H200", "def456", [result(vs_compile=2.0, case="a")])
    cases = load_baseline(path)
    assert cases["a"]["vs_compile"] == 2.0 and cases["b"] == {"ms": 9.0, "of_ceiling": 0.5, "git": "abc123"}
    assert cases["a"]["git"] == "def456"  # each case names the commit it was measured at


def test_an_unreadable_baseline_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="nvidia-h200.json.*--bench-record"):
        load_baseline(path)


def test_a_regression_fails_its_case_and_recording_never_does(tmp_path):
    save_baseline(baseline_file("NVIDIA H200", tmp_path), "NVIDIA H200", "abc", [result(1.5, 0.8)])
    guard = Guard(FakeConfig(), "NVIDIA H200", "def", tmp_path)
    guard.check(result(1.45, 0.79))  # within 10%
    with pytest.raises(pytest.fail.Exception, match="regressed: vs_compile 1.200 < 1.500.*--bench-record"):
        guard.check(result(1.2, 0.8))
    assert [verdict for _, _, verdict in guard.rows] == ["ok", "slower"]
    recording = Guard(FakeConfig(record=True), "NVIDIA H200", "def", tmp_path)
    recording.check(result(1.2, 0.8))  # --bench-record: measured, not judged
    assert recording.rows[0][2] == "recorded"


def test_a_gpu_without_a_baseline_records_one(tmp_path):
    guard = Guard(FakeConfig(), "NVIDIA B200", "abc", tmp_path)
    assert guard.recording and guard.stored is None
    guard.check(result(0.5, 0.1))  # would be a regression against anything; nothing to compare with
    assert guard.rows[0][2] == "recorded"


def test_the_closing_table_has_one_line_per_case():
    rows = [(result(), {"vs_compile": 1.5, "of_ceiling": 0.8}, "ok"),
            (Result("LightningDiT-XL/1 train step, batch 128", 211.0, None, 0.55, "bf16"), None, "new")]
    lines = table(rows).splitlines()
    assert lines[0].split()[:2] == ["case", "ms"] and len(lines) == 3
    assert "1.50x" in lines[1] and "0.80 copy" in lines[1] and lines[1].endswith("ok")
    assert "211.000" in lines[2] and " - " in lines[2] and "0.55 bf16" in lines[2] and lines[2].endswith("new")
