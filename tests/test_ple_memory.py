"""The per-layer embedding table is gathered from a memory map, never made resident."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_gemma4.config import TextConfig
from mlx_gemma4.model import Model

CONFIG = dict(
    model_type="gemma4_text", vocab_size=65536, vocab_size_per_layer_input=65536, hidden_size=64,
    intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    global_head_dim=32, hidden_size_per_layer_input=256, num_kv_shared_layers=1, sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
)
TABLE_BYTES = 65536 * 4 * 256 * 2  # bf16

MEASURE = """
import sys, mlx.core as mx
from mlx_gemma4 import load_model

def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024

before = rss()
model = load_model(sys.argv[1], map_ple=sys.argv[2] == 'mapped')
mx.eval(model(mx.array([[1, 60000, 300, 4]], dtype=mx.int32)))
print(rss() - before)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ple")
    model = Model(TextConfig.from_dict(CONFIG))
    model.set_dtype(mx.bfloat16)
    weights = dict(nn.utils.tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def grown(folder, mode):
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_mapped_table_stays_out_of_memory(checkpoint):
    resident, mapped = grown(checkpoint, "resident"), grown(checkpoint, "mapped")
    assert resident >= 0.8 * TABLE_BYTES  # the measurement can see the table
    assert mapped <= 0.25 * TABLE_BYTES, (mapped, resident)


def test_mapped_rows_equal_resident_rows(checkpoint):
    from mlx_gemma4 import load_model

    ids = mx.array([[0, 1, 65535, 12345]], dtype=mx.int32)
    mapped, resident = load_model(checkpoint), load_model(checkpoint, map_ple=False)
    assert mx.array_equal(mapped.model.embed_tokens_per_layer(ids), resident.model.embed_tokens_per_layer(ids))
    assert mx.array_equal(mapped(ids), resident(ids))
