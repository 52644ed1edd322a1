"""Write the output folder all or nothing: a hidden temporary sibling, renamed into place at the end.

An exception (or Ctrl-C) removes the temporary folder; a process killed outright leaves only that
hidden `.NAME.*.partial` sibling behind, never a folder under the requested name.
"""

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from .errors import ConvertError

SHARD_BYTES = 5 << 30  # mlx-lm's and the hub's usual shard size
DISK_MARGIN = 64 << 20


def check_destination(out: Path, force: bool):
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force (force=True) to replace it, or choose another path")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a folder; it cannot be replaced by a model folder")


def check_disk_space(out: Path, needed: int):
    parent = existing_parent(out)
    free = shutil.disk_usage(parent).free
    if free < needed + DISK_MARGIN:
        raise ConvertError(
            f"not enough disk space in {parent}: the conversion writes about {needed / 1e9:.2f} GB and "
            f"{free / 1e9:.2f} GB are free"
        )


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


@contextmanager
def staging_folder(out: Path):
    """Yields an empty temporary folder next to `out`; on success it replaces `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def plan_shards(tensors: dict, max_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, value in tensors.items():
        if current and size + value.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += value.nbytes
    if current:
        shards.append(current)
    return shards


def save_shard(file: Path, tensors: dict):
    mx.save_safetensors(str(file), tensors, metadata={"format": "mlx"})


def write_weights(folder: Path, tensors: dict, max_bytes: int = SHARD_BYTES):
    """Evaluate and save shard by shard, then the index.

    Consumes `tensors`: each shard is dropped once saved, so that with lazy inputs memory stays near
    one shard (the caller must hold no other references to the arrays).
    """
    total = sum(v.nbytes for v in tensors.values())
    shards = plan_shards(tensors, max_bytes)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing") as bar:
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            shard = {name: tensors.pop(name) for name in names}
            mx.eval(shard)
            save_shard(folder / file, shard)
            weight_map.update({name: file for name in names})
            bar.update(sum(v.nbytes for v in shard.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
