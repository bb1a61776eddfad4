"""The benchmark suite's smoke run: `--quick` completes and writes a sane, complete report.
No timing is asserted here; speed goals live in the report itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(400)
def test_quick_benchmark_writes_complete_report(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "aioforward", "bench", "--quick", "--out", str(tmp_path)],
        cwd=root,
        check=True,
        timeout=380,
        capture_output=True,
    )
    data = json.loads((tmp_path / "results.json").read_text())
    results = data["results"]
    for key in (
        "asyncio/tiny/ProcessPool",
        "uvloop/tiny/ThreadPool",
        "mlp/ProcessPool",
        "conv/ThreadPool",
        "transformer/ProcessPool",
        "memory/ProcessPool",
        "memory/ProcessPoolExecutor",
        "64MiB/ProcessPool-round-trip",
        "lag/mlp/direct",
        "start/ProcessPool-2-workers-module-loaded",
        "asyncio/tiny/seed-process-per-call",
        "batch/ThreadPool/Batcher",
        "batch/ProcessPool/unbatched",
        "batch/lone/Batcher",
    ):
        assert key in results, key
        for v in results[key].values():
            assert v > 0, (key, results[key])
    assert len(data["targets"]) >= 15
    report = (tmp_path / "report.md").read_text()
    assert "| figure | target | measured | met |" in report
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_demo_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aioforward", "demo", "--rounds", "2"],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert "ProcessPool" in out.stdout and "speed-up" in out.stdout
