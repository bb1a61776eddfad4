"""CudaStreamPool: RELIABILITY.md scenarios 24-28. Without a GPU only scenario 24 can run;
the others skip with the reason."""

from __future__ import annotations

import pytest
import torch

import aioforward as af
from aioforward.pools.cuda import cuda_unavailable_reason

from . import models as M

pytestmark = pytest.mark.anyio

NO_CUDA = cuda_unavailable_reason()
needs_cuda = pytest.mark.skipif(NO_CUDA is not None, reason=f"needs a CUDA GPU: {NO_CUDA}")


async def test_s24_without_cuda_device_error_with_reason_and_cpu_pools_unaffected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if NO_CUDA is None:  # on a GPU machine, hide the GPU the way a CPU-only host looks
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(af.DeviceError, match=r"CudaStreamPool needs CUDA: .*torch") as info:
        af.CudaStreamPool()
    assert (cuda_unavailable_reason() or "") in str(info.value)
    assert isinstance(info.value, af.AioforwardError)
    y = await af.forward(M.Tiny(), torch.zeros(1, 10))  # the default (CPU) pool still works
    assert y.shape == (1, 5)


@needs_cuda
async def test_results_equal_direct_and_cpu_inputs_are_moved() -> None:
    m = M.Tiny().cuda()
    x = torch.randn(4, 10)
    async with af.CudaStreamPool(workers=2) as pool:
        y = await pool.forward(m, x)  # a CPU input goes up to the module's device
        assert y.device.type == "cuda"
        with torch.inference_mode():
            torch.testing.assert_close(y, m(x.cuda()))
    async with af.CudaStreamPool(to_cpu=True) as pool:
        y = await pool.forward(m, x.cuda())
        assert y.device.type == "cpu"


@needs_cuda
async def test_s25_module_or_input_on_another_device_is_a_device_error() -> None:
    async with af.CudaStreamPool() as pool:
        with pytest.raises(af.DeviceError, match=r"module Tiny has a tensor on cpu"):
            pool.submit(M.Tiny(), torch.zeros(1, 10))
        assert pool.stats().busy == 0  # refused before a slot was reserved
        if torch.cuda.device_count() > 1:
            with pytest.raises(af.DeviceError, match=r"cuda:1 .* cuda:0"):
                await pool.forward(M.Tiny().cuda(0), torch.zeros(1, 10, device="cuda:1"))


@needs_cuda
async def test_s28_two_modules_on_separate_streams_equal_the_serial_run() -> None:
    torch.manual_seed(0)
    m1, m2 = M.mlp(512, 4).cuda(), M.mlp(512, 4).cuda()
    xs = [torch.randn(64, 512, device="cuda") for _ in range(50)]
    with torch.inference_mode():
        expected = [(m1(x), m2(x)) for x in xs]
    async with af.CudaStreamPool(workers=4) as pool, af.LoopLagMonitor() as lag:
        for x, (e1, e2) in zip(xs, expected, strict=True):
            y1, y2 = await pool.run_parallel(m1, m2, x)
            del x  # freed while the streams may still read it: record_stream keeps it safe
            torch.testing.assert_close(y1, e1)
            torch.testing.assert_close(y2, e2)
    assert lag.stats().p99 < 0.02, lag.stats()


@needs_cuda
async def test_s26_cuda_initialised_in_parent_then_process_pool_works() -> None:
    torch.zeros(1, device="cuda")  # CUDA is initialised in this process now
    async with af.ProcessPool(workers=1) as pool:
        assert (await pool.forward(M.Echo(), 5))[0] == (5,)
