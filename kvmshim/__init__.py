"""kvmshim: the KVM dirty-log contract as a library, with an s390 software MMU and a KVM backend.

Synchronous and self-contained: no asyncio, no sockets, no metrics. The daemon builds on it.
"""

from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import BitmapError, KvmError, KvmShimError, NotSupportedError
from kvmshim.memslot import Change, Memslot, MemslotTable

__all__ = [
    "BitmapError",
    "Change",
    "DirtyBitmap",
    "KvmError",
    "KvmShimError",
    "Memslot",
    "MemslotTable",
    "NotSupportedError",
]
