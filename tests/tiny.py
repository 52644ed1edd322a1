"""Random tiny Gemma 4 checkpoints of each variant style, written by transformers (the oracle)."""

import json
from pathlib import Path

import numpy as np

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")

WINDOW = 8

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    sliding_window=WINDOW,
    final_logit_softcapping=30.0,
    max_position_embeddings=512,
)

# The four variant styles of the real family, shrunk.
VARIANTS = {
    # PLE, KV sharing (2 of 6 layers), double-wide MLP on shared layers, 4:1 pattern, 1 KV head.
    "e2b": dict(
        COMMON,
        num_hidden_layers=6,
        intermediate_size=48,
        num_key_value_heads=1,
        layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
        num_kv_shared_layers=3,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=96,
        use_double_wide_mlp=True,
    ),
    # PLE, KV sharing, 5:1 pattern, 2 KV heads, uniform MLP.
    "e4b": dict(
        COMMON,
        num_hidden_layers=7,
        intermediate_size=80,
        num_key_value_heads=2,
        layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=96,
    ),
    # MoE with a dense branch, k_eq_v with separate global KV heads, no PLE.
    "26b": dict(
        COMMON,
        num_hidden_layers=4,
        intermediate_size=40,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=24,
    ),
    # Dense, k_eq_v, global KV heads, no PLE.
    "31b": dict(
        COMMON,
        num_hidden_layers=4,
        intermediate_size=96,
        num_key_value_heads=4,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        hidden_size_per_layer_input=0,
    ),
}


def randomize_(model, seed: int, scale: float = 0.15):
    """transformers initialises norms to 1 and scalars to 1; random values make parity bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(("router.scale", "per_expert_scale")):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("layer_scalar"):
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
            else:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))


def save_causal_lm(variant: str, folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = transformers.Gemma4TextConfig(**{**VARIANTS[variant], **overrides})
    model = transformers.Gemma4ForCausalLM(config).eval()
    randomize_(model, seed)
    model.save_pretrained(folder)
    return folder


def oracle_logits(folder: Path, ids: np.ndarray, attention_mask=None) -> np.ndarray:
    """transformers' logits for int ids [B, L], float32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        out = model(torch.tensor(ids, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save_tokenizer(folder: Path, vocab_size: int = 96) -> Path:
    """A word-level tokenizer over `vocab_size` tokens, enough for tools that insist on one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab_size)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return folder


# Multimodal: tiny vision (and audio) towers next to a text variant. Token ids sit inside the tiny
# vocabulary (the real ones, 255999..258884, do not), in transformers' Gemma4Config fields.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
              position_embedding_size=256, standardize=True)  # fmt: skip
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[8, 4],
             output_proj_dims=32, attention_chunk_size=4, attention_context_left=5)  # fmt: skip
MEDIA_TOKENS = dict(boa_token_id=86, eoa_token_index=87, boi_token_id=88, eoi_token_id=89, image_token_id=90,
                    audio_token_id=91, video_token_id=92)  # fmt: skip


def save_multimodal(variant: str, folder: Path, seed: int = 0, vision=None, audio=None, scale: float = 0.1,
                    **text_overrides) -> Path:
    """A random tiny Gemma4ForConditionalGeneration (towers given as config dicts, None for none) and a tokenizer.

    Weights are a little smaller than save_causal_lm's: media prompts run 100+ tokens, and float32 noise
    in the random decoder grows with length past 1e-4 at 0.15 (text-only prompts included)."""
    torch.manual_seed(seed)
    config = transformers.Gemma4Config(
        text_config={**VARIANTS[variant], **text_overrides}, vision_config=vision, audio_config=audio, **MEDIA_TOKENS
    )
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    randomize_(model, seed, scale)
    with torch.no_grad():  # standardize buffers are not parameters; give them values that matter
        for name, buf in model.named_buffers():
            if name.endswith("std_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape))
            elif name.endswith("std_scale"):
                buf.copy_(0.5 + torch.rand(buf.shape))
    model.save_pretrained(folder)
    save_tokenizer(folder, VARIANTS[variant]["vocab_size"])
    return folder
