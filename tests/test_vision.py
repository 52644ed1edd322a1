"""The vision tower and image processing against transformers: soft tokens (vision tower + embed_vision)
of images of several aspect ratios at every token budget, float32."""

import numpy as np
import pytest

import mlx.core as mx

from tiny import VISION, save_multimodal, torch, transformers

from mlx_gemma4.loading import load_model
from mlx_gemma4.model.gemma4 import IMAGE_BUDGETS
from mlx_gemma4.processing import process_images

TOL = 1e-4
# (height, width): tall, square, wide, a thin strip (one pooled row at small budgets)
SHAPES = [(90, 30), (64, 64), (40, 100), (12, 200)]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A 2x2-pooling tower keeps budget 1120 at 4480 patches (transformers pads every image to the
    budget's patch count and attends over all of them), a 3x3 one is the real pooling."""
    root = tmp_path_factory.mktemp("vision")
    out = {}
    for pooling in (2, 3):
        folder = save_multimodal("31b", root / str(pooling), seed=pooling, vision={**VISION, "pooling_kernel_size": pooling,
                                                                                   "position_embedding_size": 512})  # fmt: skip
        hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        out[pooling] = (load_model(folder), hf.model)
    return out


def image(height, width, seed):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("pooling, budgets", [
    (2, IMAGE_BUDGETS[:3]),
    (3, IMAGE_BUDGETS[:1]),
    # transformers pads every image to the budget's patch count (4480 at 1120 with 2x2 pools) and
    # attends over all of it: ~40 s more on two cores.
    pytest.param(2, IMAGE_BUDGETS[3:], marks=pytest.mark.slow),
    pytest.param(3, IMAGE_BUDGETS[1:3], marks=pytest.mark.slow),
])  # fmt: skip
def test_soft_tokens_match_transformers_at_every_budget(towers, pooling, budgets):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    model, hf = towers[pooling]
    processor = Gemma4ImageProcessorPil(patch_size=VISION["patch_size"], pooling_kernel_size=pooling)
    images = [image(h, w, i) for i, (h, w) in enumerate(SHAPES)]
    for budget in budgets:
        reference = processor(images, max_soft_tokens=budget)
        items = process_images(images, model.multimodal.vision, budget)
        assert [it.soft_tokens(pooling) for it in items] == list(reference["num_soft_tokens_per_image"])
        with torch.no_grad():
            theirs = hf.get_image_features(torch.tensor(reference["pixel_values"]),
                                           torch.tensor(reference["image_position_ids"])).pooler_output  # fmt: skip
        for (h, w), item, expected in zip(SHAPES, items, theirs):
            rows, cols = item.grid
            assert item.soft_tokens(pooling) <= budget and rows * cols <= budget * pooling**2
            assert abs(np.log((cols / rows) / (w / h))) < 0.5 or min(rows, cols) == pooling  # aspect ratio kept
            got = np.array(model.image_features(item))
            assert got.shape == tuple(expected.shape)
            assert np.abs(got - expected.numpy()).max() <= TOL, (budget, h, w)


def test_video_frames_share_one_grid_and_batch(towers):
    """Frames of a video run as one batch; each frame's soft tokens equal its run alone."""
    from mlx_gemma4.processing import process_video

    model = towers[3][0]
    frames = [image(50, 80, 20 + i) for i in range(3)]
    video = process_video(frames, [0.0, 0.5, 1.0], model.multimodal.vision, budget=70)
    batch = np.array(model.image_features(video))
    alone = [np.array(model.image_features(it)) for it in process_images(frames, model.multimodal.vision, 70)]
    assert np.abs(batch - np.concatenate(alone)).max() <= 1e-5


def test_bad_budget_and_broken_image_are_clear_errors(towers, tmp_path):
    from mlx_gemma4.processing import load_image

    model = towers[3][0]
    with pytest.raises(ValueError, match="token budget 300"):
        process_images([image(20, 20, 0)], model.multimodal.vision, 300)
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValueError, match="cannot read an image"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="patch grid"):
        model.vision_tower(mx.zeros((1, 10, 48)), mx.zeros((1, 10, 2), mx.int32), (2, 5))
