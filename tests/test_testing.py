"""aioforward.testing: assert_loop_free catches a block wherever it sits in the guarded
code, on asyncio, asyncio+uvloop and trio; the plugin's lag-limit fixtures; the plugin
loads without torch."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import anyio
import pytest

from aioforward.testing import assert_loop_free

if TYPE_CHECKING:
    from aioforward.testing import LoopFreeGuard

pytestmark = pytest.mark.anyio

BLOCK = 0.08  # how long the tests below freeze the loop
LIMIT = 0.02  # well under BLOCK: a caught block is no near miss


def blocked_ms(err: pytest.ExceptionInfo[AssertionError]) -> float:
    """The lag the guard reported, so a test can check it measured the whole block."""
    found = re.search(r"blocked for ([\d.]+) ms", str(err.value))
    assert found, err.value
    return float(found[1])


class TestAssertLoopFree:
    async def test_block_before_the_first_await_is_caught(self) -> None:
        with pytest.raises(AssertionError, match="blocked for") as err:
            async with assert_loop_free(max_lag=LIMIT):
                time.sleep(BLOCK)
                await anyio.sleep(0.005)
        assert blocked_ms(err) >= 0.9 * BLOCK * 1e3

    async def test_block_with_no_await_at_all_is_caught(self) -> None:
        with pytest.raises(AssertionError, match="blocked for") as err:
            async with assert_loop_free(max_lag=LIMIT):
                time.sleep(BLOCK)
        assert blocked_ms(err) >= 0.9 * BLOCK * 1e3

    async def test_block_between_awaits_is_caught(self) -> None:
        with pytest.raises(AssertionError, match="blocked for") as err:
            async with assert_loop_free(max_lag=LIMIT):
                await anyio.sleep(0.005)
                time.sleep(BLOCK)
                await anyio.sleep(0.005)
        # The block may start while the watchdog waits its interval (1 ms) before posting.
        assert blocked_ms(err) >= 0.8 * BLOCK * 1e3

    async def test_block_at_the_very_end_is_caught(self) -> None:
        with pytest.raises(AssertionError, match="blocked for") as err:
            async with assert_loop_free(max_lag=LIMIT):
                await anyio.sleep(0.005)
                time.sleep(BLOCK)
        assert blocked_ms(err) >= 0.8 * BLOCK * 1e3

    async def test_free_loop_passes(self) -> None:
        async with assert_loop_free(max_lag=0.05) as monitor:  # generous: this VM stalls
            for _ in range(10):
                await anyio.sleep(0.002)
        assert monitor.stats().samples >= 3  # it did watch the loop, and found it free

    async def test_exception_from_the_block_propagates_unchanged(self) -> None:
        with pytest.raises(KeyError, match="boom"):
            async with assert_loop_free(max_lag=LIMIT):
                time.sleep(BLOCK)
                raise KeyError("boom")

    async def test_watchdog_thread_runs_inside_and_is_joined_on_exit(self) -> None:
        def watchdogs() -> list[threading.Thread]:
            return [t for t in threading.enumerate() if t.name == "aioforward-lag-watchdog"]

        async with assert_loop_free(max_lag=0.05):
            assert len(watchdogs()) == 1
        assert watchdogs() == []

    async def test_bad_max_lag(self) -> None:
        with pytest.raises(ValueError, match="max_lag must be a number of seconds > 0, got 0"):
            async with assert_loop_free(max_lag=0):
                pass


class TestLagLimitFixture:
    def test_default_is_50_ms(self, aioforward_lag_limit: float) -> None:
        assert aioforward_lag_limit == 0.05

    async def test_guard_takes_the_limit_from_the_fixture(
        self, aioforward_assert_loop_free: LoopFreeGuard
    ) -> None:
        with pytest.raises(AssertionError, match=r"max_lag=50\.0 ms"):
            async with aioforward_assert_loop_free():
                time.sleep(BLOCK)

    async def test_explicit_max_lag_wins_over_the_fixture(
        self, aioforward_assert_loop_free: LoopFreeGuard
    ) -> None:
        with pytest.raises(AssertionError, match=r"max_lag=20\.0 ms"):
            async with aioforward_assert_loop_free(max_lag=LIMIT):
                time.sleep(BLOCK)

    @pytest.mark.parametrize("aioforward_lag_limit", [0.03])
    async def test_parametrize_overrides_the_limit(
        self, aioforward_assert_loop_free: LoopFreeGuard
    ) -> None:
        with pytest.raises(AssertionError, match=r"max_lag=30\.0 ms"):
            async with aioforward_assert_loop_free():
                time.sleep(BLOCK)


class TestLagLimitOverridden:
    """Overridden here as a user would in a conftest.py: the closest definition wins."""

    @pytest.fixture
    def aioforward_lag_limit(self) -> float:
        return 0.5

    async def test_override_applies(self, aioforward_assert_loop_free: LoopFreeGuard) -> None:
        async with aioforward_assert_loop_free() as monitor:
            time.sleep(BLOCK)  # well over the 50 ms default, well under this class's 500 ms
            await anyio.sleep(0.005)
        assert monitor.stats().max >= 0.9 * BLOCK  # seen, and accepted


# The subprocess imports the plugin as pytest does and fails on the first `import torch`,
# with the importing line in its traceback (faster and clearer than loading torch).
NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ImportError(f"{name} imported while loading the plugin")

sys.meta_path.insert(0, NoTorch())
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


def test_plugin_and_testing_modules_import_no_torch() -> None:
    """aioforward.testing and aioforward.monitor, under an empty parent package (so this holds
    whatever aioforward/__init__.py imports)."""
    spec = importlib.util.find_spec("aioforward")
    assert spec is not None and spec.submodule_search_locations
    code = NO_TORCH + (
        "import types\n"
        "pkg = types.ModuleType('aioforward')\n"
        f"pkg.__path__ = {list(spec.submodule_search_locations)!r}\n"
        "sys.modules['aioforward'] = pkg\n"
        "import aioforward.testing, aioforward.monitor\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr


def test_pytest_loads_the_plugin_without_torch() -> None:
    """What pytest imports through the entry point, in every run of every project that has
    aioforward installed, imports neither torch nor the aioforward package."""
    from importlib.metadata import entry_points

    (plugin,) = [ep for ep in entry_points(group="pytest11") if ep.name == "aioforward"]
    done = run_python(NO_TORCH + f"import {plugin.value}\nassert 'aioforward' not in sys.modules\n")
    assert done.returncode == 0, done.stderr
