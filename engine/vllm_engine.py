"""VllmEngine: the daemon's handle on one vLLM engine that carries the weightsync worker extension.

Two modes:
* "llm": a `vllm.LLM` (library mode). Every call into it (generate, collective_rpc,
  cache resets) runs on one dedicated thread, so the event loop never blocks on
  the engine and no two engine calls overlap.
* "async": an `AsyncLLM` (the engine behind vLLM's OpenAI server), driven from
  the event loop; its EngineCore runs in its own process.

Weights never change during a forward pass:
* Both modes apply through `collective_rpc`, which vLLM runs between engine steps:
  in "async" mode the EngineCore busy loop handles utility calls between
  `step()`s; in "llm" mode with the engine in this process, the call runs on the
  same single engine thread that runs `generate()`, so a step and an apply are
  never in flight together (with the engine in another process, its busy loop
  serialises them as in "async" mode).
* The staged round is received by a worker thread into staging memory, never
  into the model; only `weightsync_commit` writes the model.
* "async" mode also pauses the scheduler around the write (`pause_generation`,
  per `inflight_policy`), so no request sees some tokens from old weights and
  the next from new ones unless the policy says so ("keep"), and the prefix and
  KV caches computed with old weights are dropped before anything runs on the
  new ones. "llm" mode needs no pause: `generate()` returns only when its
  requests are done, so there are never requests in flight between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightsync.core import (
    Assignment,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    TensorSpec,
    TransferError,
    WeightsyncError,
)
from weightsync.engine.extension import EXTENSION_CLS
from weightsync.engine.inventory import dtype_name, inventory_for_engine
from weightsync.engine.payload import assignment_to_dict, encode_tensors
from weightsync.engine.stage_signal import StageListener

if TYPE_CHECKING:
    import torch

    from weightsync.core.rank_regions import RankRegions

__all__ = ["ApplyReport", "INFLIGHT_POLICIES", "STAGING_MODES", "VllmEngine", "VllmEngineConfig"]

log = logging.getLogger(__name__)

MODES = ("llm", "async")
# What happens to requests in flight when weights change (AsyncLLM.pause_generation modes):
# "wait": finish them on the old weights first; "abort": end them now;
# "keep": freeze them, drop their KV cache, and continue them on the new weights.
INFLIGHT_POLICIES = ("wait", "abort", "keep")
STAGING_MODES = ("staged", "stream")

ProgressFn = Callable[[int, int], None]
# The most often a staged round asks its workers for their status (engine/stage_signal.py).
_MIN_STATUS_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmEngineConfig:
    """How to start the engine and how to apply updates to it."""

    model: str
    mode: str = "llm"
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    kv_cache_memory_bytes: int | None = None
    seed: int = 0
    inflight_policy: str = "wait"
    staging: str = "staged"
    # The version of the weights the engine starts with; None: unversioned.
    initial_version: int | None = None
    # Each worker keeps the served weights in host memory in checkpoint format (the model's size
    # in the wire dtype, per worker), the base of delta rounds; False: every round is dense here.
    delta_shadow: bool = True
    # Workers signal staging progress and its end (engine/stage_signal.py); the daemon polls them
    # over collective_rpc only this long after the last signal (a lost datagram, a dead worker).
    # Well past vLLM's busy window (1 s): every poll keeps the workers spinning that long.
    stage_poll_interval_s: float = 5.0
    # Bounds pause_generation: with "wait", a long request could hold it forever.
    pause_timeout_s: float = 120.0
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a model directory or id")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {MODES}")
        if self.inflight_policy not in INFLIGHT_POLICIES:
            raise ValueError(f"inflight_policy {self.inflight_policy!r}: expected one of {INFLIGHT_POLICIES}")
        if self.staging not in STAGING_MODES:
            raise ValueError(f"staging {self.staging!r}: expected one of {STAGING_MODES}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size}: expected >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len {self.max_model_len}: expected >= 1")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes {self.kv_cache_memory_bytes}: expected > 0")
        if self.initial_version is not None and self.initial_version < 0:
            raise ValueError(f"initial_version {self.initial_version}: expected >= 0 or None")
        if self.stage_poll_interval_s <= 0:
            raise ValueError(f"stage_poll_interval_s {self.stage_poll_interval_s}: expected > 0")
        if self.pause_timeout_s <= 0:
            raise ValueError(f"pause_timeout_s {self.pause_timeout_s}: expected > 0")
        if "worker_extension_cls" in self.engine_kwargs:
            raise ValueError("engine_kwargs must not set worker_extension_cls: VllmEngine sets it")

    def engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = dict(
            model=self.model,
            dtype=self.dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            worker_extension_cls=EXTENSION_CLS,
        )
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        if self.kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        args.update(self.engine_kwargs)
        return args


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """One applied update. Field names match the daemon's HandlerResult where they overlap."""

    update_id: str
    version: int | None
    checksums: dict[str, int]
    num_tensors: int
    bytes_received: int
    receive_s: float  # in the data plane (0 for in-process tensors)
    apply_s: float  # writing the model, slowest worker
    paused_s: float  # how long the engine could not step for this update
    seconds: float  # the whole call
    # Each worker's own checksums, in worker order (all equal to `checksums`, or the update raised).
    worker_checksums: tuple[dict[str, int], ...] = ()
    # A routed round: (data-plane rank, piece index) -> sum of the piece as the worker received it.
    piece_sums: dict[tuple[int, int], int] = field(default_factory=dict)
    # A routed round: the most full-size staging bytes any worker held at once (engine/routed.py).
    staging_peak_bytes: int = 0


class VllmEngine:
    """A vLLM engine with the weightsync extension. Build it with `await VllmEngine.create(config)`."""

    def __init__(self, engine: Any, config: VllmEngineConfig, *, executor: ThreadPoolExecutor | None = None) -> None:
        """Wraps an engine built with worker_extension_cls=EXTENSION_CLS; prefer `create`."""
        self._engine = engine
        self._config = config
        self._executor = executor
        self._update_lock = asyncio.Lock()
        self._request_ids = itertools.count()
        model_config = engine.llm_engine.model_config if config.mode == "llm" else engine.model_config
        # The checkpoint's view until the workers answer: weight_info() and
        # set_version() replace it with what their loaders accept (the extension's dry run).
        self._inventory = inventory_for_engine(model_config.model, model_config.hf_config, dtype_name(model_config.dtype))
        self._num_workers = engine_world_size(engine, config.mode)
        self._served_version: int | None = None
        self._dirty = False
        self._holds_delta_base = False
        self._holds_needed_delta_base = False
        self._closed = False
        # With tensor parallelism the workers are processes of their own even when
        # the engine core runs here, so tensors must travel as bytes.
        self._inprocess = (
            config.mode == "llm"
            and self._num_workers == 1
            and type(engine.llm_engine.engine_core).__name__ == "InprocClient"
        )

    @classmethod
    async def create(cls, config: VllmEngineConfig) -> "VllmEngine":
        """Starts the engine, checks the extension answers, and declares config.initial_version."""
        if config.mode == "llm":
            # The engine thread builds the LLM too, so every call into it comes from one thread.
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsync-vllm")
            llm = None
            try:
                llm = await asyncio.get_running_loop().run_in_executor(executor, _build_llm, config)
                engine = cls(llm, config, executor=executor)
            except BaseException:
                if llm is not None:
                    await asyncio.get_running_loop().run_in_executor(executor, _shutdown_llm, llm)
                executor.shutdown(wait=False)
                raise
        else:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            # Blocks the event loop while the engine starts: AsyncLLM binds to the
            # running loop, and the daemon registers only once this returns.
            engine = cls(AsyncLLM.from_engine_args(AsyncEngineArgs(**config.engine_args())), config)
        try:
            await engine.set_version(config.initial_version)
            infos = await engine.weight_info()
        except BaseException:
            await engine.close()
            raise
        problems = sorted({p for info in infos for p in info["inventory_problems"]})
        if problems:
            log.warning("inventory and vLLM parameters disagree (updates may be refused): %s", problems)
        return engine

    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> VllmEngineConfig:
        return self._config

    @property
    def engine(self) -> Any:
        """The wrapped vllm.LLM or AsyncLLM (None once closed).

        Call it only through this class while updates may run: in "llm" mode a direct
        call from another thread could overlap an apply.
        """
        return self._engine

    @property
    def num_workers(self) -> int:
        """Data-plane receiver ranks this engine needs: one per vLLM worker."""
        return self._num_workers

    @property
    def served_version(self) -> int | None:
        return self._served_version

    @property
    def dirty(self) -> bool:
        """True when the weights may be a mix of versions (a failed apply touched them)."""
        return self._dirty

    @property
    def holds_delta_base(self) -> bool:
        """Every worker holds a whole shadow of the served weights (engine/shadow.py), as of the last update or weight_info()."""
        return self._holds_delta_base

    @property
    def holds_needed_delta_base(self) -> bool:
        """Every worker holds a shadow exact at least in the regions its loader reads (after a routed round)."""
        return self._holds_needed_delta_base

    def inventory(self) -> tuple[TensorSpec, ...]:
        """Every tensor the engine accepts, by HF checkpoint name, in the serving dtype."""
        return self._inventory

    # ------------------------------------------------------------------ engine calls

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise FailedPrecondition("the engine is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        if self._config.mode == "llm":
            return await self._call(lambda: self._engine.collective_rpc(method, args=args, kwargs=kwargs))
        if self._closed:
            raise FailedPrecondition("the engine is closed")
        return await self._engine.collective_rpc(method, args=args, kwargs=kwargs)

    async def needs(self) -> "tuple[RankRegions, ...]":
        """What each worker's loader reads of each inventory tensor, one RankRegions per worker (needs.py)."""
        from weightsync.engine.needs import rank_regions_from_workers

        return rank_regions_from_workers(await self._rpc("weightsync_needs"))

    async def weight_info(self) -> list[dict[str, Any]]:
        """Each worker's weightsync_weight_info; also refreshes served_version and dirty."""
        infos = await self._rpc("weightsync_weight_info")
        self._note_worker_state(infos)
        return infos

    async def set_version(self, version: int | None, *, dirty: bool = False) -> None:
        """Declares the version of the weights the engine holds now (e.g. the checkpoint it loaded)."""
        async with self._update_lock:
            await self._rpc("weightsync_set_version", version, dirty, self._config.delta_shadow)
            # weight_info also carries the workers' inventory: an engine wrapped
            # without create() (weightsync serve) registers what its loader accepts.
            self._note_worker_state(await self._rpc("weightsync_weight_info"))
            await self._set_version_label(version)

    def _note_worker_state(self, infos: Sequence[Mapping[str, Any]]) -> None:
        versions = {info["served_version"] for info in infos}
        uniform = len(versions) == 1
        self._served_version = next(iter(versions)) if uniform else None
        self._dirty = not uniform or any(info.get("dirty") or info.get("broken") for info in infos)
        clean = uniform and not self._dirty
        self._holds_delta_base = clean and all(info.get("holds_delta_base") for info in infos)
        self._holds_needed_delta_base = clean and all(info.get("holds_needed_delta_base") for info in infos)
        if infos and "inventory" in infos[0]:
            self._inventory = tuple(TensorSpec(n, tuple(shape), dtype) for n, shape, dtype in infos[0]["inventory"])

    async def _set_version_label(self, version: int | None) -> None:
        # vLLM stamps this label on every RequestOutput (weight_version).
        label = "default" if version is None else str(version)
        if self._config.mode == "llm":
            await self._call(self._engine.llm_engine.set_weight_version, label)
        else:
            await self._engine.update_weight_version(label)

    # ------------------------------------------------------------------ applying

    async def apply_tensors(
        self,
        tensors: Mapping[str, "torch.Tensor"],
        version: int | None = None,
        *,
        require_full: bool = False,
        inflight_policy: str | None = None,
    ) -> ApplyReport:
        """Applies tensors held by this process (no data plane), between engine steps.

        `inflight_policy` overrides config.inflight_policy for this update.
        """
        policy = self._policy(inflight_policy)
        started = time.monotonic()
        # In-process workers take the tensors as they are; others need bytes.
        payload = dict(tensors) if self._inprocess else encode_tensors(tensors)
        async with self._update_lock:
            try:
                results, paused_s = await self._between_steps(
                    "weightsync_apply", (payload, version, require_full), version, policy
                )
            finally:
                await self._refresh_state()
        return self._report("", version, results, paused_s, started)

    async def apply_assignment(
        self,
        assignment: Assignment,
        ranks: Sequence[int],
        progress: ProgressFn | None = None,
        *,
        staging: str | None = None,
        inflight_policy: str | None = None,
    ) -> ApplyReport:
        """Receives a data-plane round as `ranks` (one per worker) and applies it between engine steps.

        Staged (config.staging's default): the round is received and verified while the
        engine keeps serving, then written in one short pause. Streamed: written as it
        arrives, with the engine paused throughout, and no staging copy. `staging` and
        `inflight_policy` override the config for this round. `progress(buckets_done, bytes_done)`
        follows the slowest worker. Raises TransferError (RoundFailed) when the round
        fails on any rank, DeadlineExceeded past assignment.deadline_s.
        """
        staging = self._config.staging if staging is None else staging
        if staging not in STAGING_MODES:
            raise ValueError(f"staging {staging!r}: expected one of {STAGING_MODES}")
        policy = self._policy(inflight_policy)
        ranks = [int(r) for r in ranks]
        if len(ranks) != self._num_workers:
            raise InvalidArgument(
                f"got {len(ranks)} ranks for an engine of {self._num_workers} workers: expected one per worker"
            )
        started = time.monotonic()
        payload = assignment_to_dict(assignment)
        async with self._update_lock:
            try:
                async with asyncio.timeout(assignment.deadline_s):
                    if staging == "stream":
                        results, paused_s = await self._between_steps(
                            "weightsync_receive", (payload, ranks), assignment.version, policy
                        )
                    else:
                        with StageListener() as listener:
                            await self._rpc("weightsync_stage", payload, ranks, listener.address)
                            try:
                                await self._wait_staged(assignment.update_id, listener, progress)
                                results, paused_s = await self._between_steps(
                                    "weightsync_commit", (assignment.update_id,), assignment.version, policy
                                )
                            except BaseException:
                                await self._discard(assignment.update_id)
                                raise
            except TimeoutError as e:
                raise DeadlineExceeded(
                    f"update {assignment.update_id} did not finish within its deadline of {assignment.deadline_s:g} s"
                ) from e
            except WeightsyncError:
                raise
            except Exception as e:
                # vLLM's own failures (a TP worker died: its executor cancels the call
                # with RuntimeError("cancelled")) end the round like a transfer failure.
                raise TransferError(
                    f"update {assignment.update_id}: the engine failed during the round "
                    f"({type(e).__name__}: {e}); check its workers, restart it if one died"
                ) from e
            finally:
                await self._refresh_state()
        report = self._report(
            assignment.update_id, assignment.version, results, paused_s, started, routed=assignment.routing is not None
        )
        log.info(
            "update %s applied: version %d, %d tensors, %d bytes, receive %.3f s, apply %.3f s, paused %.3f s",
            report.update_id, assignment.version, report.num_tensors, report.bytes_received,
            report.receive_s, report.apply_s, report.paused_s,
        )
        if assignment.routing is not None:
            log.info("update %s routed: staging peak %d bytes per worker (%s)", report.update_id,
                     report.staging_peak_bytes, staging)
        return report

    async def _refresh_state(self) -> None:
        """Re-reads served_version and dirty from the workers after an update, failed or not."""
        try:
            await asyncio.shield(self.weight_info())
        except Exception:  # the update's own outcome is what the caller needs; this is bookkeeping
            log.warning("could not read the workers' weight state; marking the engine dirty", exc_info=True)
            self._dirty = True
            self._holds_delta_base = self._holds_needed_delta_base = False

    async def _wait_staged(self, update_id: str, listener: StageListener, progress: ProgressFn | None) -> None:
        """Until every worker has staged update_id; raises naming the workers whose staging failed.

        The workers' datagrams give progress and say when to ask; their answer to the status RPC
        is what counts (a datagram is only a wake-up: any local process could send one)."""
        signalled: dict[int, tuple[int, int]] = {}
        last = (-1, -1)
        ask = True  # once at the start: a worker may have finished before the listener was read
        asked_at = -float("inf")
        while True:
            if ask:
                # Bounded however many datagrams say "ended": any local process can send them.
                await asyncio.sleep(max(0.0, asked_at + _MIN_STATUS_INTERVAL_S - time.monotonic()))
                asked_at = time.monotonic()
                statuses = await self._rpc("weightsync_stage_status", update_id)
                failed = [s for s in statuses if s["state"] not in ("receiving", "staged")]
                if failed:
                    raise TransferError(
                        f"update {update_id}: staging failed on worker(s) {[s['rank'] for s in failed]}: "
                        + "; ".join(f"{s['state']}: {s['error']}" for s in failed)
                    )
                signalled.update({s["rank"]: (s["buckets_done"], s["bytes_done"]) for s in statuses})
            if progress is not None and len(signalled) == self._num_workers:
                done = (min(b for b, _ in signalled.values()), min(n for _, n in signalled.values()))
                if done != last:
                    progress(*done)
                    last = done
            if ask and all(s["state"] == "staged" for s in statuses):
                return
            news = [s for s in await listener.next_statuses(self._config.stage_poll_interval_s) if s["update_id"] == update_id]
            for s in news:
                if s["rank"] in signalled:
                    signalled[s["rank"]] = (s["buckets_done"], s["bytes_done"])
            # No datagram within the interval, or one that says a worker's staging ended.
            ask = not news or any(s["state"] != "receiving" for s in news)

    async def _discard(self, update_id: str) -> None:
        try:
            await asyncio.shield(self._rpc("weightsync_discard", update_id))
        except Exception:  # cleanup after a failure that is already being raised
            log.warning("discarding staged update %s failed", update_id, exc_info=True)

    def _policy(self, override: str | None) -> str:
        policy = self._config.inflight_policy if override is None else override
        if policy not in INFLIGHT_POLICIES:
            raise ValueError(f"inflight_policy {policy!r}: expected one of {INFLIGHT_POLICIES}")
        return policy

    async def _between_steps(
        self, method: str, args: tuple, version: int | None, policy: str
    ) -> tuple[list[Any], float]:
        """Runs a writing RPC where no step can overlap it; returns its results and the paused time."""
        if self._config.mode == "llm":
            return await self._call(self._llm_write, method, args, version)
        engine = self._engine
        paused_at = time.monotonic()
        try:
            async with asyncio.timeout(self._config.pause_timeout_s):
                await engine.pause_generation(mode=policy, clear_cache=True)
        except BaseException as e:
            await asyncio.shield(engine.resume_generation())
            if not isinstance(e, TimeoutError):
                raise
            raise DeadlineExceeded(
                f"pause_generation(mode={policy!r}) took over {self._config.pause_timeout_s:g} s: "
                "raise pause_timeout_s or use inflight_policy 'abort' or 'keep'"
            ) from e
        try:
            results = await engine.collective_rpc(method, args=args)
            _raise_answered_failures(method, results)
            if version is not None:
                await engine.update_weight_version(str(version))
        finally:
            # Whatever happened, nothing may reuse KV computed with the old weights,
            # and the engine must not stay paused.
            await asyncio.shield(self._async_reset_and_resume())
        return results, time.monotonic() - paused_at

    async def _async_reset_and_resume(self) -> None:
        try:
            await self._engine.reset_prefix_cache(reset_running_requests=True)
        finally:
            await self._engine.resume_generation()

    def _llm_write(self, method: str, args: tuple, version: int | None) -> tuple[list[Any], float]:
        """Runs on the engine thread: no generate() can be running."""
        llm = self._engine
        started = time.monotonic()
        try:
            results = llm.collective_rpc(method, args=args)
            _raise_answered_failures(method, results)
            if version is not None:
                llm.llm_engine.set_weight_version(str(version))
        finally:
            llm.reset_prefix_cache()
        return results, time.monotonic() - started

    def _report(
        self,
        update_id: str,
        version: int | None,
        results: list[Mapping[str, Any]],
        paused_s: float,
        started: float,
        *,
        routed: bool = False,
    ) -> ApplyReport:
        checksums = dict(results[0]["checksums"])
        differing = [r["rank"] for r in results[1:] if r["checksums"] != checksums]
        if differing:
            raise TransferError(
                f"update {update_id}: workers {differing} received other bytes than worker {results[0]['rank']}"
            )
        return ApplyReport(
            update_id=update_id,
            version=version,
            checksums=checksums,
            num_tensors=int(results[0]["num_tensors"]),
            # Routed: each worker received its own pieces, so the engine's bytes are their sum.
            bytes_received=(
                sum(int(r.get("bytes_received", 0)) for r in results) if routed else int(results[0].get("bytes_received", 0))
            ),
            receive_s=max(float(r.get("receive_s", 0.0)) for r in results),
            apply_s=max(float(r["apply_s"]) for r in results),
            paused_s=paused_s,
            seconds=time.monotonic() - started,
            worker_checksums=tuple(dict(r["checksums"]) for r in results),
            piece_sums={(int(r["data_plane_rank"]), int(i)): int(v) for r in results for i, v in r.get("piece_sums", ())},
            staging_peak_bytes=max(int(r.get("staging_peak_bytes", 0)) for r in results),
        )

    # ------------------------------------------------------------------ generation

    async def generate_greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """Greedy continuations of token-id prompts, exactly max_tokens each (EOS ignored)."""
        from vllm import SamplingParams

        if max_tokens < 1:
            raise ValueError(f"max_tokens {max_tokens}: expected >= 1")
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        if self._config.mode == "llm":
            outputs = await self._call(lambda: self._engine.generate(inputs, params, use_tqdm=False))
            return [list(o.outputs[0].token_ids) for o in outputs]
        return list(await asyncio.gather(*(self._generate_one(i, params) for i in inputs)))

    async def _generate_one(self, prompt: Mapping[str, Any], params: Any) -> list[int]:
        final = None
        async for out in self.stream(prompt, params):
            final = out
        if final is None:
            raise FailedPrecondition("the engine returned no output")
        return list(final.outputs[0].token_ids)

    async def stream(self, prompt: Mapping[str, Any], params: Any) -> AsyncIterator[Any]:
        """The RequestOutputs of one request ("async" mode only)."""
        if self._config.mode != "async":
            raise FailedPrecondition("stream() needs mode 'async'")
        request_id = f"weightsync-{os.getpid()}-{next(self._request_ids)}"
        async for out in self._engine.generate(prompt, params, request_id):
            yield out

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Leaves the data plane and shuts the engine down; safe to call twice."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await self._rpc("weightsync_close")
        self._closed = True
        if self._config.mode == "llm":
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, _shutdown_llm, self._engine)
            self._executor.shutdown(wait=True)
        else:
            self._engine.shutdown()
        # Dropped now so the engine is collected while the interpreter is whole: vLLM's
        # __del__ shuts down again and fails on a half torn-down interpreter.
        self._engine = None


def _raise_answered_failures(method: str, results: Sequence[Any]) -> None:
    """Raises what the workers answered instead of raising (extension._answers_failure), once all have answered."""
    failed = [r for r in results if isinstance(r, Mapping) and r.get("error")]
    if failed:
        raise TransferError(
            f"{method} failed on worker(s) {[r['rank'] for r in failed]}: " + "; ".join(r["error"] for r in failed)
        )


def engine_world_size(engine: Any, mode: str) -> int:
    vllm_config = engine.llm_engine.vllm_config if mode == "llm" else engine.vllm_config
    return int(vllm_config.parallel_config.world_size)


def _build_llm(config: VllmEngineConfig) -> Any:
    from vllm import LLM

    return LLM(**config.engine_args())


def _shutdown_llm(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
