"""`LLM`: offline batched generation over a local model directory, the engine's user-facing API.

    llm = LLM("path/to/model", tensor_parallel_size=2)
    outputs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=32))

Under torchrun every rank runs the same script: rank 0 drives the engine, the other ranks serve its
steps inside `generate` and return the same outputs.
"""

from __future__ import annotations

import atexit
import itertools
import weakref
from collections.abc import Sequence as SequenceOf
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine import distributed
from engine.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig
from engine.llm_engine import CompletionOutput, LLMEngine, RequestOutput, prepare_config
from engine.model_loader import load_hf_config
from engine.sampling_params import SamplingParams
from engine.worker import serve, start_follower, torchrun_environment

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]

# Fewer requests than this finish too fast for a progress bar to say anything.
_PROGRESS_MIN_REQUESTS = 8

Prompts = str | SequenceOf[str] | SequenceOf[int] | SequenceOf[SequenceOf[int]]


class LLM:
    """A model loaded on `tensor_parallel_size` devices, ready to `generate`.

    device: "auto" (CUDA when available), "cpu" or "cuda". dtype: "auto" (the checkpoint's, else
    float32 on CPU / bfloat16 on CUDA), a name, or a torch.dtype. Further keyword arguments are
    EngineConfig fields (max_model_len, gpu_memory_utilization, enable_prefix_caching, enforce_eager,
    trust_remote_code for a directory whose config.json names its own configuration code).
    Use as a context manager, or call `shutdown()`, to stop worker processes promptly; they are also
    stopped at exit.
    """

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        dtype: Any = "auto",
        device: str = "auto",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        seed: int = 0,
        model_class: Any = None,
        **kwargs: Any,
    ) -> None:
        launched = torchrun_environment()
        if launched is not None:
            world_size = launched[1]
            if tensor_parallel_size not in (1, world_size):
                raise ValueError(
                    f"tensor_parallel_size ({tensor_parallel_size}) differs from torchrun's WORLD_SIZE ({world_size})"
                )
            tensor_parallel_size = world_size
        config = EngineConfig(
            model=str(model),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            device=device,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            seed=seed,
            model_class=model_class,
            **kwargs,
        )
        self.engine: LLMEngine | None = None
        self._follower = None
        self._request_ids = itertools.count()
        if launched is not None and launched[0] != 0:
            self.config = prepare_config(config, load_hf_config(config.model, config.trust_remote_code))
            self._follower = start_follower(self.config)
        else:
            self.engine = LLMEngine(config)
            self.config = self.engine.config
        self._closed = False
        # A weak reference, so registering for exit does not keep the LLM (and its GPUs) alive.
        self._exit_hook = _shutdown_at_exit(weakref.ref(self))
        atexit.register(self._exit_hook)

    @property
    def tokenizer(self) -> Any | None:
        return None if self.engine is None else self.engine.tokenizer

    def generate(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        show_progress: bool = True,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Completes every prompt; returns one RequestOutput per prompt, in the order given.

        prompts: a string, a list of strings, a list of token ids, or a list of token-id lists.
        sampling_params: one for all prompts, or one per prompt; None means SamplingParams().
        use_tqdm: vLLM's name for show_progress (the bar is rich's, shown for more than a few prompts).
        """
        if self._closed:
            raise RuntimeError("this LLM has been shut down")
        if self._follower is not None:
            runner, channel = self._follower
            result = serve(runner, channel.receive)
            if isinstance(result, BaseException):
                raise result
            return result
        assert self.engine is not None
        prompt_list = _normalize_prompts(prompts)
        params_list = _normalize_params(sampling_params, len(prompt_list))
        show = (show_progress if use_tqdm is None else use_tqdm) and len(
            prompt_list
        ) >= _PROGRESS_MIN_REQUESTS
        request_ids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                request_id = str(next(self._request_ids))
                self.engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
            finished = self._run(len(prompt_list), show)
        except BaseException as error:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            if not isinstance(error, KeyboardInterrupt):
                # Under torchrun the other ranks wait in generate(); tell them it failed, and why.
                self.engine.driver.end_generate(RuntimeError(f"rank 0 failed in generate: {error!r}"))
            raise
        outputs = [finished[request_id] for request_id in request_ids]
        self.engine.driver.end_generate(outputs)
        return outputs

    def _run(self, total: int, show: bool) -> dict[str, RequestOutput]:
        assert self.engine is not None
        finished: dict[str, RequestOutput] = {}
        progress = Progress(
            TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not show
        )
        with progress:
            task = progress.add_task("generate", total=total)
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    finished[output.request_id] = output
                    progress.advance(task)
        return finished

    @property
    def num_preemptions(self) -> int:
        """Sequences preempted (and recomputed) since the engine started."""
        return 0 if self.engine is None else self.engine.num_preemptions

    def shutdown(self) -> None:
        """Stops the worker processes and leaves the process group; the LLM cannot generate after this."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        if self.engine is not None:
            self.engine.shutdown()
        elif self._follower is not None:
            runner, channel = self._follower
            serve(runner, channel.receive)  # until rank 0's shutdown message
            distributed.destroy_distributed()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        try:
            self.shutdown()
        except Exception:
            pass  # interpreter shutdown: modules may already be gone


def _shutdown_at_exit(llm_ref: weakref.ref) -> Any:
    def hook() -> None:
        llm = llm_ref()
        if llm is not None:
            llm.shutdown()

    return hook


def _normalize_prompts(prompts: Prompts) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        return []
    if all(isinstance(p, int) for p in prompts):
        return [[int(p) for p in prompts]]  # one prompt given as token ids
    normalized: list[str | list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            normalized.append(prompt)
        elif isinstance(prompt, SequenceOf) and all(isinstance(t, int) for t in prompt):
            normalized.append([int(t) for t in prompt])
        else:
            raise TypeError(f"a prompt must be a string or a list of token ids, got {prompt!r}")
    return normalized


def _normalize_params(
    sampling_params: SamplingParams | SequenceOf[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
