"""Every example runs as a user would run it."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("two_modules.py", "outputs: (64, 512) (64, 256)"),
        ("trio_program.py", "8 results, each of shape (1, 8)"),
        ("batched_requests.py", "500 answers in"),
    ],
)
def test_script_example_runs(name: str, expect: str) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert expect in out.stdout


@pytest.mark.filterwarnings("ignore:Using `httpx` with:Warning")  # starlette's own test client
def test_asgi_example_stays_responsive_and_answers() -> None:
    from starlette.testclient import TestClient

    mod = runpy.run_path(str(EXAMPLES / "asgi_app.py"))
    with TestClient(mod["app"]) as client:
        r = client.post("/similarity", json={"features": [0.1] * 256})
        assert r.status_code == 200
        assert -1.0 <= r.json()["similarity"] <= 1.0
        assert client.get("/health").json() == {"ok": True}


@pytest.mark.filterwarnings("ignore:Using `httpx` with:Warning")  # starlette's own test client
def test_metrics_example_serves_predictions_and_metrics() -> None:
    from starlette.testclient import TestClient

    mod = runpy.run_path(str(EXAMPLES / "metrics_app.py"))
    with TestClient(mod["app"]) as client:
        r = client.post("/predict", json={"features": [0.1] * 64})
        assert r.status_code == 200
        assert 0 <= r.json()["label"] < 10
        text = client.get("/metrics").text
        assert 'aioforward_pool_completed_total{kind="ThreadPool",pool="classifier"} 1.0' in text
        assert 'aioforward_batcher_samples_total{batcher="Batcher(Sequential)"} 1.0' in text
