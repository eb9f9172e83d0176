"""A tier with a bug under the whole engine: every call raises, yet outputs stay exact, the
faults are counted by kind in kv_stats() and logged once per kind, not once per call."""
import logging
import random

from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.engine.model_config import load_model_config
from kvtier.kvstore.tiers.base import Tier

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


class RaisingTier(Tier):
    """A programming error injected into the hierarchy: put, get and contains raise."""

    name = "raising"

    def __init__(self):
        super().__init__(1 << 30)

    def lookup_prefix(self, keys):
        raise TypeError("get_connection() missing 1 required positional argument")

    contains = lookup_prefix

    def get(self, keys, into):
        raise TypeError("get_connection() missing 1 required positional argument")

    def put(self, keys, blocks):
        raise TypeError("get_connection() missing 1 required positional argument")

    def delete(self, keys):
        pass


def test_a_raising_tier_is_counted_and_logged_once_and_the_engine_keeps_working(tmp_path, caplog):
    path = make_variant(tmp_path / "llama", "llama")
    vocab = load_model_config(path).vocab_size
    rng = random.Random(5)
    rounds = [[{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(70)]} for _ in range(2)]
              for _ in range(3)]
    with LLM(path) as llm:
        reference = [[o.outputs[0].token_ids for o in llm.generate(p, PARAMS, use_tqdm=False)] for p in rounds]
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        with LLM(path, kv_tiers=["cpu:64MiB", RaisingTier()]) as llm:
            for prompts, expected in zip(rounds, reference):
                outs = llm.generate(prompts, PARAMS, use_tqdm=False)
                assert [o.outputs[0].token_ids for o in outs] == expected
                assert all(o.error is None for o in outs)
                assert llm.engine.connector.flush(timeout=10)  # one failed put per round
            stats = llm.kv_stats()["raising"]
    put_kind = "raising.put: TypeError"
    assert stats["faults"].get(put_kind, 0) >= 3 and stats["errors"] >= stats["faults"][put_kind]
    assert stats["skipped_writes"] > 0 and stats["puts"] == 0
    logged = [r.getMessage() for r in caplog.records if put_kind in r.getMessage()]
    assert len(logged) == 1  # many failed puts, one log line
