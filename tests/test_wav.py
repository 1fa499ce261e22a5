"""Strict WAV reading: a defective file is one `DataError` line naming it, never a short or wrong array."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from ignite_trainer.data.wav import check_declared_rate, read_wav, read_wfdb_rate, wav_info, write_wav
from ignite_trainer.core.errors import DataError


def _tone(n: int = 4000) -> np.ndarray:
    return (np.sin(np.arange(n) * 0.05) * 12000).astype(np.int16)


def _raises_naming(path: Path, fragment: str, call=read_wav) -> str:
    with pytest.raises(DataError) as info:
        call(path)
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert "\n" not in message
    return message


def test_round_trip_scales_int16_to_unit_float(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    samples = np.array([0, 16384, -32768, 32767, -1], dtype=np.int16)
    write_wav(path, 4000, samples)
    rate, audio = read_wav(path)
    assert rate == 4000
    assert audio.dtype == np.float32
    np.testing.assert_array_equal(audio, samples.astype(np.float32) / 32768)
    assert audio.min() >= -1.0 and audio.max() < 1.0


def test_written_file_has_the_44_byte_header_wfdb_expects(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    write_wav(path, 4000, _tone(100))
    raw = path.read_bytes()
    assert len(raw) == 44 + 200
    assert raw[36:40] == b"data" and struct.unpack("<I", raw[40:44])[0] == 200


def test_wav_info_reads_rate_and_length_from_header(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    write_wav(path, 2000, _tone(1234))
    assert wav_info(path) == (2000, 1234)


def test_write_refuses_non_int16(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_wav(tmp_path / "a.wav", 4000, np.zeros(10, dtype=np.float32))


def test_truncated_file_is_an_error_where_scipy_only_warns(tmp_path: Path) -> None:
    path = tmp_path / "1234_AV.wav"
    write_wav(path, 4000, _tone(40000))
    path.write_bytes(path.read_bytes()[:1248])  # header + 1204 bytes of the declared 80000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, short = wavfile.read(path)  # the lax behaviour this module exists to prevent
    assert len(short) < 40000
    message = _raises_naming(path, "truncated WAV (data chunk declares 80000 bytes, file holds 1204)")
    _raises_naming(path, "truncated", call=wav_info)
    assert message.startswith(str(path))


def test_file_cut_inside_a_sample_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    write_wav(path, 4000, _tone(10))
    raw = bytearray(path.read_bytes()[:-1])
    struct.pack_into("<I", raw, 40, 19)  # a consistent header around an odd number of bytes
    path.write_bytes(bytes(raw))
    _raises_naming(path, "ends inside a sample")


def test_riff_size_beyond_the_file_is_an_error(tmp_path: Path) -> None:
    """The data chunk is whole but the RIFF header promises more: a trailing chunk was cut off."""
    path = tmp_path / "a.wav"
    write_wav(path, 4000, _tone(10))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 4, len(raw) + 100)
    path.write_bytes(bytes(raw))
    _raises_naming(path, "truncated WAV (the RIFF size field says")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _raises_naming(path, "empty file (0 bytes)")


def test_not_a_riff_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all, just text long enough")
    _raises_naming(path, "not a WAV file")


def test_missing_file(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "gone.wav", "no such file")


def test_stereo_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    wavfile.write(path, 4000, np.zeros((100, 2), dtype=np.int16))
    _raises_naming(path, "2 channels; expected mono")


@pytest.mark.parametrize("dtype, fragment", [(np.float32, "not PCM"), (np.int32, "32-bit PCM"), (np.uint8, "8-bit PCM")])
def test_other_sample_formats_are_refused(tmp_path: Path, dtype, fragment: str) -> None:
    path = tmp_path / "other.wav"
    wavfile.write(path, 4000, np.zeros(100, dtype=dtype))
    _raises_naming(path, fragment)


def test_empty_data_chunk(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    write_wav(path, 4000, np.zeros(0, dtype=np.int16))
    _raises_naming(path, "no samples")


def test_unknown_chunks_before_data_are_skipped(tmp_path: Path) -> None:
    """Extra metadata chunks are legal RIFF: they must not make a good recording unreadable."""
    path = tmp_path / "meta.wav"
    write_wav(path, 4000, _tone(50))
    raw = path.read_bytes()
    extra = b"bext" + struct.pack("<I", 3) + b"abc" + b"\0"  # odd size, padded to even
    body = raw[12:36] + extra + raw[36:]
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body)
    rate, audio = read_wav(path)
    assert rate == 4000 and len(audio) == 50
    assert wav_info(path) == (4000, 50)


def test_wfdb_rate_and_declared_rate_check(tmp_path: Path) -> None:
    wav = tmp_path / "2530_AV.wav"
    write_wav(wav, 4000, _tone(400))
    hea = tmp_path / "2530_AV.hea"
    hea.write_text("2530_AV 1 4000 400\n2530_AV.wav 16+44 1 16 0 0 0 0 AV\n")
    assert read_wfdb_rate(hea) == 4000
    assert check_declared_rate(wav, 4000, "2530.txt", hea) == 4000

    with pytest.raises(DataError, match=r"2530_AV\.wav: WAV header says 4000 Hz, 2530\.txt declares 2000 Hz"):
        check_declared_rate(wav, 2000, "2530.txt", hea)
    hea.write_text("2530_AV 1 2000 400\n")
    with pytest.raises(DataError, match=r"2530_AV\.hea declares 2000 Hz"):
        check_declared_rate(wav, 4000, "2530.txt", hea)
    hea.write_text("garbage\n")
    with pytest.raises(DataError, match=r"2530_AV\.hea: record line"):
        read_wfdb_rate(hea)


def test_a_riff_size_left_unknown_by_a_streaming_writer_is_read_by_the_data_chunk(tmp_path: Path) -> None:
    path = tmp_path / "stream.wav"
    samples = _tone(1000)
    write_wav(path, 4000, samples)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 4, 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    rate, audio = read_wav(path)
    assert rate == 4000 and np.array_equal(audio, samples.astype(np.float32) / 32768)


def test_a_riff_size_smaller_than_the_data_chunk_is_a_damaged_header(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    write_wav(path, 4000, _tone(1000))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 4, 0)
    path.write_bytes(bytes(raw))
    _raises_naming(path, "damaged WAV header (the RIFF size field says 0 bytes")
