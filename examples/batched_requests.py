"""Many clients, one sample each: a Batcher turns them into a few batched forward passes."""

import asyncio
import time

import torch

import aioforward as af


async def main() -> None:
    classifier = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
    )
    requests = [torch.randn(1024) for _ in range(500)]  # one sample per client, no batch dim

    async with af.ThreadPool(workers=2) as pool, af.Batcher(classifier, pool) as batcher:

        async def client(x: torch.Tensor) -> int:
            logits = await batcher(x)  # this client's row of a batched forward pass
            return int(logits.argmax())

        t0 = time.perf_counter()
        labels = await asyncio.gather(*(client(x) for x in requests))
        elapsed = time.perf_counter() - t0
        s = batcher.stats()
    print(f"{len(labels)} answers in {elapsed * 1e3:.0f} ms")
    print(f"{s.batches} forward passes, mean batch {s.samples / s.batches:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
