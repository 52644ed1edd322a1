"""The multimodal Gemma 4 model (transformers' Gemma4ForConditionalGeneration): the text decoder plus
the vision tower (every size) and the audio tower (E2B/E4B) with their projections into text space.

A prompt with media runs through `run_prompt`: the placeholder tokens (one per soft token) get the
towers' outputs instead of token embeddings; their per-layer embeddings (E2B/E4B) look up the pad id
and project the soft tokens, as transformers does; when the config says
`use_bidirectional_attention: "vision"` (26B/31B) each image's tokens attend to each other both ways on
sliding layers only; chunked prefill never splits an image. Decoding after the prompt is plain text.

Weight names: the text decoder as in text.py (`model.*`), towers as transformers names them after its
`model.` prefix (`vision_tower.*`, `embed_vision.*`, `audio_tower.*`, `embed_audio.*`).
"""

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import numpy as np

from ..config import TextConfig
from . import text
from .vision import MultimodalEmbedder, VisionConfig, VisionTower

# transformers' Gemma4Config defaults: the real Gemma 4 vocabulary's ids.
TOKEN_DEFAULTS = dict(
    image_token_id=258_880, audio_token_id=258_881, video_token_id=258_884,
    boi_token_id=255_999, eoi_token_id=258_882, boa_token_id=256_000, eoa_token_id=258_883,
)  # fmt: skip
IMAGE_BUDGETS = (70, 140, 280, 560, 1120)


@dataclass
class VisionInput:
    """One image, or the sampled frames of one video: patches of one grid, row-major, unpadded."""

    pixels: np.ndarray  # [frames, rows * cols, 3 * patch^2] float32 in [0, 1]
    grid: tuple  # (rows, cols) of patches
    timestamps: Optional[list] = None  # seconds of each frame (videos)

    def soft_tokens(self, pooling: int) -> int:
        """Soft tokens per frame."""
        return self.grid[0] * self.grid[1] // pooling**2

    def positions(self) -> np.ndarray:
        """(x, y) of each patch, [rows * cols, 2]."""
        rows, cols = self.grid
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        return np.stack([xs.ravel(), ys.ravel()], axis=-1)


@dataclass
class AudioInput:
    features: np.ndarray  # [frames, mel bins] float32
    mask: np.ndarray  # [frames] bool, True for real frames


@dataclass
class Media:
    """A prompt's media in prompt order, each kind filling its own placeholder tokens."""

    images: list = field(default_factory=list)  # VisionInput
    videos: list = field(default_factory=list)  # VisionInput
    audio: list = field(default_factory=list)  # AudioInput

    def __bool__(self) -> bool:
        return bool(self.images or self.videos or self.audio)


@dataclass
class MultimodalConfig:
    text: TextConfig
    vision: Optional[VisionConfig]
    audio: Optional[dict]  # the checkpoint's audio_config, read by audio.AudioConfig
    tokens: dict  # TOKEN_DEFAULTS' keys -> ids
    image_budget: int = 280

    @classmethod
    def from_dict(cls, config: dict, vision: bool = True, audio: bool = True) -> "MultimodalConfig":
        """`vision` / `audio`: whether to build that tower (the checkpoint holds its weights)."""
        tokens = {k: config.get(k, v) for k, v in TOKEN_DEFAULTS.items()}
        tokens["eoa_token_id"] = config.get("eoa_token_index", tokens["eoa_token_id"])
        vision_config = config.get("vision_config") if vision else None
        return cls(
            text=TextConfig.from_dict(config),
            vision=VisionConfig.from_dict(vision_config) if vision_config else None,
            audio=(config.get("audio_config") or None) if audio else None,
            tokens=tokens,
            image_budget=config.get("vision_soft_tokens_per_image", 280),
        )


class Model(text.Model):
    """`model(ids, cache)` decodes text exactly like text.Model; `run_prompt` takes a prompt with media."""

    def __init__(self, config: MultimodalConfig):
        super().__init__(config.text)
        self.multimodal = config
        hidden = config.text.hidden_size
        if config.vision is not None:
            self.vision_tower = VisionTower(config.vision)
            self.embed_vision = MultimodalEmbedder(config.vision.hidden_size, hidden, config.vision.rms_norm_eps)
        if config.audio is not None:
            from .audio import AudioConfig, AudioEmbedder, AudioEncoder

            audio_config = AudioConfig.from_dict(config.audio)
            self.audio_tower = AudioEncoder(audio_config)
            self.embed_audio = AudioEmbedder(audio_config, hidden)

    @property
    def has_vision(self) -> bool:
        return self.multimodal.vision is not None

    @property
    def has_audio(self) -> bool:
        return self.multimodal.audio is not None

    def image_features(self, item: VisionInput) -> mx.array:
        """Soft tokens of one image or video in text space, [frames * tokens, hidden]."""
        pixels = mx.array(item.pixels, dtype=self.embed_vision.embedding_projection.weight.dtype)
        positions = mx.array(item.positions())[None]
        soft = self.vision_tower(pixels, mx.broadcast_to(positions, (*pixels.shape[:2], 2)), item.grid)
        return self.embed_vision(soft.reshape(-1, soft.shape[-1]))

    def audio_features(self, item: AudioInput) -> mx.array:
        hidden, mask = self.audio_tower(mx.array(item.features)[None], mx.array(item.mask)[None])
        kept = np.flatnonzero(np.array(mask[0]))
        return self.embed_audio(hidden[0][mx.array(kept)])

    def embed_prompt(self, tokens: np.ndarray, media: Media) -> mx.array:
        """Input embeddings [1, L, hidden]: token embeddings, media placeholders replaced by soft tokens."""
        ids = self.multimodal.tokens
        kinds = (
            ("image", ids["image_token_id"], media.images, self.image_features, self.has_vision),
            ("video", ids["video_token_id"], media.videos, self.image_features, self.has_vision),
            ("audio", ids["audio_token_id"], media.audio, self.audio_features, self.has_audio),
        )
        h = self.model.embed(mx.array(self.text_ids(tokens))[None])[0]
        for kind, token, items, encode, supported in kinds:
            slots = np.flatnonzero(tokens == token)
            if items and not supported:
                raise ValueError(f"this checkpoint has no {'vision' if kind != 'audio' else 'audio'} tower for {kind} input")
            features = mx.concatenate([encode(item) for item in items]) if items else None
            count = 0 if features is None else features.shape[0]
            if count != len(slots):
                raise ValueError(f"the prompt has {len(slots)} {kind} placeholder tokens but its {kind} inputs "
                                 f"give {count} soft tokens")  # fmt: skip
            if count:
                h[mx.array(slots)] = features.astype(h.dtype)
        return h[None]

    def media_mask(self, tokens: np.ndarray) -> np.ndarray:
        ids = self.multimodal.tokens
        return np.isin(tokens, [ids["image_token_id"], ids["video_token_id"], ids["audio_token_id"]])

    def text_ids(self, tokens: np.ndarray) -> np.ndarray:
        """The ids the token and per-layer embeddings look up: media placeholders become the pad id."""
        return np.where(self.media_mask(tokens), self.config.pad_token_id or 0, tokens).astype(np.int32)

    def vision_blocks(self, tokens: np.ndarray) -> Optional[np.ndarray]:
        """Each run of image/video placeholders numbered (-1 elsewhere), when the config wants them
        bidirectional; else None."""
        if self.config.use_bidirectional_attention != "vision":
            return None
        ids = self.multimodal.tokens
        vision = np.isin(tokens, [ids["image_token_id"], ids["video_token_id"]])
        starts = vision & ~np.concatenate([[False], vision[:-1]])
        return np.where(vision, np.cumsum(starts) - 1, -1)

    def run_prompt(self, tokens, media: Media, cache: list, step: int = 512, all_logits: bool = False) -> mx.array:
        """Prefill `tokens` (with media) in chunks of about `step` that never split a media span.

        Returns the last position's logits [1, vocab], or with `all_logits` every position's [1, L, vocab].
        """
        tokens = np.asarray(tokens)
        embeddings = self.embed_prompt(tokens, media)
        text_ids = mx.array(self.text_ids(tokens))[None]
        blocks = self.vision_blocks(tokens)
        outputs = []
        for start, end in chunk_ranges(self.media_mask(tokens), step):
            chunk_blocks = blocks[start:end] if blocks is not None and (blocks[start:end] >= 0).any() else None
            logits = self(
                text_ids[:, start:end],
                cache=cache,
                logits_to_keep=0 if all_logits else 1,
                embeddings=embeddings[:, start:end],
                vision_blocks=chunk_blocks,
            )
            mx.eval(logits, [c.keys for c in cache])
            outputs.append(logits)
        return mx.concatenate(outputs, axis=1) if all_logits else outputs[-1][:, -1, :]


def chunk_ranges(media: np.ndarray, step: int) -> list[tuple[int, int]]:
    """[start, end) chunks of about `step` tokens; a run of media tokens is never cut (a chunk grows to
    hold a run longer than `step`)."""
    length, ranges, start = len(media), [], 0
    while start < length:
        end = min(start + step, length)
        if end < length and media[end - 1] and media[end]:
            run_start = end - 1
            while run_start > start and media[run_start - 1]:
                run_start -= 1
            if run_start > start:
                end = run_start
            else:
                while end < length and media[end]:
                    end += 1
        ranges.append((start, end))
        start = end
    return ranges
