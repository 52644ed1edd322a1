"""Generation loop: sampling settings, stop conditions, streaming, prompt-cache reuse."""

import numpy as np
import pytest

import mlx_gemma4
from mlx_gemma4.generate import SamplingParams, held_back, stream_generate
from mlx_gemma4.prompt_cache import PromptCache
from tiny import WINDOW, save_causal_lm, save_tokenizer

pytest.importorskip("torch")
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = save_tokenizer(save_causal_lm("e2b", tmp_path_factory.mktemp("e2b"), seed=7))
    return mlx_gemma4.load(folder)


def run(model, tokenizer, prompt, **kwargs):
    responses = list(stream_generate(model, tokenizer, prompt, **kwargs))
    return "".join(r.text for r in responses), responses


def test_seed_makes_sampling_repeatable(loaded):
    model, tok = loaded
    params = SamplingParams(temperature=1.0, top_k=20, seed=11)
    a, _ = run(model, tok, [5, 6, 7], max_tokens=12, sampling=params)
    b, _ = run(model, tok, [5, 6, 7], max_tokens=12, sampling=params)
    c, _ = run(model, tok, [5, 6, 7], max_tokens=12, sampling=SamplingParams(temperature=1.0, top_k=20, seed=12))
    assert a == b and a != c


def test_top_k_one_and_min_p_one_are_greedy(loaded):
    model, tok = loaded
    greedy, _ = run(model, tok, [9, 10], max_tokens=10, sampling=GREEDY)
    for params in (SamplingParams(temperature=1.5, top_k=1, seed=0), SamplingParams(temperature=1.5, min_p=1.0, seed=0)):
        assert run(model, tok, [9, 10], max_tokens=10, sampling=params)[0] == greedy


def test_logit_bias_forces_a_token(loaded):
    model, tok = loaded
    _, responses = run(model, tok, [9, 10], max_tokens=5, sampling=SamplingParams(temperature=0.0, logit_bias={42: 1e4}))
    assert [r.token for r in responses] == [42] * 5


def test_repetition_penalty_changes_greedy_repeats(loaded):
    model, tok = loaded
    _, plain = run(model, tok, [9, 10], max_tokens=30, sampling=GREEDY)
    _, penalised = run(model, tok, [9, 10], max_tokens=30, sampling=SamplingParams(temperature=0.0, repetition_penalty=5.0))
    repeats = lambda rs: len(rs) - len({r.token for r in rs})  # noqa: E731
    assert repeats(penalised) < repeats(plain)


def test_stop_string_split_across_tokens(loaded):
    model, tok = loaded
    full, responses = run(model, tok, [9, 10], max_tokens=12, sampling=GREEDY)
    pieces = [r.text for r in responses]
    # A stop string made of the end of one piece and the start of the next.
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    where = full.find(stop)
    text, stopped = run(model, tok, [9, 10], max_tokens=12, sampling=GREEDY, stop=[stop])
    assert text == full[:where]
    assert stopped[-1].finish_reason == "stop"
    assert all(stop not in r.text for r in stopped)


def test_max_tokens_and_eos(loaded):
    model, tok = loaded
    _, responses = run(model, tok, [9, 10], max_tokens=7, sampling=GREEDY)
    assert len(responses) == 7 and responses[-1].finish_reason == "length"
    eos = next(iter(tok.eos_token_ids))
    _, ended = run(model, tok, [9, 10], max_tokens=7, sampling=SamplingParams(temperature=0.0, logit_bias={eos: 1e4}))
    assert len(ended) == 1 and ended[0].finish_reason == "stop" and ended[0].text == ""


def test_held_back():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("ab", ["abc", "b!"]) == 2


def test_bad_prompt_is_one_clear_error(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="empty"):
        next(stream_generate(model, tok, []))
    with pytest.raises(ValueError, match="token ids"):
        next(stream_generate(model, tok, [5, 10_000]))


def first_logprobs(model, tok, prompt, prompt_cache=None):
    response = next(stream_generate(model, tok, prompt, max_tokens=1, sampling=GREEDY,
                                    prompt_cache=prompt_cache, return_logprobs=True))
    return np.array(response.logprobs)


@pytest.mark.parametrize("diverge", [0, 5])
def test_prompt_cache_reuse_after_window_wrapped(loaded, diverge):
    """Turn 2 extends turn 1 (or rewrites its last `diverge` tokens) after the sliding window wrapped."""
    model, tok = loaded
    rng = np.random.default_rng(3)
    turn1 = rng.integers(4, 96, 3 * WINDOW).tolist()
    cache = PromptCache(model)
    generated = [r.token for r in stream_generate(model, tok, turn1, max_tokens=6, sampling=GREEDY, prompt_cache=cache)]
    history = turn1 + generated
    turn2 = history[: len(history) - diverge] + rng.integers(4, 96, 2 * WINDOW).tolist()
    reused = first_logprobs(model, tok, turn2, cache)
    assert cache.cache[0].offset == len(turn2) + 1  # kept what it had, ran only the new part
    fresh = first_logprobs(model, tok, turn2)
    assert np.abs(reused - fresh).max() <= 1e-4


def test_prompt_cache_divergence_beyond_slack_starts_over(loaded):
    model, tok = loaded
    rng = np.random.default_rng(4)
    turn1 = rng.integers(4, 96, 6 * WINDOW).tolist()
    cache = PromptCache(model)
    first_logprobs(model, tok, turn1, cache)
    turn2 = turn1[:WINDOW] + rng.integers(4, 96, 10).tolist()  # differs long before the slack
    remaining, _ = cache.prepare(turn2)
    assert remaining == turn2


def test_prompt_cache_file_round_trip(loaded, tmp_path):
    model, tok = loaded
    rng = np.random.default_rng(5)
    turn1 = rng.integers(4, 96, 3 * WINDOW).tolist()
    cache = PromptCache(model)
    first_logprobs(model, tok, turn1, cache)
    cache.save(tmp_path / "chat.safetensors")
    restored = PromptCache.load(tmp_path / "chat.safetensors", model)
    assert restored.tokens == cache.tokens
    turn2 = cache.tokens + [7, 8, 9]
    assert np.abs(first_logprobs(model, tok, turn2, restored) - first_logprobs(model, tok, turn2)).max() <= 1e-4
    assert not list(tmp_path.glob("*.partial*"))


def test_checkpoint_generation_config_supplies_defaults():
    defaults = {"do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95}
    resolved = SamplingParams(top_k=5).resolved(defaults)
    assert (resolved.temperature, resolved.top_k, resolved.top_p) == (1.0, 5, 0.95)
    assert SamplingParams().resolved({"do_sample": False}).temperature == 0.0


def test_bundled_model_answers_in_english_through_the_public_api():
    model, tokenizer = mlx_gemma4.load()
    assert model.generation_defaults["top_k"] == 64
    text = mlx_gemma4.generate(model, tokenizer, "The function returns", max_tokens=24, sampling=GREEDY)
    words = text.split()
    assert len(words) >= 5 and sum(w.strip(".,()`'").isalpha() for w in words) >= 0.6 * len(words), text
