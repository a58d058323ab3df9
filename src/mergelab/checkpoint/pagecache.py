"""Page-cache hints to the Linux kernel, through libc with ctypes, which lets go of the GIL for each call (Python's
``mmap.madvise`` holds it for as long as the disk takes, stalling every computing thread)."""

from __future__ import annotations

import ctypes
import mmap

MADV_POPULATE_READ = 22  # Linux 5.14+; Python's mmap module does not name it
SYNC_FILE_RANGE_WRITE = 2
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_LIBC.madvise.restype = ctypes.c_int
_SYNC_FILE_RANGE = getattr(_LIBC, "sync_file_range", None)
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    _SYNC_FILE_RANGE.restype = ctypes.c_int


def make_resident(mapped: mmap.mmap) -> None:
    """Read a writable mapping's pages in and map them now, in the calling thread, so the thread that later
    computes on them neither waits for the disk nor faults; on an older kernel, start reading them ahead."""
    anchor = ctypes.c_char.from_buffer(mapped)
    address = ctypes.addressof(anchor)
    if _LIBC.madvise(address, len(mapped), MADV_POPULATE_READ) != 0:
        _LIBC.madvise(address, len(mapped), mmap.MADV_WILLNEED)
    del anchor


def start_write_back(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a file range's dirty pages to disk now, without waiting for it, so that
    the final ``fsync`` finds little left to write (a hint: ignored where the call is missing or fails)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)
