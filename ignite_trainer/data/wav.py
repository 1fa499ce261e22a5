"""Strict WAV input/output for PCG recordings: 16-bit PCM mono, or a one-line `DataError`.

``scipy.io.wavfile`` reads what it can and only *warns* when a file is cut short, so a truncated download
would silently train on half a recording, and it trusts the RIFF size field that streaming writers leave
at 0xFFFFFFFF. Here the RIFF header is checked first (cheaply, without reading the samples), the samples
are read from the data chunk it located, and every problem is one line naming the file.

The WFDB ``.hea`` file beside a recording declares its sampling rate too; `check_declared_rate` compares the
declarations with the WAV header so that a resampled or mislabelled file is caught when the dataset is read,
not after hours of training.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import wavfile

from ignite_trainer.core.errors import DataError

_PCM = 1
#: The RIFF size a streaming writer leaves when it cannot seek back: "unknown", the data chunk decides.
_RIFF_SIZE_UNKNOWN = 0xFFFFFFFF
_EXTENSIBLE = 0xFFFE
_FORMAT_NAMES = {1: "PCM", 3: "IEEE float", 6: "A-law", 7: "mu-law", 2: "ADPCM"}


@dataclass(frozen=True)
class WavHeader:
    """What the RIFF header of a valid recording declares."""

    rate: int
    n_frames: int
    data_offset: int


def _fail(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}")


def read_header(path: str | Path) -> WavHeader:
    """Parse and check the RIFF header only; raise `DataError` for anything but non-empty 16-bit PCM mono."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return _parse_header(path, f, size)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a WAV file") from None
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None


def _parse_header(path: Path, f, size: int) -> WavHeader:
    if size == 0:
        raise _fail(path, "empty file (0 bytes)")
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise _fail(path, "not a WAV file (no RIFF/WAVE header)")
    riff_size = struct.unpack("<I", head[4:8])[0]
    riff_end = None if riff_size == _RIFF_SIZE_UNKNOWN else 8 + riff_size
    fmt: tuple[int, int, int, int, int] | None = None  # tag, channels, rate, block_align, bits
    pos = 12
    while True:
        f.seek(pos)
        chunk = f.read(8)
        if len(chunk) < 8:
            missing = "fmt" if fmt is None else "data"
            raise _fail(path, f"truncated WAV (no {missing} chunk in {size} bytes)")
        chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        body = pos + 8
        available = size - body
        if chunk_id == b"fmt ":
            if chunk_size < 16 or available < 16:
                raise _fail(path, f"truncated WAV (fmt chunk of {chunk_size} bytes, file holds {max(available, 0)})")
            fmt = _parse_fmt(path, f.read(min(chunk_size, 40)))
        elif chunk_id == b"data":
            if fmt is None:
                raise _fail(path, "malformed WAV (data chunk before fmt chunk)")
            if chunk_size > available:
                raise _fail(path, f"truncated WAV (data chunk declares {chunk_size} bytes, file holds {available})")
            if chunk_size == 0:
                raise _fail(path, "WAV holds no samples (empty data chunk)")
            _tag, _channels, rate, block_align, _bits = fmt
            if chunk_size % block_align:
                raise _fail(path, f"truncated WAV (data chunk of {chunk_size} bytes ends inside a sample)")
            if riff_end is not None and riff_end > size:  # the data is whole, a chunk after it was cut off
                raise _fail(path, f"truncated WAV (the RIFF size field says {riff_size} bytes, the file holds "
                                  f"{size - 8})")
            if riff_end is not None and body + chunk_size > riff_end:
                raise _fail(path, f"damaged WAV header (the RIFF size field says {riff_size} bytes, but the data "
                                  f"chunk ends at byte {body + chunk_size})")
            return WavHeader(rate=rate, n_frames=chunk_size // block_align, data_offset=body)
        pos = body + chunk_size + (chunk_size & 1)  # chunks are padded to an even length


def _parse_fmt(path: Path, body: bytes) -> tuple[int, int, int, int, int]:
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == _EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack("<H", body[24:26])[0]  # the sub-format GUID starts with the real format tag
    if tag != _PCM:
        raise _fail(path, f"not PCM (WAV format tag {tag}, {_FORMAT_NAMES.get(tag, 'unknown')}); expected 16-bit PCM")
    if bits != 16:
        raise _fail(path, f"{bits}-bit PCM; expected 16-bit")
    if channels != 1:
        raise _fail(path, f"{channels} channels; expected mono")
    if rate <= 0:
        raise _fail(path, f"sampling rate {rate} Hz in the WAV header")
    if block_align != 2:
        raise _fail(path, f"malformed WAV (block align {block_align} for 16-bit mono, expected 2)")
    return tag, channels, rate, block_align, bits


def wav_info(path: str | Path) -> tuple[int, int]:
    """``(rate, n_frames)`` from the header alone: cheap enough to check every file when a dataset is listed."""
    header = read_header(path)
    return header.rate, header.n_frames


def read_wav(path: str | Path) -> tuple[int, np.ndarray]:
    """``(rate, samples)``: float32 mono samples in [-1, 1). Any defect is a `DataError`, never a short array.

    The samples are read from the data chunk the header check found (its size already checked against
    the file), so a RIFF size left as 0xFFFFFFFF by a streaming writer does not matter.
    """
    path = Path(path)
    header = read_header(path)
    try:
        data = np.fromfile(path, dtype="<i2", count=header.n_frames, offset=header.data_offset)
    except (OSError, ValueError) as e:
        raise _fail(path, f"unreadable WAV ({_one_line(e)})") from None
    if len(data) != header.n_frames:
        raise _fail(path, f"truncated WAV (header declares {header.n_frames} frames, read {len(data)})")
    return header.rate, data.astype(np.float32) / np.float32(32768.0)


def write_wav(path: str | Path, rate: int, samples_int16: np.ndarray) -> None:
    """Write 16-bit PCM mono with the canonical 44-byte header (what CirCor's ``.hea`` ``16+44`` expects)."""
    samples = np.asarray(samples_int16)
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError(f"write_wav needs a 1-D int16 array, got {samples.ndim}-D {samples.dtype}")
    wavfile.write(Path(path), int(rate), samples)


def read_wfdb_rate(hea_path: str | Path) -> float:
    """Sampling rate from a WFDB header's record line ``<record> <signals> <rate>[/<counter>][(<base>)] <samples>``."""
    hea_path = Path(hea_path)
    try:
        lines = hea_path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise _fail(hea_path, f"cannot read ({e.strerror or e})") from None
    record_line = next((ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    fields = record_line.split()
    if len(fields) < 3:
        raise _fail(hea_path, f"record line {record_line!r} is not '<record> <signals> <rate> <samples>'")
    rate_text = fields[2].split("/")[0].split("(")[0]
    try:
        rate = float(rate_text)
    except ValueError:
        raise _fail(hea_path, f"sampling rate {fields[2]!r} is not a number") from None
    if not rate > 0:
        raise _fail(hea_path, f"sampling rate {fields[2]!r} is not positive")
    return rate


def check_declared_rate(wav_path: Path, declared_rate: float | None, declared_by: str,
                        hea_path: Path | None = None) -> int:
    """Check the WAV header (cheaply) and that it agrees with every rate declared for it; return the WAV's rate.

    ``declared_by`` names where ``declared_rate`` comes from (e.g. ``"1234.txt"``) so the message can say who
    disagrees with whom. A ``.hea`` that does not exist is simply not checked: it is optional in the wild.
    """
    rate, _ = wav_info(wav_path)
    declarations: list[tuple[float, str]] = []
    if declared_rate is not None:
        declarations.append((declared_rate, declared_by))
    if hea_path is not None and hea_path.is_file():
        declarations.append((read_wfdb_rate(hea_path), hea_path.name))
    for value, source in declarations:
        if value != rate:
            raise _fail(wav_path, f"WAV header says {rate} Hz, {source} declares {value:g} Hz")
    return rate


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
