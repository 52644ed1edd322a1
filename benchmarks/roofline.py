"""Bytes a decode step must read from memory, hence the fastest decode the bandwidth allows.

Counted: every weight the step multiplies with (the tied embedding as the LM head, only the chosen
top-k of the experts), plus the keys and values attention reads at that depth. Not counted: gathered
embedding rows (token and per-layer tables), activations, the masks.
"""

from mlx.utils import tree_flatten


def weight_bytes_per_token(model) -> float:
    config = model.config
    total = 0.0
    for name, array in tree_flatten(model.parameters()):
        if name.startswith("model.embed_tokens_per_layer."):
            continue
        if name.startswith("model.embed_tokens.") and not config.tie_word_embeddings:
            continue
        share = config.top_k_experts / config.num_experts if ".experts." in name else 1.0
        total += array.nbytes * share
    return total


def kv_bytes_per_token(model, depth: int, bytes_per_element: int) -> int:
    """Keys + values held by the cache-owning layers at `depth` tokens (sliding layers cap at the window)."""
    config = model.config
    elements = 0
    for spec in config.layers:
        if spec.owns_kv:
            tokens = min(depth, config.sliding_window) if spec.is_sliding else depth
            elements += 2 * spec.num_kv_heads * spec.head_dim * tokens
    return elements * bytes_per_element


def bytes_per_token(model, depth: int) -> float:
    kv_element = model.model.norm.weight.dtype.size  # caches hold the activation dtype
    return weight_bytes_per_token(model) + kv_bytes_per_token(model, depth, kv_element)
