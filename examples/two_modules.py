"""The seed question answered: run two modules at once without blocking the event loop."""

import asyncio

import torch

import aioforward as af


async def main() -> None:
    encoder_a = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
    encoder_b = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Tanh())
    x = torch.randn(64, 512)

    async with af.ThreadPool(workers=2) as pool:
        ya, yb = await af.run_parallel(encoder_a, encoder_b, x, pool=pool)
    print("outputs:", tuple(ya.shape), tuple(yb.shape))


if __name__ == "__main__":
    asyncio.run(main())
