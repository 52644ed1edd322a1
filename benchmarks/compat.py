"""mlx-lm 0.32 (and mlx-vlm 0.7) read only the older `global_head_dim` / `num_global_key_value_heads`
config spelling, not transformers >= 5.2x's `per_layer_config`: give them a copy of a model folder
whose config.json is rewritten that way (weights are linked, not copied)."""

import json
from pathlib import Path

from mlx_gemma4.config import TextConfig


def older_spelling_copy(folder: Path, into: Path) -> Path:
    into.mkdir(exist_ok=True)
    for item in folder.iterdir():
        if item.name != "config.json":
            (into / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    full = next(spec for spec in TextConfig.from_dict(config).layers if not spec.is_sliding)
    text.pop("per_layer_config", None)
    text["global_head_dim"] = full.head_dim
    if full.k_eq_v:
        text["num_global_key_value_heads"] = full.num_kv_heads
    (into / "config.json").write_text(json.dumps(config))
    return into
