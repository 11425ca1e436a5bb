"""End-to-end engine behaviour: exact greedy parity with Hugging Face, scheduling variants,
block accounting, seeded sampling, stop conditions and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from infinite_llm import (  # the README's error types, from the package itself
    LLM,
    ConfigError,
    ModelNotFoundError,
    RequestError,
    SamplingParams,
    SamplingParamsError,
)
from infinite_llm.request import Request, ScheduledBatch

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _prompts(vocab: int, lengths: tuple[int, ...] = (3, 17, 40, 9)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(path: Path, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for ids in prompts:  # one at a time: no padding, so HF's own numerics are the reference
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=None,
                             do_sample=False, pad_token_id=0)
        outs.append(out[0, len(ids):].tolist())
    return outs


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _all_free(llm: LLM) -> bool:
    return all(s.free == s.total and s.own == s.lent == s.borrowed == 0 for s in llm.kv_stats())


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2"])
def test_greedy_equals_hugging_face(tiny_checkpoint, arch: str) -> None:
    path = tiny_checkpoint(arch)
    prompts = _prompts(49152)
    llm = LLM(str(path), num_kv_blocks=64, block_size=4)
    assert _tokens(llm, prompts) == _hf_greedy(path, prompts)
    assert _all_free(llm)


@pytest.mark.slow
def test_default_model_greedy_equals_hugging_face(default_model_path: Path) -> None:
    llm = LLM(num_kv_blocks=256)
    questions = ["What is the capital of France?", "Name three primary colors.",
                 "Write a haiku about the sea, please, in English."]
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    ours = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == _hf_greedy(default_model_path, prompts)
    first = llm.chat([{"role": "user", "content": questions[0]}],
                     SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert first.text.strip() == "The capital of France is Paris."
    assert first.finish_reason == "stop"


@pytest.fixture(scope="module")
def llama_path(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def reference_tokens(llama_path: Path) -> list[list[int]]:
    return _tokens(LLM(str(llama_path), num_kv_blocks=256, block_size=4), _prompts(49152))


def test_chunked_prefill_gives_same_tokens(llama_path: Path, reference_tokens) -> None:
    llm = LLM(str(llama_path), num_kv_blocks=256, block_size=4, max_num_batched_tokens=7)
    assert _tokens(llm, _prompts(49152)) == reference_tokens
    assert _all_free(llm)


def test_one_at_a_time_equals_all_together(llama_path: Path, reference_tokens) -> None:
    llm = LLM(str(llama_path), num_kv_blocks=256, block_size=4, max_num_seqs=1)
    assert _tokens(llm, _prompts(49152)) == reference_tokens
    assert [_tokens(llm, [p])[0] for p in _prompts(49152)] == reference_tokens


def test_small_pool_preempts_and_recomputes(llama_path: Path, reference_tokens) -> None:
    # 40 + 32 tokens need 18 blocks of 4; 20 blocks cannot hold all four requests at once.
    llm = LLM(str(llama_path), num_kv_blocks=20, block_size=4)
    assert _tokens(llm, _prompts(49152)) == reference_tokens
    assert llm.engine.num_preemptions > 0
    assert _all_free(llm)


def test_block_counts_while_running_and_after_abort(llama_path: Path) -> None:
    llm = LLM(str(llama_path), num_kv_blocks=64, block_size=4)
    engine = llm.engine
    a = engine.add_request(list(range(10, 23)), GREEDY)  # 13 tokens -> 4 blocks
    b = engine.add_request(list(range(30, 35)), GREEDY)  # 5 tokens -> 2 blocks
    engine.step()
    stats = llm.kv_stats()[0]
    assert (stats.total, stats.own, stats.free, stats.lent, stats.borrowed) == (64, 6, 58, 0, 0)
    engine.abort_request(a)
    assert llm.kv_stats()[0].own == 2
    engine.abort_request(b)
    assert not engine.has_unfinished_requests() and _all_free(llm)


def test_seeded_sampling_is_reproducible(llama_path: Path) -> None:
    llm = LLM(str(llama_path), num_kv_blocks=128, block_size=4)
    prompt = _prompts(49152)[1]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    alone = _tokens(llm, [prompt], seeded)[0]
    other = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    mixed = _tokens(llm, [_prompts(49152)[0], prompt, prompt], [other, seeded, other])
    assert mixed[1] == alone
    reseeded = SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=24, ignore_eos=True)
    assert _tokens(llm, [prompt], reseeded)[0] != alone


def test_stop_token_ids_max_tokens_and_logprobs(llama_path: Path, reference_tokens) -> None:
    llm = LLM(str(llama_path), num_kv_blocks=128, block_size=4)
    prompt, ref = _prompts(49152)[2], reference_tokens[2]
    stop_at = ref[5]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                                stop_token_ids=[stop_at], logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[: ref.index(stop_at) + 1] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids)
    for token, lp in zip(out.token_ids, out.logprobs):
        assert token in lp and max(lp, key=lp.get) == token and len(lp) == 3
    short = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert short.token_ids == ref[:4] and short.finish_reason == "length"


def test_stop_string_truncates_text(llama_path: Path, reference_tokens) -> None:
    llm = LLM(str(llama_path), num_kv_blocks=128, block_size=4)
    prompt = _prompts(49152)[2]
    full = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert full == llm.tokenizer.decode(reference_tokens[2], skip_special_tokens=True)
    stop = full[10:14]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                                stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == full[: full.index(stop)] and out.finish_reason == "stop"
    assert _all_free(llm)


def test_bad_input_raises_typed_errors_and_leaks_nothing(llama_path: Path, tmp_path) -> None:
    llm = LLM(str(llama_path), num_kv_blocks=8, block_size=4)  # 32 tokens at most
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[1, 2], []], use_tqdm=False)
    with pytest.raises(RequestError, match="at most 32 tokens"):
        llm.generate([[5] * 10, list(range(40))], use_tqdm=False)
    with pytest.raises(RequestError, match="token ids"):
        llm.generate([[49152]], use_tqdm=False)
    with pytest.raises(RequestError, match="not valid Unicode"):
        llm.generate(["a lone surrogate \ud800"], use_tqdm=False)
    with pytest.raises(SamplingParamsError, match="temperature"):
        llm.generate(["hi"], SamplingParams(temperature=-1.0), use_tqdm=False)
    with pytest.raises(RequestError, match="chat template rejected"):
        llm.chat([{"content": "a message without a role"}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and _all_free(llm)
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="unknown engine options"):
        LLM(str(llama_path), num_kv_blockz=8)
    for bad in (2.5, "2", None, True):  # a float reached range() as a TypeError when spawning
        with pytest.raises(ConfigError, match=f"num_instances must be an integer, got {bad!r}"):
            LLM(str(llama_path), num_instances=bad)
    missing_gpu = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any machine
    with pytest.raises(ConfigError, match=f"device '{missing_gpu}' is not available"):
        LLM(str(llama_path), device=missing_gpu)
    with pytest.raises(ConfigError, match="data_backend 'nccl' needs device 'cuda'"):
        LLM(str(llama_path), device="cpu", data_backend="nccl", num_instances=2)
    # A prompt that fits but whose output would not: generation stops at the pool's limit.
    out = llm.generate([list(range(10, 30))], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length" and _all_free(llm)


def test_sampling_params_of_the_wrong_type_are_named_at_the_call(llama_path: Path) -> None:
    """A dict (vLLM's users try it) was an AttributeError from deep inside the engine."""
    llm = LLM(str(llama_path), num_kv_blocks=8, block_size=4)
    hi = [{"role": "user", "content": "hi"}]
    for bad in ({"max_tokens": 5}, [{"max_tokens": 5}], [GREEDY, "greedy"], 0.5):
        for prompts in ([1, 2], [[1, 2], [3, 4]]):
            with pytest.raises(SamplingParamsError,
                               match="sampling_params must be a SamplingParams"):
                llm.generate(prompts, bad, use_tqdm=False)
        with pytest.raises(SamplingParamsError, match="sampling_params must be a SamplingParams"):
            llm.chat([hi, hi], bad, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and _all_free(llm)


def test_dummy_weights_engine_runs_from_config_json_alone(llama_path: Path, tmp_path) -> None:
    (tmp_path / "config.json").write_text((llama_path / "config.json").read_text())
    llm = LLM(str(tmp_path), load_format="dummy", num_kv_blocks=16, block_size=4)
    out = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == NEW_TOKENS and _all_free(llm)
    with pytest.raises(ConfigError, match="load_format"):
        LLM(str(tmp_path), load_format="random")


def test_a_step_queued_ahead_matches_only_itself() -> None:
    """Async scheduling's check that the scheduled step is the one queued ahead (it runs on GPUs
    only, but is bookkeeping, so CI checks it here): same requests in any order, one token each,
    each at the position computed ahead."""
    a = Request("a", [1, 2, 3], SamplingParams(), 8, frozenset())
    b = Request("b", [4, 5], SamplingParams(), 8, frozenset())
    a.num_computed_tokens, b.num_computed_tokens = 3, 2  # sampled, not yet appended
    ahead = ScheduledBatch((a, b), (3, 2), (1, 1), (True, True))
    a.append_token(7)
    b.append_token(8)
    assert ScheduledBatch.of([b, a], [1, 1]).is_decode_of(ahead)
    assert not ScheduledBatch.of([a], [1]).is_decode_of(ahead)  # b stopped or was preempted
    assert not ScheduledBatch.of([a, b], [1, 2]).is_decode_of(ahead)
    b.append_token(9)  # a token the step queued ahead did not feed
    assert not ScheduledBatch.of([a, b], [1, 1]).is_decode_of(ahead)
