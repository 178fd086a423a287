"""Checks ITK's NIfTI reader does not do.

Seen with SimpleITK 2.5: a truncated ``.nii``/``.nii.gz`` reads "successfully" with the missing voxels
filled in, a header dimension of 0 is read as 1, and NaN voxels come back as 0. Those are exactly the
inputs that must be rejected, so NIfTI files are checked here from their header and raw bytes.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from ssl3d.utils import BadInputError

_FLOAT_TYPES = {16: np.float32, 64: np.float64}
_CHUNK = 1 << 22


def _open(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _header(path: str) -> dict | None:
    try:
        with _open(path) as f:
            raw = f.read(352)
    except (OSError, EOFError, zlib.error) as e:
        raise BadInputError(path, f"unreadable or truncated file ({e})") from None
    if len(raw) < 348:
        raise BadInputError(path, "unreadable or truncated file (shorter than a NIfTI header)")
    for endian in "<>":
        if struct.unpack(endian + "i", raw[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", raw[70:74])
            vox_offset = struct.unpack(endian + "f", raw[108:112])[0]
            n = max(0, min(int(dims[0]), 7))
            return {"endian": endian, "dims": list(dims[1:1 + n]), "datatype": datatype, "bitpix": bitpix,
                    "vox_offset": int(vox_offset)}
    return None  # NIfTI-2 or not NIfTI: leave it to ITK


def _stream(path: str, offset: int, dtype) -> tuple[int, int]:
    """(bytes of the whole stream, count of non-finite voxels if dtype is given); raises on a broken stream."""
    total, bad, carry = 0, 0, b""
    with _open(path) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            start = max(0, offset - total)
            total += len(chunk)
            if dtype is not None and start < len(chunk):
                buf = carry + chunk[start:]
                usable = len(buf) - len(buf) % np.dtype(dtype).itemsize
                values = np.frombuffer(buf[:usable], dtype=dtype)
                bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                carry = buf[usable:]
    return total, bad


def check_nifti(path: str) -> None:
    """Raise BadInputError for a zero-size, truncated or non-finite NIfTI-1 file."""
    hdr = _header(path)
    if hdr is None:
        return
    dims = hdr["dims"]
    if any(d <= 0 for d in dims):
        raise BadInputError(path, f"zero-size image (header dimensions {dims})")
    expected = hdr["vox_offset"] + int(np.prod(dims, dtype=np.int64)) * max(hdr["bitpix"], 8) // 8
    gz = path.lower().endswith(".gz")
    dtype = _FLOAT_TYPES.get(hdr["datatype"])
    if dtype is not None:
        dtype = np.dtype(dtype).newbyteorder(hdr["endian"])
    if not gz and dtype is None:
        if os.path.getsize(path) < expected:
            raise BadInputError(path, f"unreadable or truncated file ({os.path.getsize(path)} of {expected} bytes)")
        return
    if gz and dtype is None:
        # The gzip trailer stores the stream length mod 2^32: a cheap test before a full decompression.
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize == expected % (1 << 32):
            return
    try:
        total, non_finite = _stream(path, hdr["vox_offset"], dtype)
    except (OSError, EOFError, zlib.error) as e:
        raise BadInputError(path, f"unreadable or truncated file ({e})") from None
    if total < expected:
        raise BadInputError(path, f"unreadable or truncated file ({total} of {expected} bytes)")
    if non_finite:
        raise BadInputError(path, f"contains NaN/Inf voxels ({non_finite} of {int(np.prod(dims))})")
