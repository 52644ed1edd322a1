"""Images, video and audio -> model inputs: the prompt's token ids and its `Media`.

`prepare_inputs(model, tokenizer, prompt, images=..., audio=..., videos=..., image_tokens=280)` is the
one entry point (CLI, Python API, server). `prompt` is a list of chat messages (rendered with the chat
template; their image/audio/video parts may carry their sources) or a string with `<|image|>`,
`<|audio|>`, `<|video|>` markers (none: the markers go first, one per input).

Each marker expands as transformers' Gemma4Processor expands it:
- image: <boi> + one placeholder per soft token + <eoi>; the soft-token budget is 70/140/280/560/1120
  (default 280), images are resized (aspect ratio kept) by transformers' Pillow image processor;
- video: for each sampled frame (32 at most, uniformly, as transformers samples them) "mm:ss " +
  <boi> + placeholders + <eoi>, joined by spaces; each frame has its own budget (default 70).
  Frames are resized by the same Pillow image processor (transformers' video processor needs
  torchvision and resizes with its antialiased bicubic; the two resizers are not compared here);
- audio: <boa> + one placeholder per audio soft token + <eoa>.
Token ids come from the checkpoint's config (`MultimodalConfig.tokens`).
"""

import base64
import io
import re
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .audio_features import soft_token_counts
from .model.gemma4 import IMAGE_BUDGETS, AudioInput, Media, VisionInput

VIDEO_FRAMES = 32
VIDEO_BUDGET = 70
DEFAULT_FPS = 24.0  # transformers' assumption when a video does not say
MARKERS = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}
MARKER_PATTERN = re.compile("(" + "|".join(re.escape(m) for m in MARKERS.values()) + ")")
KIND_OF_MARKER = {marker: kind for kind, marker in MARKERS.items()}
PART_KINDS = {"image": "image", "image_url": "image", "audio": "audio", "input_audio": "audio", "video": "video"}


def read_source(source: Union[str, bytes, Path]) -> bytes:
    """Bytes of a path, an http(s) URL, a data: URL, or bytes as they are."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    source = str(source)
    if source.startswith("data:"):
        return base64.b64decode(source.split(",", 1)[1])
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=30) as response:
                return response.read()
        except OSError as error:
            raise ValueError(f"could not download {source}: {error}") from error
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"{source} is not a file, an http(s) URL or a data: URL")
    return path.read_bytes()


def pillow():
    try:
        import PIL.Image
        import PIL.ImageSequence
    except ImportError as error:
        raise ValueError("images and video need Pillow: pip install 'mlx-gemma4[vision]'") from error
    return PIL


def load_image(source):
    """An RGB Pillow image from a path, URL, data: URL, bytes or a Pillow image."""
    Image = pillow().Image
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        image = Image.open(io.BytesIO(read_source(source)))
        image.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read an image from {_describe(source)}: {error}") from error
    return image.convert("RGB")


def check_budget(budget: int, what: str = "image") -> int:
    if budget not in IMAGE_BUDGETS:
        raise ValueError(f"{what} token budget {budget} is not supported; choose one of {IMAGE_BUDGETS}")
    return budget


def image_processor(vision_config):
    """transformers' Gemma 4 image processor (its Pillow variant, which runs without torch)."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(patch_size=vision_config.patch_size, pooling_kernel_size=vision_config.pooling_kernel_size)


def process_images(images: Sequence, vision_config, budget: int) -> list[VisionInput]:
    """Pillow images -> one VisionInput each (transformers' pixels, its padding dropped)."""
    check_budget(budget)
    if not images:
        return []
    out = image_processor(vision_config)(list(images), max_soft_tokens=budget)
    return [_unpad(pixels, positions) for pixels, positions in zip(out["pixel_values"], out["image_position_ids"])]


def _unpad(pixels: np.ndarray, positions: np.ndarray) -> VisionInput:
    real = (np.asarray(positions) >= 0).all(-1)
    positions = np.asarray(positions)[real]
    cols = int(positions[:, 0].max()) + 1
    return VisionInput(np.asarray(pixels, np.float32)[real][None], (len(positions) // cols, cols))


def load_video(source, num_frames: int = VIDEO_FRAMES) -> tuple[list, list]:
    """Uniformly sampled RGB frames and their times in seconds.

    `source`: a video file or URL (decoded with PyAV, `pip install av`), an animated GIF/WebP/PNG
    (Pillow), or a list of frames (Pillow images or arrays, taken as 24 fps).
    """
    Image = pillow().Image
    if isinstance(source, (list, tuple)):
        frames, fps = [load_image(f) if not isinstance(f, np.ndarray) else Image.fromarray(f).convert("RGB") for f in source], DEFAULT_FPS
    else:
        data = read_source(source)
        frames, fps = _decode_animation(data)
        if frames is None:
            frames, fps = _decode_with_av(data, source)
    if not frames:
        raise ValueError(f"{_describe(source)} holds no video frames")
    count = min(num_frames, len(frames))
    indices = np.arange(count) * len(frames) // count  # transformers' default_sample_indices_fn
    return [frames[i] for i in indices], [int(i) / fps for i in indices]


def _decode_animation(data: bytes):
    PIL = pillow()
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except OSError:
        return None, None
    frames = [frame.convert("RGB") for frame in PIL.ImageSequence.Iterator(image)]
    duration_ms = image.info.get("duration") or 1000 / DEFAULT_FPS
    return frames, 1000.0 / duration_ms


def _decode_with_av(data: bytes, source):
    try:
        import av
    except ImportError as error:
        raise ValueError(f"decoding {_describe(source)} needs PyAV (pip install av), or give an animated "
                         "GIF/WebP or a list of frames") from error  # fmt: skip
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or DEFAULT_FPS)
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"cannot decode a video from {_describe(source)}: {error}") from error
    return frames, fps


def process_video(frames: list, timestamps: list, vision_config, budget: int = VIDEO_BUDGET) -> VisionInput:
    """All frames share the first frame's size (a video's frames do), so they share one patch grid."""
    check_budget(budget, "video frame")
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size) for f in frames]
    out = image_processor(vision_config)(frames, max_soft_tokens=budget)
    items = [_unpad(p, q) for p, q in zip(out["pixel_values"], out["image_position_ids"])]
    return VisionInput(np.concatenate([item.pixels for item in items]), items[0].grid, list(timestamps))


def process_audio(source, audio_config: dict) -> AudioInput:
    """Audio (path, URL, bytes; see audio_features.load_audio) -> its mel features, as transformers'
    extractor computes them with the tower's number of mel bins (128 on the released models)."""
    from .audio_features import audio_features, feature_extractor, load_audio
    from .model.audio import AudioConfig

    extractor = feature_extractor({"feature_size": AudioConfig.from_dict(audio_config).n_mels})
    features, mask = audio_features(load_audio(source), extractor)
    return AudioInput(features[0], mask[0])


def media_parts(messages: list) -> dict:
    """Sources carried by the messages' image/audio/video parts, per kind, in order (None when a part
    names no source)."""
    found = {kind: [] for kind in MARKERS}
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            kind = PART_KINDS.get(part.get("type"))
            if kind is None:
                continue
            value = part.get(part["type"], part.get("url", part.get("path")))
            if isinstance(value, dict):  # {"url": ...} or OpenAI's input_audio {"data": base64, "format": ...}
                value = value.get("url") or (base64.b64decode(value["data"]) if "data" in value else None)
            found[kind].append(value)
    return found


def prepare_inputs(
    model,
    tokenizer,
    prompt: Union[str, list],
    images: Sequence = (),
    audio: Sequence = (),
    videos: Sequence = (),
    image_tokens: Optional[int] = None,
    video_tokens: int = VIDEO_BUDGET,
    video_frames: int = VIDEO_FRAMES,
    **chat_options: Any,
) -> tuple[list[int], Media]:
    """(prompt token ids, Media) for `model`; generate with `stream_generate(model, tokenizer, ids, media=media)`.

    Media sources: paths, URLs, data: URLs, bytes, Pillow images (videos also as lists of frames).
    With messages, the sources come from their parts (`{"type": "image", "image": src}`,
    `{"type": "image_url", "image_url": {"url": src}}`, `{"type": "input_audio", "input_audio": {"data":
    base64}}`, ...) unless given as arguments, which then fill the parts in order. `chat_options`
    reach render_chat (e.g. `enable_thinking`, `tools`)."""
    config = model.multimodal if hasattr(model, "multimodal") else None
    image_tokens = check_budget(image_tokens or (config.image_budget if config else 280))
    check_budget(video_tokens, "video frame")
    sources = {"image": list(images), "audio": list(audio), "video": list(videos)}
    if isinstance(prompt, list):
        from .chat import render_chat

        for kind, carried in media_parts(prompt).items():
            if not sources[kind]:  # inputs given as arguments stand for the parts' sources (a server decodes them first)
                sources[kind] = carried
        text = render_chat(tokenizer, prompt, **chat_options)
    elif not MARKER_PATTERN.search(prompt):
        text = "".join(MARKERS[kind] * len(sources[kind]) for kind in MARKERS) + prompt
    else:
        text = prompt
    pieces = MARKER_PATTERN.split(text)
    counts = {kind: pieces.count(marker) for kind, marker in MARKERS.items()}
    for kind, count in counts.items():
        if any(s is None for s in sources[kind]):
            raise ValueError(f"a message's {kind} part names no source; give it one ({{'type': '{kind}', "
                             f"'{kind}': path_or_url}}) or pass {kind} inputs to prepare_inputs")  # fmt: skip
        if count != len(sources[kind]):
            raise ValueError(f"the prompt has {count} {MARKERS[kind]} markers but {len(sources[kind])} {kind} inputs")
    if not any(counts.values()):
        return _encode(tokenizer, [text]), Media()
    if config is None:
        raise ValueError("this model is text-only: its checkpoint has no vision or audio tower")
    media = _load_media(config, sources, image_tokens, video_tokens, video_frames)
    return _encode(tokenizer, _expand(pieces, media, config)), media


def _load_media(config, sources: dict, image_tokens: int, video_tokens: int, video_frames: int) -> Media:
    if (sources["image"] or sources["video"]) and config.vision is None:
        raise ValueError("this checkpoint has no vision tower; it cannot take images or video")
    if sources["audio"] and config.audio is None:
        raise ValueError("this checkpoint has no audio tower (Gemma 4 hears on E2B/E4B only)")
    images = process_images([load_image(s) for s in sources["image"]], config.vision, image_tokens)
    videos = [process_video(*load_video(s, video_frames), config.vision, video_tokens) for s in sources["video"]]
    return Media(images, videos, [process_audio(s, config.audio) for s in sources["audio"]])


def _expand(pieces: list, media: Media, config) -> list:
    """Text pieces and id runs: every marker replaced by its begin token, placeholders and end token."""
    ids, pooling = config.tokens, config.vision.pooling_kernel_size if config.vision else 1
    queues = {"image": iter(media.images), "audio": iter(media.audio), "video": iter(media.videos)}
    out = []
    for piece in pieces:
        kind = KIND_OF_MARKER.get(piece)
        if kind is None:
            out.append(piece)
            continue
        item = next(queues[kind])
        if kind == "image":
            out.append([ids["boi_token_id"], *[ids["image_token_id"]] * item.soft_tokens(pooling), ids["eoi_token_id"]])
        elif kind == "audio":
            count = soft_token_counts(item.mask[None])[0]
            out.append([ids["boa_token_id"], *[ids["audio_token_id"]] * count, ids["eoa_token_id"]])
        else:
            frame = [ids["boi_token_id"], *[ids["video_token_id"]] * item.soft_tokens(pooling), ids["eoi_token_id"]]
            for n, seconds in enumerate(item.timestamps):
                out += [(" " if n else "") + f"{int(seconds // 60):02d}:{int(seconds % 60):02d} ", frame]
    return out


def _encode(tokenizer, pieces: list) -> list[int]:
    """Token ids of text pieces and id runs, BOS first (a rendered chat prompt carries its own).

    Neighbouring text is encoded as one piece: the tokenizer splits a whole string at the media's
    special tokens just the same."""
    bos = tokenizer.bos_token
    tokens = [tokenizer.bos_token_id] if bos and not pieces[0].startswith(bos) else []
    text = ""
    for piece in [*pieces, []]:
        if isinstance(piece, str):
            text += piece
            continue
        if text:
            tokens.extend(tokenizer.encode(text, add_special_tokens=False))
        tokens.extend(piece)
        text = ""
    return tokens


def _describe(source) -> str:
    return f"{len(source)} bytes" if isinstance(source, (bytes, bytearray)) else str(source)[:200]
