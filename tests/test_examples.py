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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(180)
def test_sse_gpt2_streams_tokens_and_a_disconnect_stops_the_generation() -> None:
    """End to end as a user runs it: uvicorn in its own process, httpx streaming clients.
    A client that leaves after a few tokens frees the worker (same pid, no restart) long
    before the 1,000 tokens it asked for could have been generated."""
    pytest.importorskip("transformers", reason="the example builds GPT-2 with transformers")
    pytest.importorskip("uvicorn", reason="the example is served by uvicorn")
    import signal
    import time

    import httpx

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.sse_gpt2:app", "--port", str(port)],
        cwd=EXAMPLES.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/stats").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and server.poll() is None, "no server"
                time.sleep(0.2)
            # A whole answer: one event per token, then the end event.
            r = client.post("/generate", json={"ids": [1, 2, 3], "max_new_tokens": 8})
            events = [e for e in r.text.split("\n\n") if e]
            assert len(events) == 9 and events[-1].startswith("event: end")
            assert all(0 <= int(e.removeprefix("data: ")) < 1000 for e in events[:-1])
            # What a token costs, from a whole answer of 64 (the gaps between a few events
            # seen by a client are no measure: several can arrive in one read).
            t0 = time.monotonic()
            r = client.post("/generate", json={"ids": [1, 2, 3], "max_new_tokens": 64})
            per_token = (time.monotonic() - t0) / 64
            assert r.text.count("data:") == 64 + 1  # and the end event's
            # A client that disconnects after 5 tokens of 1,000.
            seen = 0
            with client.stream(
                "POST", "/generate", json={"ids": [1, 2, 3], "max_new_tokens": 1000}
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        seen += 1
                        if seen == 5:
                            break
            left = time.monotonic()
            while (s := client.get("/stats").json())["busy"]:
                assert time.monotonic() - left < 60
                time.sleep(0.02)
            stopped_after = time.monotonic() - left
            assert s["cancelled"] == 1 and s["restarts"] == 0
            # the remaining 995 tokens would take far longer than the stop did
            assert stopped_after < 0.25 * 995 * per_token, (stopped_after, per_token)
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal to report how it ended
    assert server.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out, out
