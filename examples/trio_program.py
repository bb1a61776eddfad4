"""The same API under trio: a nursery of requests sharing one pool.

Needs trio (`pip install 'aioforward[trio]'`).
"""

import torch
import trio

import aioforward as af


async def main() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    results: list[torch.Tensor] = []

    async with af.ThreadPool(workers=2) as pool:

        async def one(i: int) -> None:
            results.append(await pool.forward(model, torch.full((1, 32), float(i)), timeout=10))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
    print(f"{len(results)} results, each of shape {tuple(results[0].shape)}")


if __name__ == "__main__":
    trio.run(main)
