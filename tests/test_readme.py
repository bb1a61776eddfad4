"""Every ```python block of README.md runs as shown.

Each block is one test (id: its heading and its index among the blocks), run by what it is:

- a pytest file: it defines a ``test_*`` function. It is written into a fresh project outside
  the repository (split into files at ``# name.py`` comment lines; a block without them is
  ``test_readme_example.py``) and run with ``python -m pytest`` in pytest-asyncio strict mode,
  next to a copy in which every ``async with ...loop_free...:`` body starts by blocking the
  loop: the block's tests must pass and the copy's must fail. The project's root conftest.py
  (``STUB_CONFTEST``) supplies the fixtures the block says are the reader's own (``client``).
- a program: it calls ``asyncio.run(`` or has ``if __name__ == "__main__":``. It runs as a
  script in a subprocess, from a temporary directory, without PYTHONPATH (aioforward is
  installed in the environment, as a user's would be).
- a fragment: anything else. It runs in this process, top-level ``await`` included, on the
  test's asyncio loop, in a namespace of small real stand-ins for the names the README leaves
  to the reader (``namespace()``; a section may give a name another shape, ``OVERRIDES``), with
  ``af`` imported as the README's first block does. ``EXPECT`` checks what some sections'
  fragments produce. Every pool in the namespace is closed afterwards. A fragment that starts
  a local Ray runs the same way in a child process (``python tests/test_readme.py INDEX``):
  Ray keeps files and sockets open in its driver after ``ray.shutdown()``.

A block that needs what this machine lacks is skipped with the reason: ``CudaStreamPool``
without a CUDA device, ``RayPool`` without the optional ray package.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import torch

import aioforward as af

if TYPE_CHECKING:
    from collections.abc import Callable

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """README snippets are asyncio code (the test suite covers uvloop and trio)."""
    return "asyncio"


@dataclass(frozen=True)
class Block:
    index: int
    heading: str  # the last Markdown heading above the block
    line: int  # README line of the block's first line of code
    source: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug}-{self.index}"

    @property
    def kind(self) -> str:
        tree = ast.parse(self.source)
        if any(
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
            for node in tree.body
        ):
            return "pytest"
        if "asyncio.run(" in self.source or re.search(r"if __name__ == .__main__.:", self.source):
            return "program"
        return "fragment"


def extract_blocks(markdown: str) -> list[Block]:
    """The ```python blocks, in order, each with the heading it sits under."""
    blocks: list[Block] = []
    heading, fence, start, code = "", None, 0, []
    for n, line in enumerate(markdown.splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence, start, code = line[3:].strip(), n + 1, []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            if fence == "python":
                blocks.append(Block(len(blocks), heading, start, "\n".join(code) + "\n"))
            fence = None
        else:
            code.append(line)
    assert fence is None, f"README.md: the block opened on line {start - 1} is never closed"
    return blocks


BLOCKS = extract_blocks(README.read_text(encoding="utf-8"))


def blocks_of(kind: str) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.kind == kind]


def section(heading: str, table: dict[str, Any]) -> Any:
    """The entry of ``table`` whose key starts ``heading`` (None when there is none)."""
    return next((v for k, v in table.items() if heading.startswith(k)), None)


# --------------------------------------------------------------------------- fragments


class MaskedEncoder(torch.nn.Module):
    """``model(x, attention_mask=mask)``: (batch, 512) -> (batch, 512)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(512, 512)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.proj(x)
        return y if attention_mask is None else y * attention_mask[:, None]


def namespace() -> dict[str, Any]:
    """Stand-ins for the names README fragments use without defining them."""
    nn = torch.nn
    return {
        "af": af,
        "encoder_a": nn.Sequential(nn.Linear(512, 512), nn.ReLU()),
        "encoder_b": nn.Sequential(nn.Linear(512, 256), nn.Tanh()),
        "x": torch.randn(64, 512),
        "model": MaskedEncoder(),
        "mask": torch.ones(64),
        "m1": nn.Linear(512, 128),
        "m2": nn.Linear(512, 64),
        "x1": torch.randn(8, 512),
        "x2": torch.randn(4, 512),
        "setup": torch.manual_seed,  # ProcessPool(initializer=setup, initargs=(cfg,)):
        "cfg": 0,  # importable in the spawned workers
        "image": torch.randn(3, 224, 224),
        "pool": af.ThreadPool(workers=2, name="aioforward-readme"),
    }


def _image_classifier() -> dict[str, Any]:
    nn = torch.nn
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 1000), nn.Softmax(-1))
    return {"model": head}  # images 3x224x224 -> 1000 probabilities


def _on_gpu() -> dict[str, Any]:
    nn = torch.nn
    return {
        "encoder_a": nn.Sequential(nn.Linear(512, 512), nn.ReLU()).to("cuda:0"),
        "encoder_b": nn.Sequential(nn.Linear(512, 256), nn.Tanh()).to("cuda:0"),
    }


OVERRIDES: dict[str, Callable[[], dict[str, Any]]] = {
    "Batcher": _image_classifier,
    "CudaStreamPool": _on_gpu,
}


def _shapes(**expected: tuple[int, ...]) -> Callable[[dict[str, Any]], None]:
    def check(ns: dict[str, Any]) -> None:
        assert {k: tuple(ns[k].shape) for k in expected} == expected

    return check


def _thread_pool_made(ns: dict[str, Any]) -> None:
    assert isinstance(ns["pool"], af.ThreadPool) and ns["pool"].workers == 2


def _metrics_registered(ns: dict[str, Any]) -> None:
    import prometheus_client

    names = {family.name for family in prometheus_client.REGISTRY.collect()}
    assert "aioforward_pool_capacity" in names  # the namespace's open pool is scraped


EXPECT: dict[str, Callable[[dict[str, Any]], None]] = {
    "aioforward": _shapes(y1=(64, 512), y2=(64, 256), y=(64, 512), ya=(8, 128), yb=(4, 64)),
    "ThreadPool": _thread_pool_made,
    "ProcessPool": _shapes(y1=(64, 128), y2=(64, 64)),
    "CudaStreamPool": _shapes(ya=(64, 512), yb=(64, 256)),
    "RayPool": _shapes(ya=(64, 512), yb=(64, 256)),
    "Batcher": _shapes(probs=(1000,)),
    "Metrics": _metrics_registered,
}


def skip_reason(block: Block) -> str | None:
    if "CudaStreamPool(" in block.source and not torch.cuda.is_available():
        return "needs a CUDA device (CudaStreamPool); this machine has none"
    if "RayPool(" in block.source and importlib.util.find_spec("ray") is None:
        return "needs the optional ray package: pip install 'aioforward[ray]'"
    return None


async def run_fragment(block: Block, ns: dict[str, Any]) -> None:
    """Run ``block`` in ``ns`` as a notebook would: top-level await on this loop; tracebacks
    name README.md and the block's own lines."""
    tree = ast.parse(block.source, "README.md")
    ast.increment_lineno(tree, block.line - 1)
    code = compile(tree, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, ns)  # a coroutine when the block awaits at top level
    if inspect.iscoroutine(result):
        await result


async def close_pools(*objects: object) -> None:
    for obj in objects:
        if isinstance(obj, af.Pool | af.Batcher):
            await obj.aclose()


async def exercise(block: Block) -> None:
    """Run fragment ``block`` in a fresh namespace, check what it made, close its pools."""
    ns = namespace()
    created = list(ns.values())
    try:
        override = section(block.heading, OVERRIDES)
        if override is not None:
            ns.update(override())
        await run_fragment(block, ns)
        check = section(block.heading, EXPECT)
        if check is not None:
            check(ns)
    finally:
        await close_pools(*created, *ns.values())


def needs_own_process(block: Block) -> bool:
    """A local Ray keeps log files and sockets open in its driver after ``ray.shutdown()``
    (Ray's own doing, not the pool's), which the suite's leak check would report."""
    return "RayPool(" in block.source


@pytest.mark.parametrize("block", blocks_of("fragment"))
async def test_fragment_runs(block: Block, tmp_path: Path) -> None:
    if reason := skip_reason(block):
        pytest.skip(reason)
    if not needs_own_process(block):
        await exercise(block)
        return
    with anyio.fail_after(120):  # the same, in a child: python tests/test_readme.py INDEX
        out = await anyio.run_process(
            [sys.executable, __file__, str(block.index)], cwd=tmp_path, env=clean_env(), check=False
        )
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 0, f"README.md line {block.line}:\n{stdout}\n{stderr}"
    assert stdout.strip().endswith(f"README block {block.index}: ok"), stdout


# --------------------------------------------------------------------------- programs


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH pointing into this checkout."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.parametrize("block", blocks_of("program"))
def test_program_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / f"readme_{block.id.replace('-', '_')}.py"
    script.write_text(block.source, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"README.md line {block.line}:\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr


# --------------------------------------------------------------------------- pytest files

STUB_CONFTEST = '''
"""What the README's test examples leave to the reader: an app and a client for it."""
import httpx
import pytest_asyncio
import torch
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import aioforward as af

model = torch.nn.Linear(16, 2)


async def predict(request):
    body = await request.json()
    x = torch.full((1, 16), float(len(body["text"])))
    return JSONResponse({"y": (await af.forward(model, x)).tolist()})


@pytest_asyncio.fixture
async def client():
    app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        yield client
'''

PYTEST_INI = "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
FILE_MARK = re.compile(r"^# (\w+\.py)\b")
GUARD = re.compile(r"^(\s*)async with .*loop_free.*:\s*$")
BLOCK_THE_LOOP = '__import__("time").sleep(0.3)  # blocks the event loop'


def split_files(source: str) -> dict[str, str]:
    """``# conftest.py`` / ``# test_app.py`` lines start files; the lines before the first
    (or the whole block, when there is none) go to ``test_readme_example.py``."""
    files: dict[str, list[str]] = {}
    name = "test_readme_example.py"
    for line in source.splitlines():
        if m := FILE_MARK.match(line):
            name = m.group(1)
            continue
        files.setdefault(name, []).append(line)
    return {k: "\n".join(v).strip() + "\n" for k, v in files.items() if "".join(v).strip()}


def blocking_variant(source: str) -> str:
    """``source`` with a 0.3 s sleep first in every ``async with ...loop_free...:`` body."""
    out, n = [], 0
    for line in source.splitlines():
        out.append(line)
        if m := GUARD.match(line):
            out.append(f"{m.group(1)}    {BLOCK_THE_LOOP}")
            n += 1
    assert n, "no `async with ...loop_free...:` to make block"
    return "\n".join(out) + "\n"


def test_split_and_blocking_variant() -> None:
    source = textwrap.dedent("""\
        # conftest.py
        import pytest
        # test_app.py: comment
        async def test_x(g):
            async with g.loop_free():
                pass
        """)
    files = split_files(source)
    assert files == {
        "conftest.py": "import pytest\n",
        "test_app.py": "async def test_x(g):\n    async with g.loop_free():\n        pass\n",
    }
    assert blocking_variant(files["test_app.py"]).splitlines()[2] == f"        {BLOCK_THE_LOOP}"
    assert split_files("def test_y(): pass\n") == {"test_readme_example.py": "def test_y(): pass\n"}


@pytest.mark.parametrize("block", blocks_of("pytest"))
def test_pytest_example_in_strict_mode(block: Block, tmp_path: Path) -> None:
    files = split_files(block.source)
    assert any(name.startswith("test_") for name in files), files
    (tmp_path / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")
    (tmp_path / "conftest.py").write_text(STUB_CONFTEST, encoding="utf-8")
    for variant in ("as_shown", "blocking"):
        (tmp_path / variant).mkdir()
        for name, text in files.items():
            if variant == "blocking" and name.startswith("test_"):
                text = blocking_variant(text)
            (tmp_path / variant / name).write_text(text, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA"]
        + ["-o", "asyncio_mode=strict", "--import-mode=importlib"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = out.stdout + out.stderr
    outcomes: dict[str, set[str]] = {"as_shown": set(), "blocking": set()}
    for outcome, variant in re.findall(r"^(\w+) (as_shown|blocking)/\S+::\S+", report, re.M):
        outcomes[variant].add(outcome)
    assert outcomes == {"as_shown": {"PASSED"}, "blocking": {"FAILED"}}, report
    assert "the event loop was blocked for" in report, report
    assert out.returncode == 1, report  # the blocking copy's failures, and nothing else


# --------------------------------------------------------------------------- the extraction


def test_every_block_is_found_and_classified() -> None:
    """A broken extractor must not pass vacuously: the README has blocks of every kind."""
    kinds = [b.kind for b in BLOCKS]
    assert len(BLOCKS) >= 8, [b.id for b in BLOCKS]
    assert kinds.count("program") >= 1 and kinds.count("pytest") >= 2, kinds
    assert kinds.count("fragment") >= 6, kinds
    assert BLOCKS[0].heading == "aioforward" and "run_parallel" in BLOCKS[0].source
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)
    fragments = [b.heading for b in BLOCKS if b.kind == "fragment"]
    for table in (OVERRIDES, EXPECT):
        for key in table:  # a renamed section must not silently lose its stand-ins or checks
            assert sum(h.startswith(key) for h in fragments) == 1, (key, fragments)


if __name__ == "__main__":  # python tests/test_readme.py INDEX: one fragment, in this process
    import asyncio

    index = int(sys.argv[1])
    asyncio.run(exercise(BLOCKS[index]))
    print(f"README block {index}: ok")
