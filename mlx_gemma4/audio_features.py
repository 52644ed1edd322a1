"""Audio in: decode a clip to 16 kHz mono float32, and turn waveforms into Gemma 4's log-mel features.

The features are transformers' own `Gemma4AudioFeatureExtractor` (NumPy only, no torch), so they
match it by construction: semicausal 20 ms frames every 10 ms, periodic Hann window, |512-point
FFT|, 128 HTK mel bins over 0-8 kHz, log(mel + 1e-3); a frame is valid only when its whole window
is real audio. Clips longer than 30 s are cut to 30 s, as transformers does (with a warning here).

WAV (PCM 8/16/24/32-bit, float 32/64-bit) is read with the standard library; other formats (FLAC,
OGG, MP3, ...) need the `soundfile` package (`pip install "mlx-gemma4[audio]"`).
"""

import io
import struct
import urllib.request
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

SAMPLE_RATE = 16_000
MAX_SAMPLES = 480_000  # transformers' max_length: 30 s at 16 kHz
WAVE_FORMAT_PCM, WAVE_FORMAT_FLOAT, WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE
URL_TIMEOUT_S = 60

AudioSource = Union[str, Path, bytes, bytearray, np.ndarray]


class AudioError(ValueError):
    """An audio input that cannot be read or used: says what it was and what is accepted."""


def load_audio(source: AudioSource) -> np.ndarray:
    """A clip as float32 mono at 16 kHz, from a file path, an http(s) URL, the file's bytes, or a 1-D
    array of samples already at 16 kHz. Several channels are averaged; other rates are resampled."""
    if isinstance(source, np.ndarray):
        return _checked(source, "the waveform array")
    if isinstance(source, (bytes, bytearray)):
        samples, rate = decode_audio(bytes(source), "the audio bytes")
        return _checked(resample(samples, rate, SAMPLE_RATE), "the audio bytes")
    if not isinstance(source, (str, Path)):
        raise AudioError(f"audio must be a path, URL, bytes or 1-D array; got {type(source).__name__}")
    name = str(source)
    if name.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(name, timeout=URL_TIMEOUT_S) as response:
                data = response.read()
        except Exception as error:  # network, HTTP status, timeout: one clear message
            raise AudioError(f"could not download audio from {name}: {error}") from error
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise AudioError(f"audio file {path} does not exist")
        data = path.read_bytes()
    samples, rate = decode_audio(data, name)
    return _checked(resample(samples, rate, SAMPLE_RATE), name)


def decode_audio(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """(float32 mono samples, sample rate) of an encoded clip."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        samples, rate = _read_wav(data, name)
    else:
        try:
            import soundfile
        except ImportError:
            raise AudioError(
                f"{name} is not a WAV file; reading other formats needs the soundfile package "
                '(pip install "mlx-gemma4[audio]")'
            ) from None
        try:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as error:
            raise AudioError(f"could not decode audio {name}: {error}") from error
    return samples.mean(axis=1, dtype=np.float32), int(rate)


def _read_wav(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """[samples, channels] float32 and the rate, from a RIFF/WAVE file (PCM or IEEE float)."""
    fmt, body, offset = None, None, 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        if chunk == b"fmt ":
            fmt = data[offset + 8 : offset + 8 + size]
        elif chunk == b"data":
            body = data[offset + 8 : offset + 8 + size]
        offset += 8 + size + (size & 1)
    if fmt is None or body is None or len(fmt) < 16:
        raise AudioError(f"{name} is not a complete WAV file (no fmt or data chunk)")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the real tag
    width = bits // 8
    if channels < 1 or width < 1:
        raise AudioError(f"{name}: WAV header declares {channels} channels of {bits} bits")
    body = body[: len(body) // (width * channels) * width * channels]
    if tag == WAVE_FORMAT_FLOAT and bits in (32, 64):
        samples = np.frombuffer(body, dtype=f"<f{width}").astype(np.float32)
    elif tag == WAVE_FORMAT_PCM and bits == 8:
        samples = (np.frombuffer(body, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == WAVE_FORMAT_PCM and bits in (16, 32):
        samples = np.frombuffer(body, dtype=f"<i{width}").astype(np.float32) / float(2 ** (bits - 1))
    elif tag == WAVE_FORMAT_PCM and bits == 24:
        raw = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        samples = (np.where(values >= 1 << 23, values - (1 << 24), values) / float(1 << 23)).astype(np.float32)
    else:
        raise AudioError(f"{name}: WAV format {tag} with {bits} bits is not supported (PCM 8/16/24/32, float 32/64)")
    return samples.reshape(-1, channels), rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling through the FFT (the spectrum is cut or zero-extended at Nyquist)."""
    if rate <= 0:
        raise AudioError(f"audio sample rate {rate} is not positive")
    if rate == target or len(samples) == 0:
        return samples.astype(np.float32)
    length = max(1, round(len(samples) * target / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))[: length // 2 + 1]
    return (np.fft.irfft(spectrum, n=length) * (length / len(samples))).astype(np.float32)


def _checked(samples: np.ndarray, name: str) -> np.ndarray:
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"{name}: expected a 1-D float waveform at 16 kHz; got {samples.dtype} {samples.shape}")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the waveform has NaN or infinite samples")
    return samples.astype(np.float32)


def feature_extractor(config: Optional[dict] = None):
    """transformers' `Gemma4AudioFeatureExtractor` from a `feature_extractor` block (processor_config.json)
    or preprocessor_config.json; without one, its defaults, which are the released Gemma 4 settings."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    settings = {k: v for k, v in (config or {}).items() if k not in ("feature_extractor_type", "processor_class")}
    return Gemma4AudioFeatureExtractor(**settings)


def audio_features(waveforms: Union[np.ndarray, Sequence[np.ndarray]], extractor=None) -> tuple[np.ndarray, np.ndarray]:
    """(features [B, T, n_mels] float32, mask [B, T] bool) of 16 kHz mono clips, as transformers'
    feature extractor gives them: right-padded to the longest clip (a multiple of 128 samples),
    padded and partial frames masked out and zeroed."""
    clips = [waveforms] if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1 else list(waveforms)
    if not clips:
        raise AudioError("no audio clips given")
    extractor = extractor or feature_extractor()
    for i, clip in enumerate(clips):
        _checked(np.asarray(clip), f"audio clip {i}")
        if len(clip) > MAX_SAMPLES:
            warnings.warn(f"audio clip {i} is {len(clip) / SAMPLE_RATE:.1f} s long; Gemma 4 hears its first 30 s")
    batch = extractor([np.asarray(clip, dtype=np.float32) for clip in clips], return_tensors="np")
    features, mask = batch["input_features"].astype(np.float32), batch["input_features_mask"].astype(bool)
    short = [i for i, row in enumerate(mask) if not row.any()]
    if short:
        needed = extractor.frame_length - extractor.frame_length // 2 + 1  # after the semicausal left padding
        raise AudioError(f"audio clip {short[0]} is too short: one analysis frame needs {needed} samples")
    return features, mask


def soft_token_counts(mask: np.ndarray) -> list[int]:
    """Audio soft tokens each clip becomes (the placeholders its prompt needs): its valid frames after
    the tower's two stride-2 subsampling steps, as transformers' processor counts them."""
    return [int(row[::2][::2].sum()) for row in np.asarray(mask, dtype=bool)]
