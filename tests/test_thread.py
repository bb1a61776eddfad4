"""ThreadPool specifics: torch thread budget, no_grad results like a direct call's, grad=True."""

from __future__ import annotations

import pytest
import torch

import aioforward as af

from .models import Block, Tiny

pytestmark = pytest.mark.anyio


class Probe(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[bool, bool, int]:
        return torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.get_num_threads()


async def test_no_grad_by_default_and_thread_budget() -> None:
    before = torch.get_num_threads()
    async with af.ThreadPool(workers=1, threads_per_worker=2) as pool:
        inference, grad, threads = await pool.forward(Probe(), torch.zeros(1))
    assert not inference and not grad and threads == 2
    assert torch.get_num_threads() == before  # restored on close


async def test_default_budget_divides_usable_cpus() -> None:
    async with af.ThreadPool(workers=af.usable_cpus()) as pool:
        _, _, threads = await pool.forward(Probe(), torch.zeros(1))
    assert threads == 1


async def test_grad_true_runs_with_autograd() -> None:
    m = Tiny()
    x = torch.randn(2, 10)
    async with af.ThreadPool(workers=1, grad=True) as pool:
        y = await pool.forward(m, x)
    assert y.requires_grad
    y.sum().backward()
    assert m.a.weight.grad is not None


async def test_train_eval_mode_left_as_user_set() -> None:
    m = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    async with af.ThreadPool(workers=1) as pool:
        m.eval()
        assert torch.equal(await pool.forward(m, x), x)
        m.train()
        assert not torch.equal(await pool.forward(m, x), x)


def test_threads_per_worker_zero_leaves_torch_alone() -> None:
    torch.set_num_threads(1)
    with af.ThreadPool(workers=2, threads_per_worker=0) as pool:
        assert pool.submit(Probe(), torch.zeros(1)).result(5)[2] == 1
        assert torch.get_num_threads() == 1


def test_keep_freed_memory_keeps_freed_blocks() -> None:
    """In a fresh process: a freed 200 MB tensor goes back to the kernel by default and
    stays in the heap for reuse after keep_freed_memory()."""
    import subprocess
    import sys

    code = (
        "import sys, psutil, torch, aioforward as af\n"
        "if sys.argv[1] == 'keep': assert af.keep_freed_memory()\n"
        "p = psutil.Process(); before = p.memory_info().rss\n"
        "t = torch.ones(50_000_000); del t\n"
        "print((p.memory_info().rss - before) // 2**20)\n"
    )
    grown = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", code, mode],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        )
        for mode in ("default", "keep")
    }
    assert grown["default"] < 50 and grown["keep"] > 150, grown


async def test_a_checked_stack_keeps_its_name() -> None:
    """The cancellation checks swap a stack's class while the pool holds it: its repr and the
    errors that name it keep the user's class name (a timeout used to say
    ``_CheckedSequential did not finish within its timeout``)."""
    stack = torch.nn.Sequential(*[Block(i, 0.05, None) for i in range(10)])
    async with af.ThreadPool(workers=1, cancel_grace=5) as pool:
        with pytest.raises(TimeoutError, match=r"^Sequential did not finish"):
            await pool.forward(stack, torch.zeros(1, 8), timeout=0.1)
        assert type(stack).__name__ == "Sequential" and repr(stack).startswith("Sequential(")
