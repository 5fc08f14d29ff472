"""Tensor-parallel ranks 1..N-1: processes that mirror every step the driver (rank 0) runs.

Two ways to get them:
- `WorkerGroup` (what `LLM(tensor_parallel_size=N)` uses): the driver spawns N-1 processes and sends
  each step over one Pipe per worker. A worker that fails sends its traceback back and exits, and the
  driver raises `WorkerError` with that message (on NCCL, which does not notice a dead peer, a watchdog
  thread aborts the group so the driver's pending collective fails at once).
- torchrun: every rank runs the user's script. Rank 0 drives; the others call `serve` with a
  `BroadcastChannel`, which receives each step through `broadcast_object_list` on a gloo group (host
  pickles, so the GPU stream is not involved).

Messages (tuples, first item is the kind): ("step", StepInputs), ("shutdown",) and, under torchrun,
("end", outputs) driver -> workers; over the pipes, ("loaded",), ("ready", num_kv_blocks) and
("error", rank, traceback) worker -> driver.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import pickle
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import distributed
from engine.config import EngineConfig
from engine.model_runner import ModelRunner, StepInputs

try:  # experimental in torch; without it a failed NCCL worker surfaces only at NCCL's timeout
    from torch.distributed.distributed_c10d import _abort_process_group
except ImportError:
    _abort_process_group = None

# How long a worker gets to leave on its own after "shutdown" before it is terminated.
_SHUTDOWN_GRACE_S = 10.0
# How long to wait for a worker's error message once a collective failed (it is usually already sent).
_ERROR_REPORT_WAIT_S = 5.0


class WorkerError(RuntimeError):
    """A tensor-parallel worker process failed; the message carries its rank and traceback."""


def serve(runner: ModelRunner, receive: Callable[[], tuple]) -> Any:
    """Runs steps as they arrive until ("shutdown",) or ("end", payload); returns the payload (or None)."""
    while True:
        message = receive()
        kind = message[0]
        if kind == "step":
            runner.execute_model(message[1])
        elif kind == "shutdown":
            return None
        elif kind == "end":
            return message[1]
        else:
            raise RuntimeError(f"worker got an unknown message {kind!r}")


def _worker_main(
    config_bytes: bytes, rank: int, init_method: str, conn: multiprocessing.connection.Connection
) -> None:
    """Entry point of a spawned worker: join the group, load, size the cache, then serve steps."""
    try:
        # Unpickled here rather than by multiprocessing, so a model class that does not import in the
        # child is reported as an error message instead of a silent exit.
        config: EngineConfig = pickle.loads(config_bytes)
        distributed.init_distributed(rank, config.tensor_parallel_size, init_method, _backend(config))
        runner = ModelRunner(config, rank)
        conn.send(("loaded",))
        conn.send(("ready", runner.initialize_kv_cache()))
        serve(runner, conn.recv)
    except (EOFError, KeyboardInterrupt):
        pass  # the driver went away or was interrupted: nothing left to report to
    except BaseException:
        try:
            conn.send(("error", rank, traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
        # Leave at once: tearing down a group mid-collective can block (NCCL), and under gloo our exit
        # is what makes rank 0's pending collective fail instead of wait.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    conn.close()
    distributed.destroy_distributed()


def _defined_in_main(model_class: Any) -> bool:
    """Whether the model class lives in the parent's `__main__` (a class defined in the user's script)."""
    return getattr(model_class, "__module__", None) == "__main__"


@contextlib.contextmanager
def _main_script_hidden_from_spawn() -> Iterator[None]:
    """Starts spawned children without re-running the parent's `__main__`.

    multiprocessing's spawn runs the parent's script again in every child (as `__mp_main__`) so that
    what the script defines can be unpickled there; a script without an `if __name__ == "__main__":`
    guard would build a second LLM inside each worker, which fails. The workers need nothing from the
    script unless the model class is defined in it, so spawn is not told where the script is.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: vars(main)[name] for name in ("__spec__", "__file__") if name in vars(main)}
    main.__spec__ = None  # spawn re-imports a module run with -m by its name, a script by its path
    vars(main).pop("__file__", None)
    try:
        yield
    finally:
        vars(main).update(saved)
        if "__spec__" not in saved:
            del main.__spec__


def _backend(config: EngineConfig) -> str:
    return "nccl" if config.device == "cuda" else "gloo"


class WorkerGroup:
    """The spawned processes for ranks 1..N-1 and the driver's end of their pipes."""

    def __init__(self, config: EngineConfig, init_method: str) -> None:
        self.init_method = init_method
        context = mp.get_context("spawn")
        config_bytes = pickle.dumps(config)
        self.processes: list[Any] = []
        self.connections: list[multiprocessing.connection.Connection] = []
        needs_main = _defined_in_main(config.model_class)
        # A worker that dies before it can report is, when it must run the script, almost always a
        # script that builds its LLM at import time.
        self._exit_hint = (
            '; if your script builds the LLM at import time, put that under `if __name__ == "__main__":`'
            if needs_main
            else ""
        )
        for rank in range(1, config.tensor_parallel_size):
            driver_end, worker_end = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(config_bytes, rank, init_method, worker_end),
                name=f"porter-tp-worker-{rank}",
                daemon=True,
            )
            with contextlib.nullcontext() if needs_main else _main_script_hidden_from_spawn():
                process.start()
            worker_end.close()  # the child holds its own copy; closing ours lets recv see EOF when it dies
            self.processes.append(process)
            self.connections.append(driver_end)
        self._pending: list[deque[tuple]] = [deque() for _ in self.connections]
        self._lock = threading.Lock()  # the driver's watchdog thread checks the pipes too
        self._closed = False

    def wait_for(self, kind: str, poll_s: float = 0.05) -> list[tuple]:
        """Waits until every worker has sent a `kind` message; raises WorkerError if one fails or dies."""
        replies: list[tuple | None] = [None] * len(self.connections)
        while True:
            self.check()
            for index, pending in enumerate(self._pending):
                if replies[index] is None and pending:
                    message = pending.popleft()
                    if message[0] != kind:
                        raise WorkerError(f"worker rank {index + 1} sent {message[0]!r}, expected {kind!r}")
                    replies[index] = message
            if all(reply is not None for reply in replies):
                return replies  # type: ignore[return-value]
            time.sleep(poll_s)

    def send(self, message: tuple) -> None:
        """Sends one message to every worker; a worker that already failed is reported instead."""
        self.check()
        for index, conn in enumerate(self.connections):
            try:
                conn.send(message)
            except (BrokenPipeError, OSError):
                self.check(wait_s=_ERROR_REPORT_WAIT_S)
                raise WorkerError(f"tensor-parallel worker rank {index + 1} is gone") from None

    def check(self, wait_s: float = 0.0) -> None:
        """Raises WorkerError if a worker reported a failure or died; `wait_s` gives a report time to arrive.

        Other messages that arrive meanwhile are kept, in order, for `wait_for`.
        """
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                for index in range(len(self.connections)):
                    self._drain(index)
            for index, process in enumerate(self.processes):
                if not process.is_alive():
                    self._drain(index)
                    raise WorkerError(
                        f"tensor-parallel worker rank {index + 1} exited with code {process.exitcode} "
                        f"without reporting an error (see its stderr){self._exit_hint}"
                    )
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _drain(self, index: int) -> None:
        """Reads every message waiting on worker `index`'s pipe; an error report raises WorkerError."""
        conn = self.connections[index]
        try:
            while conn.poll():
                message = conn.recv()
                if message[0] == "error":
                    _, rank, worker_traceback = message
                    raise WorkerError(f"tensor-parallel worker rank {rank} failed:\n{worker_traceback}")
                self._pending[index].append(message)
        except (EOFError, OSError):
            return  # closed: the process-liveness check reports it

    def shutdown(self, grace_s: float = _SHUTDOWN_GRACE_S) -> None:
        """Asks every worker to leave, waits up to `grace_s`, then terminates (then kills) any still there.

        A grace of 0 is for a driver that failed mid-step: the workers may be stuck in a collective.
        """
        if self._closed:
            return
        self._closed = True
        for conn in self.connections:
            try:
                conn.send(("shutdown",))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=2.0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.connections:
            conn.close()


class BroadcastChannel:
    """Driver-to-ranks messages for torchrun, over a gloo group every rank created in the same order."""

    def __init__(self) -> None:
        # new_group is itself a collective: every rank constructs its channel at the same point.
        self.group = dist.new_group(backend="gloo")

    def send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> tuple:
        holder: list[Any] = [None]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]


def torchrun_environment() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun with several ranks, else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world_size, int(os.environ.get("LOCAL_RANK", rank))


class Driver:
    """Rank 0's handle on every rank: runs each step on all of them and shuts them down.

    With no other ranks it just runs the local model; with spawned workers it sends them each step over
    their pipes; under torchrun it broadcasts each step to the ranks waiting in `serve`.
    """

    def __init__(
        self, runner: ModelRunner, workers: WorkerGroup | None = None, channel: BroadcastChannel | None = None
    ) -> None:
        self.runner = runner
        self.workers = workers
        self.channel = channel
        self._step_in_flight = False
        self._closed = False
        self._worker_error: WorkerError | None = None
        if workers is not None and runner.device.type == "cuda":
            threading.Thread(target=self._watch_workers, name="porter-tp-watchdog", daemon=True).start()

    def execute(self, step: StepInputs) -> torch.Tensor:
        """One forward on every rank; returns rank 0's logits `[num_seqs, vocab]`."""
        if self._closed:
            raise RuntimeError("the engine has been shut down")
        self._step_in_flight = True
        try:
            if self.workers is not None:
                self.workers.send(("step", step))
            if self.channel is not None:
                self.channel.send(("step", step))
            logits = self.runner.execute_model(step)
            if self._worker_error is not None:
                raise self._worker_error
        except Exception:
            if self.workers is None and self.channel is None:
                self._step_in_flight = False
                raise
            # A collective broke midway, so the group is unusable: stop every rank. A worker that
            # failed is why; its traceback is the useful error, so raise that when it arrives.
            try:
                if self._worker_error is not None:
                    raise self._worker_error from None
                if self.workers is not None:
                    self.workers.check(wait_s=_ERROR_REPORT_WAIT_S)
            finally:
                self.shutdown()
            raise
        self._step_in_flight = False
        return logits

    def _watch_workers(self) -> None:
        """NCCL does not notice a dead peer: rank 0 would wait in its collective until NCCL's own
        timeout (minutes). While a step runs, this thread watches the workers; when one fails it keeps
        the error and aborts the process group, so the step fails now and `execute` raises that error."""
        while not self._closed:
            time.sleep(0.1)
            if not self._step_in_flight or self._worker_error is not None:
                continue
            try:
                self.workers.check()  # type: ignore[union-attr]
            except WorkerError as error:
                self._worker_error = error
                if _abort_process_group is not None and dist.is_initialized():
                    _abort_process_group()

    def end_generate(self, payload: Any) -> None:
        """Under torchrun, hands the finished outputs to the other ranks (their `generate` returns them)."""
        if self.channel is not None:
            self.channel.send(("end", payload))

    def shutdown(self) -> None:
        """Stops the other ranks (terminating any stuck in an interrupted step) and leaves the group."""
        if self._closed:
            return
        self._closed = True
        if self.workers is not None:
            self.workers.shutdown(grace_s=0.0 if self._step_in_flight else _SHUTDOWN_GRACE_S)
        if self.channel is not None and not self._step_in_flight:
            self.channel.send(("shutdown",))
        self.runner.close()
        broken = self._step_in_flight
        if (
            broken
            and _abort_process_group is not None
            and dist.is_initialized()
            and dist.get_backend() == "nccl"
        ):
            _abort_process_group()  # destroying a NCCL group that is stuck mid-collective blocks
        distributed.destroy_distributed()


def start_driver(config: EngineConfig) -> Driver:
    """Brings up every rank for `config` with this process as rank 0, loads the model, sizes the cache.

    Spawned workers run this process's `__main__` script only when the model class is defined in
    it; a script that does so and builds an LLM with tensor_parallel_size > 1 must build it under
    `if __name__ == "__main__":`.
    """
    if config.tensor_parallel_size > 1 and getattr(mp.current_process(), "_inheriting", False):
        # This is a worker re-running the user's script while it starts (multiprocessing's spawn).
        raise RuntimeError(
            "a tensor-parallel worker, running your script to find the model class defined in it, "
            'reached the LLM(...) call: put that call under `if __name__ == "__main__":`'
        )
    launched = torchrun_environment()
    _check_no_other_group(config.tensor_parallel_size, allow_same_size=launched is not None)
    if launched is not None:
        rank, world_size, local_rank = launched
        if rank != 0:
            raise RuntimeError("start_driver runs on rank 0; other torchrun ranks call start_follower")
        distributed.init_distributed(0, world_size, "env://", _backend(config))
        channel = BroadcastChannel()
        runner = ModelRunner(config, 0, device_index=local_rank)
        runner.initialize_kv_cache()
        return Driver(runner, channel=channel)
    if config.tensor_parallel_size == 1:
        runner = ModelRunner(config, 0)
        runner.initialize_kv_cache()
        return Driver(runner)

    previous_num_threads = torch.get_num_threads()  # ModelRunner lowers it for CPU ranks
    workers = WorkerGroup(config, f"tcp://127.0.0.1:{distributed.find_free_port()}")
    try:
        _join_group_watching(workers, config)
        runner = ModelRunner(config, 0)
        workers.wait_for("loaded")  # every rank built its model: the collectives below cannot strand one
        runner.initialize_kv_cache()
        workers.wait_for("ready")
    except BaseException:
        workers.shutdown(grace_s=0.0)
        distributed.destroy_distributed()
        torch.set_num_threads(previous_num_threads)
        raise
    return Driver(runner, workers=workers)


def _check_no_other_group(world_size: int, allow_same_size: bool) -> None:
    """The layers read rank and size from the one default process group, so a process runs one
    tensor-parallel engine at a time; a group already there (another LLM not shut down) is refused."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    existing = dist.get_world_size()
    if allow_same_size and existing == world_size:
        return  # torchrun: the script may have joined the group itself
    raise RuntimeError(
        f"this process is already in a torch.distributed group of {existing} ranks, and an engine of "
        f"tensor_parallel_size {world_size} cannot share it: shut the other LLM down first"
    )


def _join_group_watching(workers: WorkerGroup, config: EngineConfig) -> None:
    """init_distributed for rank 0, which blocks until every rank joins, while watching the workers.

    A worker that dies before joining would otherwise leave the driver waiting out the rendezvous
    timeout (30 minutes); here its error is raised as soon as it arrives.
    """
    errors: list[BaseException] = []

    def join() -> None:
        try:
            distributed.init_distributed(
                0, config.tensor_parallel_size, workers.init_method, _backend(config)
            )
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=join, name="porter-tp-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.05)
        workers.check()
    if errors:
        raise errors[0]


def start_follower(config: EngineConfig) -> tuple[ModelRunner, BroadcastChannel]:
    """A torchrun rank other than 0: join the group, load, size the cache; then `serve` its channel."""
    launched = torchrun_environment()
    if launched is None or launched[0] == 0:
        raise RuntimeError("start_follower runs on torchrun ranks other than 0")
    rank, world_size, local_rank = launched
    _check_no_other_group(world_size, allow_same_size=True)
    distributed.init_distributed(rank, world_size, "env://", _backend(config))
    channel = BroadcastChannel()
    runner = ModelRunner(config, rank, device_index=local_rank)
    runner.initialize_kv_cache()
    return runner, channel
