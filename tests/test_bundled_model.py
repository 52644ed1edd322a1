"""The bundled toy model (mlx_gemma4/bundled/gemma4-tiny): tokenizer, configs and trained weights agree."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FOLDER = Path(__file__).resolve().parent.parent / "mlx_gemma4" / "bundled" / "gemma4-tiny"

SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
    "<|tool_response>", "<tool_response|>", '<|"|>', "<|think|>",
    "<|image>", "<image|>", "<|audio>", "<audio|>", "<|image|>", "<|audio|>", "<|video|>",
]  # fmt: skip

# Written for this test (not in the training data), in the register of library documentation.
SAMPLE = (
    "Return a new list containing the items of the iterable in sorted order. The optional key argument "
    "specifies a function of one argument that is used to extract a comparison key from each element. "
    "If the file does not exist, an exception is raised. When the timeout argument is present and not "
    "None, it should be a floating point number specifying a timeout for the operation in seconds. "
    "This method returns the number of bytes written to the stream, which may be less than the length "
    "of the data if the underlying object is in non-blocking mode. The default value is None, which "
    "means that the encoding of the current locale is used."
)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def model():
    return transformers.Gemma4ForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()


def test_special_tokens_are_single_registered_ids(tokenizer):
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids), dict(zip(SPECIAL_TOKENS, ids))
    assert [i[0] for i in ids[:5]] == [0, 1, 2, 3, 4]  # <pad> <eos> <bos> <unk> <mask>, as in Gemma 4
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tokenizer.sot_token, tokenizer.eot_token, tokenizer.image_token) == ("<|turn>", "<turn|>", "<|image|>")


def test_text_round_trips_and_prompts_start_with_bos(tokenizer):
    text = "def f(x):\n    return x  # café, naïve, 你好\t🙂"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.encode(text)[0] == tokenizer.bos_token_id


def test_generation_config_stops_on_eos_end_of_turn_and_tool_response(tokenizer):
    generation = json.loads((FOLDER / "generation_config.json").read_text())
    stops = tokenizer.convert_tokens_to_ids(["<eos>", "<turn|>", "<|tool_response>"])
    assert sorted(generation["eos_token_id"]) == sorted(stops)
    assert (generation["bos_token_id"], generation["pad_token_id"]) == (tokenizer.bos_token_id, tokenizer.pad_token_id)


def test_config_exercises_gemma4_features():
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and config["architectures"] == ["Gemma4ForCausalLM"]
    assert config["hidden_size_per_layer_input"] > 0 and config["num_kv_shared_layers"] > 0
    assert config["use_double_wide_mlp"] and config["final_logit_softcapping"] == 30.0
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["layer_types"][-1] == "full_attention" and config["global_head_dim"] != config["head_dim"]


def test_trained_model_beats_best_unigram_on_unseen_english(tokenizer, model):
    ids = tokenizer(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        model_ppl = math.exp(model(input_ids=ids, labels=ids).loss.item())
    # The sample's own token frequencies: no context-free model can score the sample better than this.
    targets = ids[0, 1:].tolist()
    counts = Counter(targets)
    oracle_unigram_ppl = math.exp(-sum(math.log(counts[t] / len(targets)) for t in targets) / len(targets))
    assert model_ppl < 0.7 * oracle_unigram_ppl, (model_ppl, oracle_unigram_ppl)  # trained: 28.6 vs 59.4


def test_chat_answer_closes_its_turn(tokenizer, model):
    # A quarter of the training documents were chat turns; the stop tokens must actually be produced.
    prompt = "<bos><|turn>user\nWhat is a list?<turn|>\n<|turn>model\n"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False)
    assert out[0, -1].item() == tokenizer.convert_tokens_to_ids("<turn|>"), tokenizer.decode(out[0, ids.shape[1] :])
