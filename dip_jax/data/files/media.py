"""Media decoding: images with Pillow, audio with soundfile, log-mel features in numpy.

Images: any mode -> RGB (alpha composited on white, as HF image processors do) or grayscale
for a one-channel encoder, padded to a square with the mean colour (LLaVA-1.5's "pad" aspect
mode) and resized to the encoder's `image_size`, scaled to [-1, 1]. With `data.image_tiles_max`
> 1 a large image becomes a thumbnail plus a grid of tiles (LLaVA-NeXT's "anyres"); the grid is
chosen from the header size alone, so the index counts items without decoding pixels.

Audio: WAV / FLAC (anything libsndfile reads), averaged to mono, resampled to 16 kHz, log-mel
as Whisper computes it (log10, floor 8 below the peak, scaled to about [-1, 1]) with the hop set
by the encoder's frames per second, then cut into clips of the encoder's length (the last one
padded with silence).
"""
from __future__ import annotations

import functools
import math

import numpy as np

SAMPLE_RATE = 16_000


def tile_grid(width: int, height: int, tiles_max: int, tile_size: int) -> tuple[int, int]:
    """(columns, rows) of LLaVA-NeXT's best resolution among grids of at most tiles_max - 1 tiles
    of tile_size pixels: the most of the image's resolution kept, then the least padding."""
    if tiles_max <= 1:
        return 1, 1
    best, key = (1, 1), None
    for c in range(1, tiles_max):
        for r in range(1, tiles_max // c + 1):
            if c * r > tiles_max - 1:
                continue
            W, H = c * tile_size, r * tile_size
            s = min(W / width, H / height)
            effective = min(int(width * s) * int(height * s), width * height)
            k = (effective, -(W * H - effective))
            if key is None or k > key:
                best, key = (c, r), k
    return best


def image_items(width: int, height: int, tiles_max: int, tile_size: int) -> int:
    """Encoder items one image becomes: 1, or a thumbnail plus its tiles."""
    c, r = tile_grid(width, height, tiles_max, tile_size)
    return 1 if c * r == 1 else 1 + c * r


def image_header(path: str) -> tuple[int, int]:
    """(width, height) from the header, after checking the file's structure (Pillow's verify:
    chunk CRCs and a complete stream for PNG) without decoding pixels. Raises on a bad file."""
    from PIL import Image
    with Image.open(path) as im:
        size = im.size
        im.verify()
    return size


def _to_mode(im, channels: int):
    from PIL import Image
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("L" if channels == 1 else "RGB")


def _square(im, size: int):
    from PIL import Image
    w, h = im.size
    if w != h:
        mean = tuple(int(v) for v in np.asarray(im).reshape(-1, len(im.getbands())).mean(0))
        canvas = Image.new(im.mode, (max(w, h),) * 2, mean if len(mean) > 1 else mean[0])
        canvas.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        im = canvas
    return im.resize((size, size), Image.Resampling.BICUBIC)


def _array(im, channels: int) -> np.ndarray:
    a = np.asarray(im, np.float32) / 127.5 - 1.0
    a = a[..., None] if a.ndim == 2 else a
    return np.repeat(a, channels, -1) if a.shape[-1] != channels else a


def load_image(path: str, size: int, channels: int, tiles_max: int = 1, tile_size: int = 336) -> np.ndarray:
    """[items, size, size, channels] float32: the image, or its thumbnail and tiles row-major."""
    from PIL import Image
    with Image.open(path) as im:
        c, r = tile_grid(*im.size, tiles_max, tile_size)
        if c * r == 1:
            im.draft("RGB", (size, size))             # JPEG: decode at reduced scale, much faster
        im = _to_mode(im, channels)
    out = [_array(_square(im, size), channels)]
    if c * r > 1:
        W, H = c * tile_size, r * tile_size
        s = min(W / im.width, H / im.height)
        fit = im.resize((max(1, int(im.width * s)), max(1, int(im.height * s))), Image.Resampling.BICUBIC)
        grid = Image.new(im.mode, (W, H))
        grid.paste(fit, ((W - fit.width) // 2, (H - fit.height) // 2))
        for j in range(r):
            for i in range(c):
                tile = grid.crop((i * tile_size, j * tile_size, (i + 1) * tile_size, (j + 1) * tile_size))
                out.append(_array(tile.resize((size, size), Image.Resampling.BICUBIC), channels))
    return np.stack(out)


def audio_seconds(path: str) -> float:
    """Duration from the header (soundfile reads no samples for it). Raises on a bad file."""
    import soundfile
    info = soundfile.info(path)
    if info.frames <= 0 or info.samplerate <= 0:
        raise ValueError("no audio frames")
    return info.frames / info.samplerate


def load_audio(path: str) -> np.ndarray:
    """Mono float32 samples at SAMPLE_RATE."""
    import soundfile
    x, sr = soundfile.read(path, dtype="float32", always_2d=True)
    x = x.mean(1)
    if sr != SAMPLE_RATE:
        from scipy.signal import resample_poly
        g = math.gcd(SAMPLE_RATE, sr)
        x = resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)
    return x


@functools.lru_cache(maxsize=8)
def mel_filters(n_fft: int, n_mels: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] Slaney-style triangular filters (librosa's default, Whisper's)."""
    hz_to_mel = lambda f: np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1e-9) / 1000) / np.log(6.4))
    mel_to_hz = lambda m: np.where(m < 15, 200 * m / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    lower = (freqs[None] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - freqs[None]) / (edges[2:] - edges[1:-1])[:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    return (w * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


def log_mel(x: np.ndarray, frames_per_second: int, n_mels: int) -> np.ndarray:
    """[frames, n_mels]: one frame per hop of SAMPLE_RATE / frames_per_second samples, a Hann
    window of twice the hop (next power of two), centred with reflection padding."""
    hop = SAMPLE_RATE // frames_per_second
    n_fft = 1 << max(1, (2 * hop - 1).bit_length())
    frames = max(1, int(math.ceil(len(x) / hop)))
    pad = np.pad(x, (n_fft // 2, n_fft // 2 + frames * hop - len(x)), mode="reflect" if len(x) > n_fft // 2 else "constant")
    idx = np.arange(n_fft)[None] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(pad[idx] * np.hanning(n_fft + 1)[:-1].astype(np.float32), axis=-1)) ** 2
    mel = np.log10(np.maximum(spec @ mel_filters(n_fft, n_mels).T, 1e-10))
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def audio_clips(path: str, n_clips: int, frames_per_second: int, frames_per_clip: int, n_mels: int) -> np.ndarray:
    """[n_clips, frames_per_clip, n_mels]: the file's log-mel frames cut into clips."""
    mel = log_mel(load_audio(path), frames_per_second, n_mels)
    need = n_clips * frames_per_clip
    if len(mel) < need:
        mel = np.concatenate([mel, np.full((need - len(mel), n_mels), mel.min(), np.float32)])
    return mel[:need].reshape(n_clips, frames_per_clip, n_mels)
