"""The engine loop behind the HTTP server: requests join the running batch as they arrive.

One asyncio task owns the `LLMEngine`. Between steps it admits the requests that arrived and aborts
those whose clients left (their KV blocks go back to the pool at once); then it runs `step()` on a
worker thread, so the event loop keeps serving HTTP while the model runs, and hands every request
its new tokens. The engine is touched only by that task or by the one step it awaits, never by two
threads at once. An engine that fails (a tensor-parallel worker died) fails every request with
`EngineDeadError` and refuses new ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence as SequenceOf
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams
from engine.server.requests import EngineDeadError, RequestHandle


@dataclass(slots=True)
class _Admission:
    handle: RequestHandle
    prompt: str | list[int]
    params: SamplingParams
    accepted: asyncio.Future


class AsyncEngine:
    """Serves `LLMEngine` to many concurrent callers on one event loop (continuous batching).

    `start()` inside the running loop, `add(...)` per request, `shutdown()` at the end.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self.started_at = time.time()
        self.num_finished_requests = 0
        self.num_aborted_requests = 0
        self._handles: dict[str, RequestHandle] = {}
        self._streaming: dict[str, RequestHandle] = {}
        self._admissions: deque[_Admission] = deque()
        self._aborts: deque[str] = deque()
        self._stepping = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread: steps run one at a time, always on the same thread (CUDA streams, torch threads).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="porter-engine-step")

    @property
    def num_requests(self) -> int:
        """Requests the server holds: admitted or waiting to be."""
        return len(self._handles)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="porter-engine-loop")

    async def shutdown(self) -> None:
        """Stops the loop, fails what is still running, and shuts the engine (and its workers) down."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._fail_all(EngineDeadError("the server is shutting down"))
        await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.shutdown)
        self._executor.shutdown(wait=True)

    async def add(
        self, request_id: str, prompt: str | SequenceOf[int], params: SamplingParams, stream: bool = False
    ) -> RequestHandle:
        """Queues a request for the next step; returns once the engine has accepted it.

        Raises ValueError for a request the engine refuses (prompt too long, token ids outside the
        vocabulary, more KV blocks than the cache holds) and EngineDeadError once the engine failed.
        """
        if self.error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.error}")
        if request_id in self._handles:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self._wakeup is None:
            raise RuntimeError("AsyncEngine.start() was not called")
        handle = RequestHandle(request_id, stream, self.abort)
        accepted = asyncio.get_running_loop().create_future()
        self._handles[request_id] = handle
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        self._admissions.append(_Admission(handle, prompt, params, accepted))
        self._wakeup.set()
        try:
            await accepted
        except BaseException:
            handle.abort()
            raise
        return handle

    def abort(self, request_id: str) -> None:
        """Drops a request before the next step (its client is gone)."""
        if request_id in self._handles and self._wakeup is not None:
            self._aborts.append(request_id)
            self._wakeup.set()

    def check_health(self) -> None:
        """Raises EngineDeadError if the engine failed, or (between steps) if a worker process died."""
        if self.error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.error}")
        workers = self.engine.driver.workers
        if workers is not None and not self._stepping:
            try:
                workers.check()
            except Exception as error:
                self._die(error)
                raise EngineDeadError(f"the engine has stopped: {error}") from None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        try:
            while True:
                self._apply_aborts()
                self._admit()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.clear()
                    if not self._admissions and not self._aborts:
                        await self._wakeup.wait()
                    continue
                self._stepping = True
                try:
                    finished = await loop.run_in_executor(self._executor, self.engine.step)
                finally:
                    self._stepping = False
                self._publish(finished)
                await asyncio.sleep(0)  # let handlers run between steps even under constant load
        except Exception as error:  # the step failed: no request can run on this engine any more
            self._die(error)

    def _die(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._fail_all(EngineDeadError(f"the engine has stopped: {error}"))

    def _fail_all(self, error: EngineDeadError) -> None:
        for admission in self._admissions:
            if not admission.accepted.done():
                admission.accepted.set_exception(error)
        self._admissions.clear()
        for handle in self._handles.values():
            handle.fail(error)
        self._handles.clear()
        self._streaming.clear()

    def _apply_aborts(self) -> None:
        while self._aborts:
            request_id = self._aborts.popleft()
            if self._handles.pop(request_id, None) is None:
                continue
            self._streaming.pop(request_id, None)
            self.engine.abort_request(request_id)
            self.num_aborted_requests += 1

    def _admit(self) -> None:
        while self._admissions:
            admission = self._admissions.popleft()
            handle = admission.handle
            if handle.finished:  # aborted while it waited (its add was cancelled)
                self._handles.pop(handle.request_id, None)
                continue
            try:
                self.engine.add_request(handle.request_id, admission.prompt, admission.params)
            except Exception as error:
                self._handles.pop(handle.request_id, None)
                handle.finished = True
                if not admission.accepted.done():
                    admission.accepted.set_exception(error)
                continue
            if handle.stream:
                handle.start_streaming(admission.params, self.engine.tokenizer)
                self._streaming[handle.request_id] = handle
            if not admission.accepted.done():
                admission.accepted.set_result(None)

    def _publish(self, finished: list[RequestOutput]) -> None:
        for output in finished:
            handle = self._handles.pop(output.request_id, None)
            self._streaming.pop(output.request_id, None)
            if handle is not None:
                self.num_finished_requests += 1
                handle.complete(output)
        for request_id, handle in self._streaming.items():
            handle.progress(self.engine.sequences(request_id))
