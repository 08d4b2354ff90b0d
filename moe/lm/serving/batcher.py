"""`MicroBatcher`: concurrent requests' queries in shared model calls."""

import asyncio
import collections
import concurrent.futures
import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class _Pending:
    texts: list[str]
    top: int
    future: asyncio.Future
    arrived: float


class MicroBatcher:
    """Runs the queries of concurrent requests in shared model calls.

    A request waits at most `max_wait_s` (counted from the oldest waiting
    request) for others to join its call, or less once `max_batch`
    instances wait; a request's instances are never split across calls.
    Calls run one at a time in a single worker thread, so the event loop
    keeps accepting requests while the model runs, and requests arriving
    meanwhile form the next call.

    Args:
        predict: `(texts, top) -> list of per-text results` (blocking), e.g.
            `NextWordPredictor.explain`; each result's `"top"` list is cut
            to the request's own `top`.
        max_batch: most instances per call.
        max_wait_s: longest wait for a call to fill.

    Example:
        batcher = MicroBatcher(predictor.explain, 64, 0.002)
        batcher.start()
        results = await batcher.submit(["how are"], top=3)
        await batcher.stop()
    """

    def __init__(self, predict: Callable, max_batch: int, max_wait_s: float):
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.requests = 0
        self.instances = 0
        self.model_calls = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Starts the batching task (inside the running event loop)."""
        self._wakeup = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="moe-predict"
        )
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stops the task; requests still waiting get an error."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("server stopping"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, texts: list[str], top: int) -> list[dict]:
        """The results of `texts`, computed in a shared model call."""
        future = asyncio.get_running_loop().create_future()
        loop_time = asyncio.get_running_loop().time()
        self._pending.append(_Pending(texts, top, future, loop_time))
        self.requests += 1
        self.instances += len(texts)
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if not self._pending:
                self._wakeup.clear()
                continue
            # Wait for company, bounded from the oldest request's arrival.
            deadline = self._pending[0].arrived + self.max_wait_s
            while self._waiting_instances() < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if not self._pending:
                self._wakeup.clear()
            await self._compute(loop, batch)

    def _waiting_instances(self) -> int:
        return sum(len(p.texts) for p in self._pending)

    def _take_batch(self) -> list[_Pending]:
        batch = [self._pending.popleft()]  # always at least one request
        size = len(batch[0].texts)
        while self._pending and size + len(self._pending[0].texts) <= (
            self.max_batch
        ):
            batch.append(self._pending.popleft())
            size += len(batch[-1].texts)
        return batch

    async def _compute(self, loop, batch: list[_Pending]) -> None:
        texts = [text for pending in batch for text in pending.texts]
        top = max(pending.top for pending in batch)
        self.model_calls += 1
        try:
            results = await loop.run_in_executor(
                self._executor, self.predict, texts, top
            )
        except Exception as e:  # a bug: every request of the call gets it
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(e)
            return
        start = 0
        for pending in batch:
            rows = results[start : start + len(pending.texts)]
            start += len(pending.texts)
            if pending.top < top:
                rows = [{**r, "top": r["top"][: pending.top]} for r in rows]
            if not pending.future.done():  # not given up by the client
                pending.future.set_result(rows)
