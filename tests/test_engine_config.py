"""Engine options for KV groups and parking: a bad value is a ValueError naming the option."""
import pytest
from hf_checkpoints import make_variant

from kvtier import LLM, EngineConfig


@pytest.mark.parametrize("kwargs, name", [
    (dict(kv_group_memory_fractions=[0.7, 0.6]), "kv_group_memory_fractions"),
    (dict(kv_group_memory_fractions=[0]), "kv_group_memory_fractions"),
    (dict(kv_group_memory_fractions="0.5,0.5"), "kv_group_memory_fractions"),
    (dict(ssm_checkpoint_interval=24), "ssm_checkpoint_interval"),
    (dict(ssm_checkpoint_interval=0), "ssm_checkpoint_interval"),
    (dict(ssm_checkpoint_policy="sometimes"), "ssm_checkpoint_policy"),
    (dict(park_policy="pin"), "park_policy"),
    (dict(max_parked_fraction=1.5), "max_parked_fraction"),
    (dict(max_parked_fraction="half"), "max_parked_fraction"),
])
def test_bad_options_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EngineConfig(model="unused", device="cpu", **kwargs)


def test_fractions_must_match_the_models_groups(tmp_path):
    path = make_variant(tmp_path, "granite_hybrid")
    with pytest.raises(ValueError, match="2 KV groups"):
        LLM(path, kv_group_memory_fractions=[1.0])
    with pytest.raises(ValueError, match="needs at least"):
        LLM(path, kv_cache_memory_bytes=1 << 16)
