"""The non-weight files of the output: tokenizer, templates and processor configs copied; a model card."""

import re
import shutil
from pathlib import Path
from typing import Optional

CARD_LICENSE = re.compile(r"^license:\s*(\S+)\s*$", re.MULTILINE)


def copy_side_files(files: list[Path], folder: Path):
    for file in files:
        shutil.copy2(file, folder / file.name)


def model_card(
    source: str,
    source_folder: Path,
    folder_name: str,
    command: str,
    summary: list[tuple[str, str]],
    multimodal: bool,
) -> str:
    """README.md: where the weights come from, how they were converted and stored, how to run them."""
    front = ["library_name: mlx", "tags:", "- mlx", "- gemma4", "- mlx-gemma4"]
    front.append(f"pipeline_tag: {'image-text-to-text' if multimodal else 'text-generation'}")
    if _is_hub_id(source):
        front.append(f"base_model: {source}")
    license_ = _source_license(source_folder)
    if license_:
        front.append(f"license: {license_}")
    rows = "\n".join(f"| {key} | {value} |" for key, value in summary)
    towers = (
        "\nThe vision and audio towers are kept (unquantized); `mlx_gemma4.load` and mlx-lm load the text "
        "decoder only.\n"
        if multimodal
        else ""
    )
    return f"""---
{chr(10).join(front)}
---

# {folder_name}

Gemma 4 weights converted from `{source}` to MLX by mlx-gemma4's converter:

```bash
{command}
```

| | |
|---|---|
{rows}
{towers}
## Use

```python
from mlx_gemma4 import load

model, tokenizer = load("{folder_name}")
```

The checkpoint also loads in mlx-lm (`mlx_lm.load("{folder_name}")`, text only).
"""


def _is_hub_id(source: str) -> bool:
    return not Path(source).expanduser().exists() and source.count("/") == 1


def _source_license(folder: Path) -> Optional[str]:
    card = folder / "README.md"
    if not card.exists():
        return None
    match = CARD_LICENSE.search(card.read_text(errors="replace"))
    return match.group(1) if match else None
