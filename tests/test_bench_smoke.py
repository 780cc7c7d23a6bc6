"""The kernel benchmark runner works end to end: times every case and writes valid JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import kernels


def test_quick_run_writes_a_json_report_with_every_g711_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kernels.json"
    # One module keeps this quick; loading the others is the same code path.
    argv = ["--quick", "--json", str(out), "--min-time", "0.0002", "--repeat", "1"]
    code = kernels.main([*argv, "--module", "bench.kernels_g711"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["python"]
    by_key = {(c["group"], c["name"]): c for c in report["cases"]}
    for law in ("mu-law", "A-law"):
        for op in ("encode", "decode"):
            for unit in ("20 ms frame", "60 s buffer"):
                native = by_key[(f"{law} {op}, {unit}", "native")]
                assert native["error"] is None
                assert native["ns_per_call"] > 0
                assert native["target"] is not None
                assert native["ratio"] is None or native["ratio"] > 0
    assert by_key[("ring write+read+ack, 20 ms frame", "native")]["ns_per_call"] > 0
    assert all(c["error"] is None for c in report["cases"])
    table = capsys.readouterr().out
    assert "mu-law encode, 20 ms frame" in table and "baseline" in table


def test_a_missing_kernel_module_is_skipped_with_a_note() -> None:
    cases, notes = kernels.load_cases(("bench.kernels_g711", "bench.no_such_kernels"))
    assert cases and any("bench.no_such_kernels" in note for note in notes)


def test_a_failing_case_is_reported_not_raised() -> None:
    def broken() -> None:
        raise RuntimeError("kernel exploded")

    result = kernels.time_case(kernels.Case("g", "broken", broken), min_time=0.0001, repeat=1)
    assert result.ns_per_call is None
    assert result.error is not None and "kernel exploded" in result.error


def test_a_failing_case_does_not_stop_the_rest_of_its_group() -> None:
    def broken() -> None:
        raise RuntimeError("kernel exploded")

    group = [kernels.Case("g", "broken", broken), kernels.Case("g", "fine", lambda: sum(range(9)))]
    bad, good = kernels.time_group(group, min_time=0.0001, repeat=3)
    assert bad.error is not None and bad.ns_per_call is None
    assert good.error is None and good.ns_per_call is not None and good.ns_per_call > 0
    assert good.repeats == 3


def test_ratios_are_speed_ups_over_the_group_baseline() -> None:
    slow = kernels.Result(kernels.Case("g", "slow", lambda: None, baseline=True), 300.0, 1, 1)
    fast = kernels.Result(kernels.Case("g", "fast", lambda: None, target=2.0), 100.0, 1, 1)
    other = kernels.Result(kernels.Case("h", "alone", lambda: None, target=1.0), 50.0, 1, 1)
    kernels.attach_ratios([slow, fast, other])
    assert fast.ratio == pytest.approx(3.0)
    assert fast.meets_target is True
    assert other.ratio is None and other.meets_target is None
    assert "✓ target 2.00x" in kernels.format_table([slow, fast])


def test_the_installed_command_finds_the_harness_from_any_directory(tmp_path: Path) -> None:
    import subprocess
    import sys

    command = Path(sys.executable).with_name("voice-engine")
    if not command.exists():
        pytest.skip("the voice-engine console script is not installed beside this interpreter")
    done = subprocess.run(
        [str(command), "bench", "twilio", "--help"], cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--compare-relay" in done.stdout
