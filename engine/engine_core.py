"""The engine step loop: add requests, step, collect finished outputs.

Kept apart from the `LLM` facade so a server can drive it from a background thread.
"""
from __future__ import annotations

import itertools
import time
import uuid

import torch

from kvtier.connectors.base import ConnectorContext, KVConnector
from kvtier.connectors.guard import ConnectorGuard
from kvtier.connectors.registry import build_connector
from kvtier.engine.config import EngineConfig
from kvtier.engine.determinism import cache_salt_for, derived_seed, enable_batch_invariance
from kvtier.engine.kernels.tier_copy import block_copy_for
from kvtier.engine.kv_cache.block_hash import model_namespace, root_hash
from kvtier.engine.kv_cache.setup import build_kv_cache
from kvtier.engine.kv_events import KVEventHub
from kvtier.engine.metrics import EngineMetrics
from kvtier.engine.model_loader import load_model, weights_fingerprint
from kvtier.engine.model_runner import ModelRunner
from kvtier.engine.prefill_speed import PrefillSpeed
from kvtier.engine.prompts import Prompt, invalid_token_ids, parse_prompt
from kvtier.engine.output_builder import OutputBuilder
from kvtier.engine.parking.parking_lot import ParkingLot
from kvtier.engine.outputs import RequestOutput
from kvtier.engine.request import Request, RequestStatus
from kvtier.engine.sampling_params import SamplingParams
from kvtier.engine.scheduler import Scheduler
from kvtier.engine.tokenizer import load_tokenizer

# How long a step waits for loads it started, so loads from fast tiers join it.
JOIN_WAIT_S = 0.002
KV_LAYOUT = "page-first-v1"  # per group: [blocks, layers, 2, block_size, kv_heads, head_dim] | [slots, layers, state]


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model, self.arch = load_model(config.model, config.dtype, config.device)
        # Deterministic mode: the shared row-invariant matmul (its probed strategies per shape).
        self.invariant_matmul = enable_batch_invariance(self.model, config.block_size) if config.deterministic \
            else None
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.max_model_len = self._resolve_max_model_len()

        cache = build_kv_cache(self.model, config, self.max_model_len)
        self.groups, self.kv_pools, self.group_infos, self.kv = cache.groups, cache.pools, cache.infos, cache.coordinator
        fingerprint = weights_fingerprint(config.model)
        self.namespace = model_namespace(fingerprint, str(config.dtype), KV_LAYOUT, config.block_size)
        self.runner = ModelRunner(self.model, config.block_size, config.device, config.seed, self.groups,
                                  cache.attention_backend)
        self.prefill_speed = PrefillSpeed()
        # Forward passes run and the seconds they took: a server's steps against an offline
        # run's tell whether it runs more steps or slower ones (benchmarks/serve_load.py).
        self.num_steps = 0
        self.step_seconds = 0.0
        self.connector = self._build_connector()
        # Every engine call into the connector goes through the guard (connectors/guard.py).
        self.connector_guard = None if self.connector is None else ConnectorGuard(
            self.connector, self._connector_name(), config.kv_load_timeout_s)
        self.parking = ParkingLot(self.kv, config.park_policy, config.max_parked_fraction,
                                  self._tier_bandwidth, self.prefill_speed.tokens_per_s,
                                  prefetch=self._prefetch if self.connector is not None else None)
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
            self.connector_guard, self.parking,
        )
        self.outputs = OutputBuilder(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._ended_outside_loop: list[Request] = []  # rejected or aborted, reported next step
        self._ids = itertools.count()
        self.metrics = EngineMetrics(self)  # read at scrape time; see docs/metrics.md
        if config.metrics_port is not None:
            self.metrics.serve(config.metrics_port)
        # Request ids are unique across engines, so a store two engines share never sees a clash.
        self._id_prefix = uuid.uuid4().hex[:12]
        # KV events (docs/kv_events.md): recorded only once a consumer exists.
        self.kv_events = KVEventHub(self.kv, self.connector, config.device.type, config.block_size,
                                    config.kv_events_queue)
        try:
            if config.kv_events_file is not None:
                self.kv_events.add_file(config.kv_events_file)
            if config.kv_events_endpoint is not None:
                self.kv_events.add_zmq(config.kv_events_endpoint, config.kv_events_topic,
                                       config.kv_events_replay_endpoint, config.kv_events_replay_batches)
        except BaseException:
            self.close()  # a bad path, a busy port or a missing extra: stop the tier threads too
            raise

    def _build_connector(self) -> KVConnector | None:
        spec = self.config.connector_spec()
        if spec is None:
            return None
        context = ConnectorContext(self.namespace, self.group_infos[0].layout, self.config.block_size,
                                   self.prefill_speed.tokens_per_s, tuple(self.group_infos),
                                   block_copy_for(self.config.device))
        connector = build_connector(spec[0], spec[1], context)
        connector.register_kv_caches(self.kv_pools)
        # Load-or-recompute needs the prefill speed from the first request on: measure it now.
        self.prefill_speed.measure(self.runner, min(512, self.config.max_num_batched_tokens, self.max_model_len,
                                                    self.kv.max_seq_tokens or self.max_model_len),
                                   [p.shape[0] for p in self.kv_pools])
        return connector

    def _connector_name(self) -> str:
        """What kv_sources calls loads that name no source: the connector's `name`, else the
        name it was configured by (the class name for a `module:Class` path)."""
        return getattr(self.connector, "name", None) or self.config.connector_spec()[0].rpartition(":")[2]

    def _prefetch(self, entry) -> None:
        """Queue a load-only request for an offloaded parked sequence: its KV comes back from
        the tiers into the device prefix cache, so the resume finds it there."""
        parked = entry.request
        req = Request(request_id=f"prefetch:{entry.parked_id}", prompt_token_ids=entry.tokens,
                      sampling_params=SamplingParams(max_tokens=1), cache_salt=parked.cache_salt,
                      hash_root=parked.hash_root, prefetch_only=True)
        self.scheduler.add(req)

    def _tier_bandwidth(self) -> float | None:
        """Read bandwidth of the first tier, for parking decisions; None without a connector."""
        if self.connector is None:
            return None
        hierarchy = getattr(self.connector, "hierarchy", None)
        return hierarchy.tiers[0].read_bandwidth() if hierarchy is not None else 1e9

    def _resolve_max_model_len(self) -> int:
        limit = self.arch.max_model_len_limit
        requested = self.config.max_model_len
        if requested is None:
            return limit
        if requested > limit:
            raise ValueError(f"max_model_len: {requested} exceeds what the model supports ({limit})")
        return requested

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model directory has no tokenizer.json; pass prompt_token_ids instead")
        return self.tokenizer.encode(prompt)

    def parse_prompt(self, prompt) -> Prompt:
        return parse_prompt(prompt, self.tokenize)

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> Request:
        """Queue a prompt. One that can never run still yields a request, finished with an error.
        A prompt that extends a parked sequence resumes it (implicit resume)."""
        prompt = self.parse_prompt(prompt)
        req = self._new_request(prompt.token_ids, prompt.text, prompt.cache_salt, params, request_id)
        if self.parking.entries and not invalid_token_ids(prompt.token_ids, self.arch.vocab_size):
            self.kv.update_block_hashes(req)
            entry = self.parking.match(req)
            if entry is not None:
                return self._queue(req, self.parking.take(entry.parked_id))
        return self._queue(req)

    def resume(self, parked_id: str, prompt, params: SamplingParams, request_id: str | None = None) -> Request:
        """Continue a parked request: `prompt` (text or {"prompt_token_ids": [...]}) holds what
        is appended to its sequence, e.g. the tool's result. KeyError for an unknown, expired,
        released or already resumed id."""
        appended = self.parse_prompt(prompt)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        entry = self.parking.take(parked_id)
        # The prompt of a resumed turn is token ids only: the parked sequence plus the appended part.
        req = self._new_request(entry.tokens + appended.token_ids, None, entry.request.cache_salt, params,
                                request_id)
        return self._queue(req, entry)

    def release(self, parked_id: str) -> None:
        """Drop a parked request (KeyError if there is none by that id)."""
        self.parking.release(parked_id)

    def _new_request(self, token_ids, text, cache_salt, params, request_id) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        rid = request_id if request_id is not None else f"{self._id_prefix}-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request_id: {rid!r} is already in flight")
        deterministic = self.config.deterministic if params.deterministic is None else params.deterministic
        if deterministic and not self.config.deterministic:
            raise ValueError("deterministic: this engine was started without deterministic=True "
                             "(--deterministic), so it cannot serve batch-invariant requests")
        return Request(
            request_id=rid,
            prompt_token_ids=token_ids,
            sampling_params=params,
            prompt=text,
            cache_salt=cache_salt,
            eos_token_ids=tuple(self.arch.eos_token_ids),
            hash_root=root_hash(self.namespace, cache_salt_for(cache_salt, deterministic)),
            deterministic=deterministic,
        )

    def _queue(self, req: Request, parked=None) -> Request:
        params = req.sampling_params
        seed = params.seed
        if seed is None and req.deterministic and not params.is_greedy:
            seed = derived_seed(self.config.seed, req.prompt_token_ids)
        if seed is not None:
            req.generator = torch.Generator(device=self.config.device)
            req.generator.manual_seed(seed)
        if params.logprobs is not None:
            req.logprobs = []
        self.requests[req.request_id] = req
        error = invalid_token_ids(req.prompt_token_ids, self.arch.vocab_size)
        if error is None:
            error = self.scheduler.add(req) if parked is None else self.scheduler.resume(parked, req)
        if error is not None:
            req.error = error
            req.status = RequestStatus.FINISHED_ERROR
            self._ended_outside_loop.append(req)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return outputs of requests that finished (incl. rejected ones)."""
        done, self._ended_outside_loop = self._ended_outside_loop, []
        self.parking.tick()
        connector = self.connector_guard
        if connector is not None:
            self.scheduler.on_connector_output(connector.get_finished())
        if self.scheduler.has_unfinished():
            sched_out = self.scheduler.schedule()
            metas = []
            if connector is not None:
                metas.append(connector.build_metadata())
                connector.start_load(metas[0])
                if self.scheduler.loading:
                    metas += self._join_fast_loads(sched_out)
            if sched_out.seqs:
                start = time.perf_counter()
                result = self.runner.execute(sched_out)
                seconds = time.perf_counter() - start
                self.prefill_speed.observe(sched_out.num_tokens, seconds)
                self.num_steps += 1
                self.step_seconds += seconds
                for meta in metas:
                    connector.save(meta)
                done += self._apply(sched_out, result)
            elif connector is not None and (self.scheduler.loading or self.scheduler.waiting):
                # Nothing to compute until a load lands or a tier lookup answers: wait
                # (briefly, the connector bounds it) instead of spinning.
                self.scheduler.on_connector_output(connector.get_finished(wait=True))
        outputs = []
        self.kv_events.end_step()  # the device pool's events of this step, as one batch
        for req in done:
            del self.requests[req.request_id]
            outputs.append(self.outputs.build(req))
        if outputs:
            self.metrics.observe_finished(outputs)
        return outputs

    def _join_fast_loads(self, sched_out) -> list:
        """Loads that land within JOIN_WAIT_S (host memory, a local disk) run in this step
        instead of the next, so a request served from a fast tier keeps pace with the
        requests admitted beside it. Returns the extra connector metadata it needed."""
        guard = self.connector_guard
        self.scheduler.on_connector_output(guard.get_finished(wait=JOIN_WAIT_S))
        if not self.scheduler.join_running(sched_out):
            return []
        meta = guard.build_metadata()  # blocks the joined requests evict or fill
        guard.start_load(meta)
        return [meta]

    def _apply(self, sched_out, result) -> list[Request]:
        for rid, lp in result.logprobs.items():
            self.outputs.record_logprobs(self.requests[rid], lp)
        done = self.scheduler.update(sched_out, result.sampled)
        for seq in sched_out.seqs:
            req = seq.request
            if not req.is_finished and req.request_id in result.sampled and self.outputs.hit_stop_string(req):
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                done.append(req)
        return done

    def kv_stats(self) -> dict[str, dict]:
        """Per-tier stats: the device pool, then each connector tier."""
        device = {
            **self.kv.stats(),
            "preemptions": self.scheduler.num_preemptions,
            "preempted_tokens": self.scheduler.num_preempted_tokens,
            "load_failures": self.scheduler.num_load_failures,
        }
        out = {"device": device, **(self.connector.stats() if self.connector is not None else {})}
        if self.connector_guard is not None:  # faults the engine caught in connector calls
            out["connector_calls"] = self.connector_guard.stats()
        out["parking"] = self.parking.stats()
        return out

    def close(self) -> None:
        self.metrics.close()
        if self.connector is not None:
            self.connector_guard.close()
            self.connector = self.connector_guard = None
        self.kv_events.close()  # after the tiers: their last events are queued by then

    def reset_prefix_cache(self) -> bool:
        """Forget every cached device block (an AllBlocksCleared event); False while any
        block is in use."""
        done = self.kv.reset_prefix_cache()
        self.kv_events.end_step()
        return done

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self._ended_outside_loop.append(req)
