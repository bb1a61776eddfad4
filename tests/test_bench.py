"""The command line: `python -m aioforward bench` (aioforward/bench/) and `demo`.

The bench's CI smoke (`--smoke`) runs a few representative scenarios and checks the report is
complete and sane; no timing is asserted here: speed goals live in the report itself. Every run
happens from a temporary directory, never the repository, as it would from an installed package.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aioforward import _demo
from aioforward.__main__ import build_parser
from aioforward.bench import _cli, _report
from aioforward.bench._measure import Run, Skip, balanced_orders, interleaved
from aioforward.bench._scenarios import NAMES, SMOKE, ray_actors

ROOT = Path(__file__).resolve().parent.parent

# The figures each scenario records (every value must be positive).
FIGURES = {
    "overhead-asyncio": [
        f"asyncio/tiny/{v}"
        for v in (
            "direct",
            "to_thread",
            "ThreadPool",
            "ProcessPool",
            "ProcessPoolExecutor",
            "anyio.to_process",
        )
    ],
    "overhead-uvloop": ["uvloop/tiny/ThreadPool", "uvloop/tiny/ProcessPool"],
    "overhead-alone": [
        "alone/asyncio/tiny/pipe-floor",
        "alone/asyncio/tiny/ProcessPool",
        *(["alone/trio/tiny/ProcessPool"] if importlib.util.find_spec("trio") else []),
        "alone/uvloop/tiny/direct",
        "alone/uvloop/tiny/to_thread",
        "alone/uvloop/tiny/ThreadPool",
    ],
    "seed": ["asyncio/tiny/seed-process-per-call"],
    **{
        f"parallel-{kind}": [
            f"{kind}/bare-two-processes",
            f"{kind}/bare-two-threads",
            f"{kind}/serial-1-thread",
            f"{kind}/direct-default-threads",
            f"{kind}/ThreadPool",
            f"{kind}/ProcessPool",
            f"lag/{kind}/direct",
            f"lag/{kind}/ProcessPool-one-call",
        ]
        for kind in ("mlp", "conv", "transformer")
    },
    "memory": ["memory/ProcessPool", "memory/ProcessPoolExecutor"],
    "transfer": ["64MiB/clone", "64MiB/ProcessPool-round-trip"],
    "startup": ["start/ProcessPool-2-workers-module-loaded"],
    "throughput": ["throughput/ThreadPool", "throughput/ProcessPool"],
    "batching": [
        "batch/ThreadPool/Batcher",
        "batch/ThreadPool/unbatched",
        "batch/ThreadPool/tasks-only",
        "batch/ProcessPool/Batcher",
        "batch/ProcessPool/unbatched",
        "batch/ProcessPool/tasks-only",
        "batch/lone/Batcher",
        "batch/lone/forward",
        "batch/limit/singles",
        "batch/limit/one-batch",
    ],
}


def run_cli(
    args: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in a session of its own; on timeout, kill it with its worker processes
    (which would otherwise outlive it and fail the leak check too)."""
    with subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{args[1:]} ran past {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def bench(
    *args: str, cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "aioforward", "bench", *args]
    return run_cli(cmd, cwd=cwd, timeout=timeout, env=env)


def check_report(out: Path, ran: tuple[str, ...]) -> dict[str, Any]:
    """The report of a run of the scenarios ``ran``: every measured figure of theirs positive,
    every target row present (measured for them, "not run" for the others), a plot."""
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    results = data["results"]
    assert data["meta"]["scenarios"] == {n: "ran" if n in ran else "not selected" for n in NAMES}
    for name in ran:
        for key in FIGURES.get(name, []):
            assert key in results, key
            # (a difference of two measured figures, net_cpu, may come out below zero)
            figures = [v for k, v in results[key].items() if k != "net_cpu"]
            assert figures and all(v > 0 for v in figures), (key, results[key])
            if key.endswith(("/Batcher", "/unbatched")) and "/lone/" not in key:
                assert "net_cpu" in results[key], key
    expected = _report.targets(Run("smoke", results), dict.fromkeys(ran))
    assert [tuple(row) for row in expected] == [tuple(row) for row in data["targets"]]
    report = (out / "report.md").read_text()
    assert "| figure | target | measured | met |" in report
    for figure, target, measured, _ in data["targets"]:
        assert f"| {figure} | {target} | {measured} |" in report
    assert (out / "report.png").stat().st_size > 10_000
    return data


@pytest.mark.timeout(45)
def test_smoke_writes_complete_report_from_outside_the_repo(tmp_path: Path) -> None:
    """The CI smoke: a few representative scenarios, from a directory that is not the
    repository, into the default output folder (./bench-results)."""
    proc = bench("--smoke", cwd=tmp_path, timeout=40)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # nor in the processes it starts
    data = check_report(tmp_path / "bench-results", SMOKE)
    rows = {row[0]: row for row in data["targets"]}
    assert rows["ProcessPool round trip, tiny (asyncio)"][3] is not None  # measured, judged
    assert rows["ProcessPool start, 2 workers ready with module"][2].startswith("not run")
    assert "wrote bench-results/results.json" in proc.stdout


# Every other scenario, in groups that each stay inside a test's time limit (Ray's own tests
# cover RayPool; the bench's Ray rows need a local Ray, tens of seconds to start).
@pytest.mark.slow
@pytest.mark.timeout(65)
@pytest.mark.parametrize(
    "only",
    [
        ("seed", "startup", "throughput"),
        ("parallel-conv", "parallel-transformer"),
        ("memory",),
        ("transfer", "overhead-uvloop", "result-mode"),
        ("overhead-alone",),
    ],
    ids=lambda only: "+".join(only),
)
def test_every_scenario_runs(tmp_path: Path, only: tuple[str, ...]) -> None:
    # overhead-alone: six fresh processes, one after another (21 s here)
    proc = bench("--smoke", "--only", *only, "--out", "out", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # nor in the processes it starts
    check_report(tmp_path / "out", only)


def test_alone_names_an_unknown_variant() -> None:
    import asyncio

    from aioforward.bench import _alone

    with pytest.raises(ValueError, match=r"variant must be one of pipe-floor, .*got 'pipe'"):
        asyncio.run(_alone.measure("pipe", 1))


def test_interleaved_variants_each_follow_every_other_alike() -> None:
    """What a variant leaves behind (an OpenMP team still spinning, cores the host let go cold
    during a pause) must not always land on the same neighbour: within the turns, each of the
    seven variants of a parallel scenario follows each other one equally often. (Rotating one
    order, as the bench did, put the ThreadPool after the two-thread baseline in 13 turns of
    15.)"""
    order: list[str] = []

    def step(name: str) -> Any:
        async def call() -> None:
            order.append(name)

        return call

    names = "abcdefg"
    turns = 2 * len(names)  # one design: a warm-up turn, then 13 timed turns
    asyncio.run(interleaved(Run("smoke"), {v: (step(v), 1) for v in names}, turns - 1))
    assert sorted(order) == sorted(names * turns)
    follows = collections.Counter(
        (order[i - 1], order[i]) for i in range(len(order)) if i % len(names)
    )
    assert set(follows) == {(a, b) for a in names for b in names if a != b}
    assert set(follows.values()) == {2}, follows


@pytest.mark.parametrize("n", range(1, 10))
def test_balanced_orders_are_permutations_each_following_each_other_alike(n: int) -> None:
    orders = balanced_orders(n)
    assert len(orders) == (2 * n if n % 2 else n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows = collections.Counter((o[i - 1], o[i]) for o in orders for i in range(1, n))
    assert len(follows) == n * (n - 1)
    assert len(set(follows.values())) <= 1


def test_skipped_scenario_says_why(tmp_path: Path) -> None:
    """A scenario that cannot run here (the CUDA row on a machine without a GPU) keeps its
    row, with the reason."""
    proc = bench("--smoke", "--only", "cuda", "--out", "out", cwd=tmp_path, timeout=40)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["meta"]["command"] == "python -m aioforward bench --smoke --only cuda"
    status = data["meta"]["scenarios"]["cuda"]
    cuda_row = [row for row in data["targets"] if row[0].startswith("CudaStreamPool")]
    if status != "ran":
        assert status.startswith("skipped: ") and f"cuda: {status}" in proc.stdout
        assert cuda_row == [[cuda_row[0][0], "", f"not run (cuda: {status})", None]]


def test_bench_help_lists_its_options(tmp_path: Path) -> None:
    proc = bench("--help", cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m aioforward bench")
    for text in ("--quick", "--smoke", "--only", "--out DIR", "./bench-results", *NAMES):
        assert text in proc.stdout, text


def test_bench_rejects_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--only", "nonsense"])
    assert exc.value.code == 2
    assert "argument --only: invalid choice: 'nonsense'" in capsys.readouterr().err


def test_bench_says_which_extra_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real = _cli.importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name in ("psutil", "matplotlib") else real(name, package)

    monkeypatch.setattr(_cli.importlib.util, "find_spec", find_spec)
    assert _cli.main(["--smoke", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib, psutil: pip install 'aioforward[bench]'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "size", "only", "back"),
    [
        ([], "full", NAMES, []),
        (["--quick"], "quick", NAMES, ["--quick"]),
        (["--smoke"], "smoke", SMOKE, ["--smoke"]),
        (["--only", "memory", "seed"], "full", ("seed", "memory"), None),  # in run order
        (["--smoke", "--only", "batching", "seed"], "smoke", ("seed", "batching"), None),
    ],
)
def test_options(argv: list[str], size: str, only: tuple[str, ...], back: list[str] | None) -> None:
    ns = build_parser().parse_args(["bench", *argv, "--out", "x"])
    options = _cli.Options.from_namespace(ns)
    assert (options.size, options.only, options.out) == (size, only, Path("x"))
    again = _cli.Options.from_namespace(build_parser().parse_args(["bench", *options.argv()]))
    assert again == options
    if back is not None:
        assert options.argv() == [*back, "--out", "x"]


def test_quick_and_smoke_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--quick", "--smoke"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_every_target_row_says_why_it_did_not_run() -> None:
    status: dict[str, str | None] = {"ray": "skipped: ray is not installed"}
    rows = _report.targets(Run("smoke"), status)
    assert len(rows) == len(_report._TARGETS)
    assert all(row.measured.startswith("not run (") and row.met is None for row in rows)
    ray = [row for row in rows if row.figure == "Ray actors and RayPool"]
    assert ray[0].measured == (
        "not run (ray: skipped: ray is not installed; parallel-mlp: not selected)"
    )
    assert _report.targets(Run("smoke"), status, unselected=False) == ray


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _requirement_names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}


def test_extras_bring_what_the_bench_and_demo_import() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    core = _requirement_names(project["dependencies"])
    assert "rich" not in core  # only the demo and the bench use it
    third_party = set()
    for path in [*(ROOT / "aioforward" / "bench").glob("*.py"), ROOT / "aioforward" / "_demo.py"]:
        third_party |= _imports(path) - set(sys.stdlib_module_names) - {"aioforward"}
    optional = {"ray"}  # a row skipped, with the reason, when it is missing
    assert third_party - core - optional <= extras["bench"], third_party
    assert set(_cli.NEEDS) <= extras["bench"]
    assert extras["cli"] == {"rich"} and extras["trio"] == {"trio"}
    assert extras["bench"] | extras["cli"] | extras["trio"] | extras["uvloop"] <= extras["test"]
    assert {"ruff", "mypy"} <= extras["dev"]


def test_demo_rejects_zero_rounds(tmp_path: Path) -> None:
    proc = run_cli(
        [sys.executable, "-m", "aioforward", "demo", "--rounds", "0"], cwd=tmp_path, timeout=30
    )
    assert proc.returncode == 2
    assert "argument --rounds: must be >= 1" in proc.stderr and "got 0" in proc.stderr
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        _demo.run_demo(rounds=0)


@pytest.mark.timeout(45)
def test_demo_runs_without_rich(tmp_path: Path) -> None:
    """A bare install has no rich: the demo prints a plain-text table."""
    code = (
        "import sys; sys.modules['rich'] = None\n"  # `import rich` now raises ImportError
        "from aioforward.__main__ import main\n"
        "sys.exit(main(['demo', '--rounds', '2']))\n"
    )
    proc = run_cli([sys.executable, "-c", code], cwd=tmp_path, timeout=40)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("aioforward demo: ")
    header = lines.index("both modules, one round") + 1
    assert lines[header].split("  ")[0] == "how"
    rows = lines[header + 2 : header + 5]
    hows = ("direct, ", "ThreadPool(workers=2)", "ProcessPool(workers=2)")
    for row, how in zip(rows, hows, strict=True):
        assert row.startswith(how) and row.count(" ms") == 3, row
        # the pools' rows also say how much the two modules overlapped on that pool
        assert len(re.findall(r"\d\.\d\dx", row)) == (1 if how == "direct, " else 2), row


FAKE: list[_demo.Result] = [
    ("direct calls", {"wall": 0.030, "lag_p99": 0.030, "lag_max": 0.031}),
    (
        "run_parallel on ThreadPool(workers=2)",
        {"wall": 0.015, "serial": 0.027, "lag_p99": 0.003, "lag_max": 0.004},
    ),
]


def test_demo_table_plain_and_rich(capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo.table_rows(FAKE) == [
        ["direct calls", "30.0 ms", "1.00x", "", "30.0 ms", "31.0 ms"],
        ["run_parallel on ThreadPool(workers=2)", "15.0 ms", "2.00x", "1.80x", "3.0 ms", "4.0 ms"],
    ]
    _demo._output(plain=True).table("both", _demo.table_rows(FAKE))
    plain = capsys.readouterr().out.splitlines()
    assert plain[1:4] == [
        "both",
        "how                                    wall time  speed-up  at once  lag p99  lag max",
        "-------------------------------------  ---------  --------  -------  -------  -------",
    ]
    assert plain[5].endswith("15.0 ms     2.00x    1.80x   3.0 ms   4.0 ms")
    pytest.importorskip("rich")
    _demo._output(plain=False).table("both", _demo.table_rows(FAKE))
    assert "1.80x" in capsys.readouterr().out


def test_ray_rows_are_skipped_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(Skip, match=r"^ray is not installed \(pip install 'aioforward\[ray\]'\)$"):
        asyncio.run(ray_actors(Run("smoke")))


def test_the_trio_row_says_why_it_did_not_run_without_trio() -> None:
    """trio comes with the bench extra; installed without it, the bench skips trio's variant
    of overhead-alone and its row says so instead of vanishing."""
    fig = {"median": 100e-6, "min": 90e-6, "max": 120e-6}
    results = {
        key: fig
        for key in (
            "alone/asyncio/tiny/pipe-floor",
            "alone/asyncio/tiny/ProcessPool",
            "alone/uvloop/tiny/direct",
            "alone/uvloop/tiny/to_thread",
            "alone/uvloop/tiny/ThreadPool",
        )
    }
    results["alone/uvloop/tiny/direct"] = {**fig, "median": 10e-6}
    (row,) = [r for r in _report._alone(results) if "trio" in r.figure]
    assert row.measured == "not run (trio is not installed: pip install 'aioforward[bench]')"
    results["alone/trio/tiny/ProcessPool"] = {**fig, "median": 50e-6}
    (row,) = [r for r in _report._alone(results) if "trio" in r.figure]
    assert row.measured == "0.50x (50 us vs 100 us)"


def test_a_ratio_that_rounds_to_its_target_shows_more_digits() -> None:
    """0.946 must not read "0.95x" in a row judged against ">= 0.95x"."""
    assert _report._x(0.946, 0.95) == "0.946x"
    assert _report._x(0.95, 0.95) == "0.95x"
    assert _report._x(0.96, 0.95) == "0.96x"
    assert _report._x(3.04, 3, 1) == "3.04x"
    assert _report._x(3.4, 3, 1) == "3.4x"
    assert _report._x(0.9496, 0.95) == "0.9496x"


def test_the_cuda_rows_judge_the_small_kernel_modules_and_show_the_mlps_beside() -> None:
    """The target row is the small-grid pair's; the mlp pair, whose kernels a fast GPU ends
    before the next launch, is a comparison row; results of earlier releases (the mlps only)
    are still judged as they were."""
    r: dict[str, dict[str, float]] = {
        "lag/cuda/CudaStreamPool": {"p99": 0.0006},
        "cuda/serial-default-stream": {"median": 0.0006},
        "cuda/CudaStreamPool": {"median": 0.001},
        "cuda/small-grid/serial-default-stream": {"median": 0.0011},
        "cuda/small-grid/CudaStreamPool": {"median": 0.0006},
    }
    target, mlp = _report._cuda(r)
    assert target.met is True and target.measured.startswith("1.83x (1.10 ms serial)")
    assert mlp.met is None and mlp.measured == "0.60x (0.60 ms serial)"
    old = {k: v for k, v in r.items() if "small-grid" not in k}
    (only,) = _report._cuda(old)
    assert only.met is False and only.measured == "0.60x, p99 0.60 ms"
