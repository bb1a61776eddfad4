"""The test suite's own timeouts (conftest.py): an async test times out inside its event loop
on every loop, and a test that outlasts its timeout all the same ends the run with every
thread's stack and its name, instead of holding it until CI's limit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HANGS = """
import time

import pytest


@pytest.mark.timeout(1)
def test_waits_on_regardless():
    while True:  # a wait that retries: pytest-timeout's exception does not end it
        try:
            time.sleep(30)
        except BaseException:
            pass


def test_after_it():
    pass
"""


STUCK = """
import anyio
import pytest

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(2)
async def test_stuck():
    await anyio.sleep(100)
"""


def run_pytest(tmp_path: Path, tests: str) -> subprocess.CompletedProcess[str]:
    """pytest in ``tmp_path`` on the module ``tests``, with this suite's conftest; no
    tracebacks, and a summary line per failure that a terminal's width does not cut short."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_it.py").write_text(textwrap.dedent(tests))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "hang_grace=2"]
        + ["--tb=no", "-rf"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "1000"},
        capture_output=True,
        text=True,
        timeout=80,
    )


@pytest.mark.timeout(90)
def test_an_async_test_times_out_in_its_event_loop_on_every_loop(tmp_path: Path) -> None:
    """pytest-timeout alone leaves a stuck test running on uvloop (which drops the exception
    its SIGALRM handler raises) and on trio (which anyio runs where that exception never
    arrives): the run would hang there."""
    run = run_pytest(tmp_path, STUCK)
    assert run.returncode == 1, (run.stdout, run.stderr)
    message = "Failed: timed out after 1.8 s in its event loop (90% of its timeout)"
    failures = [line for line in run.stdout.splitlines() if line.startswith("FAILED ")]
    assert failures == [
        f"FAILED test_it.py::test_stuck[{loop}] - {message}"
        for loop in ("asyncio", "asyncio+uvloop", "trio")
    ], run.stdout


@pytest.mark.timeout(90)
def test_a_test_that_outlasts_its_timeout_ends_the_run_with_its_stacks(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, HANGS)
    assert run.returncode == 3, (run.stdout, run.stderr)
    # faulthandler's stack of the main thread names the test function
    assert "in test_waits_on_regardless" in run.stderr, run.stderr
    assert run.stderr.rstrip().splitlines()[-1] == (
        "HANG: test_it.py::test_waits_on_regardless ran 2 s past its timeout "
        "(every thread's stack is above): ending the run"
    ), run.stderr
    assert "test_after_it" not in run.stdout + run.stderr
