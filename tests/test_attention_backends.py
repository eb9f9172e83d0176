"""The attention-backend registry (engine/attention/backends/) and every backend against the
`torch` reference end to end: greedy tokens of tiny random models with `sdpa` and `triton`
equal `torch`'s, over GQA, sliding windows, chunked prefill over a cached prefix, mixed
prefill + decode steps and block sizes 16 / 32. Without a GPU the triton kernels run through
triton's interpreter (TRITON_INTERPRET=1, set before triton is first imported, as in
tests/test_kernel_*.py); interpreted runs are slow, so the models and outputs are tiny."""
import random

import pytest
import torch

from triton_setup import DEVICE  # noqa: E402,F401  (first: sets TRITON_INTERPRET before triton loads)

from hf_checkpoints import make_variant  # noqa: E402

from kvtier import LLM, SamplingParams  # noqa: E402
from kvtier.engine.attention.backends import CHOICES, resolve_backend  # noqa: E402
from kvtier.engine.attention.metadata import build_attention_metadata  # noqa: E402
from kvtier.engine.config import EngineConfig  # noqa: E402
from kvtier.engine.config_sources import _META  # noqa: E402
from kvtier.engine.kernels import triton_available  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


# ---- the registry ----------------------------------------------------------------------

def test_names_resolve_per_device(monkeypatch):
    assert resolve_backend("auto", "cpu") == "sdpa"  # auto never interprets: sdpa is the CPU path
    assert resolve_backend("reference", "cpu") == "torch"  # the old name still works
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="unknown 'flash'"):
        resolve_backend("flash", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton cannot run on cpu"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="triton cannot run"):
        EngineConfig(model="unused", device="cpu", attention_backend="triton")
    if torch.cuda.is_available() and triton_available("cuda"):
        assert resolve_backend("auto", "cuda") == "triton"


def test_config_and_cli_accept_every_name():
    assert set(_META["attention_backend"]["choices"]) == set(CHOICES) == {"auto", "torch", "sdpa", "triton",
                                                                          "reference"}
    for name in ("auto", "torch", "sdpa", "reference"):
        assert EngineConfig(model="unused", device="cpu", attention_backend=name).attention_backend == name
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model="unused", device="cpu", attention_backend="flash")


@pytest.mark.parametrize("window", [None, 20])
def test_triton_metadata_matches_the_per_sequence_one(window):
    """The flat builder packs exactly what the per-sequence metadata says: tables (from the
    window's first block), query offsets, context lengths, key starts and slots."""
    from kvtier.engine.attention.backends.triton_backend import build_triton_metadata
    from kvtier.engine.kernels.attention_inputs import from_metadata, slot_mapping

    specs = [(0, 7, [4]), (40, 1, [-1, 9, 2]), (16, 20, [5, 6, 3]), (33, 1, [8, 1, 11]), (0, 1, [12])]
    if window is None:
        specs[1] = (40, 1, [7, 9, 2])
    dev = torch.device(DEVICE)
    ours = build_triton_metadata(specs, 16, dev, window, invariant=[False, False, True, False, False])
    meta = build_attention_metadata(specs, 16, dev, window=window)
    ref = from_metadata(meta)
    for name in ("block_tables", "cu_seqlens_q", "seq_lens", "key_start"):
        assert torch.equal(getattr(ours.inputs, name).cpu(), getattr(ref, name).cpu()), name
    assert (ours.inputs.max_q_len, ours.inputs.max_seq_len, ours.inputs.window) == (20, 41, window)
    assert torch.equal(ours.slots.long().cpu(), slot_mapping(meta).cpu())
    # The deterministic sequence keeps its own table for the invariant path.
    [inv] = ours.invariant_seqs
    assert (inv.q_start, inv.q_len, inv.ctx_len, inv.key_start, inv.invariant) == (8, 20, 36, 0, True)
    assert inv.block_table.tolist() == [5, 6, 3]
    everyone = build_triton_metadata(specs[:1], 16, dev, window, invariant=[True])
    assert everyone.inputs is None  # all rows are the invariant path's: no kernel launch


# ---- end to end: greedy tokens against the torch backend --------------------------------

def _prompts(n_tokens, seed=0, vocab=500):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in n_tokens]


def _greedy(path, backend, rounds, **engine_args):
    """Tokens of each round of prompts, run one round after another in one engine (later
    rounds find earlier prompts' prefixes in the device cache)."""
    with LLM(path, device=DEVICE, dtype="float32", attention_backend=backend, **engine_args) as llm:
        assert llm.engine.runner.attention.name == resolve_backend(backend, DEVICE)
        return [[o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                GREEDY, use_tqdm=False)]
                for prompts in rounds]


def _check_backends(path, rounds, backends=("sdpa", "triton"), **engine_args):
    expected = _greedy(path, "torch", rounds, **engine_args)
    for backend in backends:
        if backend == "triton" and not triton_available(DEVICE):
            continue
        assert _greedy(path, backend, rounds, **engine_args) == expected, backend


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(variant):
        if variant not in made:
            made[variant] = make_variant(tmp_path_factory.mktemp(variant), variant)
        return made[variant]

    return get


@pytest.mark.parametrize("block_size", [16, 32])
def test_gqa_mixed_prefill_and_decode(models, block_size):
    """GQA (4 query heads on 2 KV heads); a 24-token budget splits the longer prompts into
    chunks that share steps with the others' decodes."""
    rounds = [_prompts([3, 21, 45, 9])]
    _check_backends(models("llama"), rounds, block_size=block_size, max_num_batched_tokens=24)


def test_chunked_prefill_over_a_cached_prefix(models):
    """The second round extends the first round's prompts: its prefills start on cached
    blocks and run in 16-token chunks, beside decodes."""
    first = _prompts([40, 34])
    second = [first[0] + _prompts([30], seed=1)[0], first[1][:32] + _prompts([5], seed=2)[0], _prompts([4], 3)[0]]
    _check_backends(models("llama"), [first, second], block_size=16, max_num_batched_tokens=16)


def test_sliding_window(models):
    """Mistral with a 24-token window on every layer: chunks and decodes past the window,
    with the blocks before it freed."""
    rounds = [_prompts([50, 8, 27])]
    _check_backends(models("mistral_sliding"), rounds, block_size=16, max_num_batched_tokens=20)


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [16, 32])
def test_sliding_and_full_layers_with_prefix_hits(models, block_size):
    """Qwen2 with a full-attention first layer and sliding layers after it (two KV groups);
    the second round resumes from cached prefixes."""
    first = _prompts([60, 12])
    second = [first[0] + _prompts([9], seed=4)[0], _prompts([33], seed=5)[0]]
    _check_backends(models("qwen2_sliding"), [first, second], block_size=block_size, max_num_batched_tokens=24)


@pytest.mark.slow
def test_head_dim_32(models):
    """Qwen3: head_dim 32 with per-head q/k norms."""
    _check_backends(models("qwen3"), [_prompts([37, 6])], block_size=16, max_num_batched_tokens=32)


def test_deterministic_requests_take_the_invariant_path(models):
    """Deterministic mode with the triton backend: the deterministic request's bits are the
    invariant path's, the same as under the torch backend, while an opted-out request beside
    it goes through the backend and still matches greedy."""
    path = models("llama")
    prompts = [{"prompt_token_ids": p} for p in _prompts([30, 11])]
    params = [SamplingParams(temperature=0, max_tokens=4, logprobs=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, deterministic=False)]
    outs = {}
    for backend in ("torch", "triton"):
        with LLM(path, device=DEVICE, attention_backend=backend, deterministic=True,
                 max_num_batched_tokens=24) as llm:
            res = llm.generate(prompts, params, use_tqdm=False)
        o = res[0].outputs[0]
        outs[backend] = (o.token_ids, [e[t].logprob for e, t in zip(o.logprobs, o.token_ids)],
                         res[1].outputs[0].token_ids)
    assert outs["triton"] == outs["torch"]


@pytest.mark.slow
def test_hybrid_mamba2_and_attention(models):
    """Granite-4.0-H shaped: SSM groups beside the attention group; only the attention
    group's metadata comes from the backend."""
    _check_backends(models("granite_hybrid"), [_prompts([45, 7])], backends=("triton",), block_size=16,
                    max_num_batched_tokens=24)
