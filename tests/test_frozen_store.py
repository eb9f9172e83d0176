"""A remote store frozen mid-run (SIGSTOP, not killed: its sockets stay open and silent)
must not freeze the engine (issue 9). Requests are decoding when the store stops; new
requests keep arriving, and each needs a tier lookup. Every engine step must stay short,
the running requests must keep producing tokens, outputs must equal a tierless run's
greedy tokens, and after SIGCONT the store must serve hits again.

The tiers use a 2 s socket timeout, so an engine that waits on the store inline spends 2 s
or more of one step in the connector. The bounds below are generous for a busy machine:
0.25 s in the connector per step while requests run (the design: 5 ms per new lookup),
0.5 s in all during the freeze, 1 s per step (model included)."""
import random
import signal
import time

import pytest
from grpc_server import KVServerProcess
from hf_checkpoints import make_variant
from redis_server import RedisServer

from kvtier import LLM, SamplingParams
from kvtier.engine.model_config import load_model_config

WARM = [40, 90, 130, 200]  # stored before the freeze, asked for again during and after it
FRESH = 8  # two are decoding when the store freezes; the rest arrive during the freeze
LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
POOL_BLOCKS = 64
FREEZE_S = 2.5  # longer than the tier timeout, so stuck calls also time out meanwhile
MAX_STEP_S = 1.0
MAX_CONNECTOR_S = 0.25  # per step with requests running, in the connector's calls on the loop
MAX_CONNECTOR_TOTAL_S = 0.5  # the same, summed over the freeze


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp("llama"), "llama")
    cfg = load_model_config(path)
    rng = random.Random(7)
    warm = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in WARM]
    fresh = [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(48, 96))] for _ in range(FRESH)]
    # Enough new blocks to push everything else out of the device pool.
    filler = [[rng.randrange(3, cfg.vocab_size) for _ in range(224)] for _ in range(5)]
    with LLM(path) as llm:
        ref_long = _tokens(llm.generate(_prompts(fresh[:2]), LONG, use_tqdm=False))
        ref_warm = _tokens(llm.generate(_prompts(warm), SHORT, use_tqdm=False))
        ref_fresh = _tokens(llm.generate(_prompts(fresh[2:]), SHORT, use_tqdm=False))
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    return dict(path=path, warm=warm, fresh=fresh, filler=filler, ref_long=ref_long, ref_warm=ref_warm,
                ref_fresh=ref_fresh, pool=POOL_BLOCKS * block_bytes)


def _prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


class _ConnectorClock:
    """Seconds the engine loop spends inside the connector (model compute excluded, so the
    measure is not at the mercy of a busy machine)."""

    def __init__(self, connector):
        self.spent = 0.0
        for name in ("lookup", "build_metadata", "start_load", "save", "get_finished", "stats"):
            setattr(connector, name, self._timed(getattr(connector, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - t0
        return timed


class _Redis:
    name = "redis"

    def __enter__(self):
        self.server = RedisServer().start()
        self.proc = self.server.proc
        return self

    def tier(self):
        return f"{self.server.url}?timeout=2&breaker_cooldown=0.3"

    def __exit__(self, *exc):
        self.server.stop()


class _KVServer:
    name = "grpc"

    def __enter__(self):
        self.server = KVServerProcess("--capacity", "64MiB")
        self.proc = self.server.proc
        return self

    def tier(self):
        return f"grpc://{self.server.address}?timeout=2&cooldown=0.3"

    def __exit__(self, *exc):
        self.server.kill()


@pytest.mark.parametrize("store", [_KVServer, _Redis], ids=["kv-server", "redis-server"])
def test_a_frozen_store_does_not_freeze_the_engine(model, store):
    with store() as s, LLM(model["path"], kv_cache_memory_bytes=model["pool"], kv_tiers=[s.tier()]) as llm:
        engine = llm.engine
        assert _tokens(llm.generate(_prompts(model["warm"]), SHORT, use_tqdm=False)) == model["ref_warm"]
        assert engine.connector.flush(10)

        outs = {}
        long_reqs = [engine.add_request(p, LONG) for p in _prompts(model["fresh"][:2])]
        while not all(len(r.output_token_ids) >= 2 for r in long_reqs):  # both decoding
            outs.update({o.request_id: o for o in engine.step()})
        ids = {"long": [r.request_id for r in long_reqs], "warm": [], "fresh": []}
        steps, in_connector = [], []
        clock = _ConnectorClock(engine.connector)
        s.proc.send_signal(signal.SIGSTOP)
        try:
            decoded = sum(len(r.output_token_ids) for r in long_reqs)
            # Requests keep arriving through the freeze, each needing a tier lookup.
            # Fresh prompts always miss on the device, so each is looked up in the store.
            arrivals = [("fresh", p) for p in model["fresh"][2:]] + [("warm", p) for p in model["warm"]]
            every = FREEZE_S / (len(arrivals) + 1)
            start = next_arrival = time.monotonic()
            while arrivals or time.monotonic() - start < FREEZE_S:
                if arrivals and time.monotonic() >= next_arrival:
                    kind, p = arrivals.pop(0)
                    ids[kind].append(engine.add_request({"prompt_token_ids": p}, SHORT).request_id)
                    next_arrival += every
                busy = bool(engine.scheduler.running)  # idle steps may wait for a lookup: no one is held up
                t0, c0 = time.perf_counter(), clock.spent
                outs.update({o.request_id: o for o in engine.step()})
                steps.append(time.perf_counter() - t0)
                if busy:
                    in_connector.append(clock.spent - c0)
                if not engine.has_unfinished():
                    time.sleep(0.005)
            decoded_while_frozen = sum(len(r.output_token_ids) for r in long_reqs) - decoded
        finally:
            s.proc.send_signal(signal.SIGCONT)
        assert max(in_connector) < MAX_CONNECTOR_S, \
            f"an engine step waited {max(in_connector):.2f} s on the frozen {s.name} store"
        assert sum(in_connector) < MAX_CONNECTOR_TOTAL_S, \
            f"running requests waited {sum(in_connector):.2f} s in all on the frozen {s.name} store"
        assert max(steps) < MAX_STEP_S, f"an engine step took {max(steps):.2f} s with the {s.name} store frozen"
        assert decoded_while_frozen >= 10, "running requests must keep decoding while the store is frozen"

        while engine.has_unfinished():
            outs.update({o.request_id: o for o in engine.step()})
        assert [outs[i].outputs[0].token_ids for i in ids["long"]] == model["ref_long"]
        assert [outs[i].outputs[0].token_ids for i in ids["warm"]] == model["ref_warm"]
        assert [outs[i].outputs[0].token_ids for i in ids["fresh"]] == model["ref_fresh"]
        stats = llm.kv_stats()
        assert stats["connector"]["lookup_timeouts"].get(s.name, 0) >= 1

        # Resumed: once the breaker's cool-down has passed, the store serves the warm
        # prefixes again (the filler prompts push them out of the device pool first).
        deadline = time.monotonic() + 20
        while True:
            llm.generate(_prompts(model["filler"]), SHORT, use_tqdm=False)
            got = llm.generate(_prompts(model["warm"]), SHORT, use_tqdm=False)
            assert _tokens(got) == model["ref_warm"]
            if sum(o.kv_sources.get(s.name, 0) for o in got) > 0:
                break
            assert time.monotonic() < deadline, f"the {s.name} store was not used again after SIGCONT"
            time.sleep(0.2)
