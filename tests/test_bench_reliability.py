"""The reliability benchmarks (bench soak, churn, faults) run end to end on a tiny scale against a
spawned echo engine and write their outputs. Numbers are not judged here (they live in the
benchmarks' reports); what is checked is what must hold at any scale: every call connects, the
engine returns to zero live calls, fds come back, faults are counted where the engine says."""

from __future__ import annotations

import json
from pathlib import Path

from bench import churn, faults, soak


def _results(out: Path) -> dict:
    assert (out / "report.md").read_text().startswith("# ")
    return json.loads((out / "results.json").read_text())


def test_soak_holds_calls_and_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    code = soak.main(
        ["--calls", "5", "--minutes", "0.1", "--sample-every", "0.5", "--out", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert code == 0
    r = _results(out)
    assert (out / "soak.png").stat().st_size > 0
    assert r["connected"] == 5 and r["failed_to_connect"] == 0
    assert r["frames"]["received"] > 0
    assert r["engine_counters"]["frames_in"] >= r["frames"]["sent"] - 5
    assert len(r["per_window"]) >= 2 and r["rss_growth_pct"] is not None
    assert r["health_after"]["activeCalls"] == 0


def test_churn_returns_engine_to_zero_sessions_and_its_fds(tmp_path: Path) -> None:
    out = tmp_path / "churn"
    code = churn.main(
        ["--calls", "20", "--concurrency", "5", "--media", "0.5", "--settle", "1",
         "--warmup", "2", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    r = _results(out)
    assert r["completed"] == 20 and r["failed"] == 0
    assert r["engine_counters"]["calls"] == 20
    assert r["health_after"]["activeSessions"] == 0
    assert r["health_after"]["activeCalls"] == 0
    assert abs(r["process_after"]["fds"] - r["process_before"]["fds"]) <= 3
    assert "CLOSE_WAIT" not in r["process_after"]["tcp"]
    tasks = r["asyncio_tasks"]  # read from the engine's /metrics, before and after the churn
    assert tasks["before"] > 0 and tasks["after"] <= tasks["before"] + 2


def test_faults_runs_every_fault_beside_good_calls(tmp_path: Path) -> None:
    out = tmp_path / "faults"
    code = faults.main(
        ["--good", "5", "--baseline", "1", "--window", "1.5", "--gap", "0.3", "--stall", "2",
         "--burst", "10", "--garbage-callers", "5", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    r = _results(out)
    assert (out / "faults.png").stat().st_size > 0
    windows = {w["name"]: w for w in r["windows"]}
    assert list(windows) == ["baseline", "stalled-reader", "garbage", "connect-burst"]
    assert r["good_connected"] == 5 and r["good_failed"] == 0
    assert windows["stalled-reader"]["detail"]["error"] is None
    assert windows["garbage"]["engine"]["bad_messages"] > 0
    assert windows["connect-burst"]["detail"]["failed"] == 0
    assert windows["connect-burst"]["engine"]["calls"] == 10
    assert r["health_after"]["activeSessions"] == 0
