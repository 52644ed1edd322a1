"""Media parts of chat messages: where they may come from, how many, and whether they decode.

Sources: data: URLs (base64), and local paths / file:// URLs only under the server's allowed
folder (off by default). Remote http(s) URLs are not fetched: a local server that fetches what a
request names could be pointed at the user's intranet. Every failure is a 400 naming the part.
What comes out (Pillow images, 16 kHz waveforms) is what processing.prepare_inputs takes, so it
never reads a source itself.
"""

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from ..audio_features import AudioError, load_audio
from .protocol import APIError, AudioPart, ImagePart, Message


@dataclass
class MediaPolicy:
    allowed_dir: Optional[Path] = None  # local files readable by requests; None: none
    max_images: int = 8
    max_audio: int = 4


@dataclass
class MessageMedia:
    images: list  # decoded RGB Pillow images, in prompt order
    audio: list  # float32 mono 16 kHz waveforms, in prompt order


def collect(messages: list[Message], policy: MediaPolicy) -> MessageMedia:
    media = MessageMedia([], [])
    for m, message in enumerate(messages):
        for p, part in enumerate(message.content if isinstance(message.content, list) else []):
            where = f"messages.{m}.content.{p}"
            if isinstance(part, ImagePart):
                if len(media.images) == policy.max_images:
                    raise APIError(400, f"too many images: this server takes at most {policy.max_images} per request",
                                   param=where, code="too_many_images")
                media.images.append(decode_image(read_url(part.image_url.url, policy, where), where))
            elif isinstance(part, AudioPart):
                if len(media.audio) == policy.max_audio:
                    raise APIError(400, f"too many audio inputs: this server takes at most {policy.max_audio} per request",
                                   param=where, code="too_many_audio")
                media.audio.append(decode_audio(decode_base64(part.input_audio.data, where), where))
    return media


def decode_base64(text: str, where: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data is not valid base64", param=where, code="invalid_base64") from None
    if not data:
        raise APIError(400, f"{where}: the data is empty", param=where, code="invalid_base64")
    return data


def read_url(url: str, policy: MediaPolicy, where: str) -> bytes:
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{where}: expected a data URL of the form data:<type>;base64,<data>", param=where)
        return decode_base64(payload, where)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise APIError(400, f"{where}: remote URLs are not fetched; send the image as a data: URL", param=where,
                       code="remote_url_refused")
    if parsed.scheme not in ("", "file"):
        raise APIError(400, f"{where}: unsupported URL scheme {parsed.scheme!r}", param=where)
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
    return read_local(path, policy, where)


def read_local(path: Path, policy: MediaPolicy, where: str) -> bytes:
    if policy.allowed_dir is None:
        raise APIError(400, f"{where}: local file paths are off; start the server with --allowed-media-dir",
                       param=where, code="local_files_refused")
    resolved, allowed = path.resolve(), policy.allowed_dir.resolve()
    if not resolved.is_relative_to(allowed):
        raise APIError(400, f"{where}: {path} is outside the allowed media folder", param=where,
                       code="local_files_refused")
    if not resolved.is_file():
        raise APIError(400, f"{where}: {path} is not a file", param=where)
    return resolved.read_bytes()


def decode_image(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise APIError(400, f"{where}: the image could not be decoded ({error})", param=where,
                       code="invalid_image") from None
    return image.convert("RGB")


def decode_audio(data: bytes, where: str):
    """The clip as audio_features.load_audio reads it (by its content; `format` is not trusted)."""
    try:
        return load_audio(data)
    except AudioError as error:
        raise APIError(400, f"{where}: the audio could not be decoded ({error})", param=where,
                       code="invalid_audio") from None
