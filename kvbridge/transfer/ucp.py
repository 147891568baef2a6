"""The few libucp calls ucxx 0.52 does not expose (RMA, memory mapping, endpoint info),
bound with ctypes to the libucp ucxx itself loaded; used by ucx.py."""

from __future__ import annotations

import ctypes
import os
from typing import Any


class UcxError(RuntimeError):
    """A UCP call failed."""


# --------------------------------------------------------------------------- UCP through ctypes
#
# ucxx 0.52's Python API has endpoints, workers, tags and progress, but no remote memory
# access (its C++ core has MemoryHandle/RemoteKey/memPut, not exposed to Python). The
# handles ucxx owns are plain ucp_*_h pointers (``.handle``), so RMA goes straight to the
# libucp that ucxx itself loaded: ucp_mem_map / ucp_rkey_pack / ucp_ep_rkey_unpack /
# ucp_put_nbx / ucp_get_nbx / ucp_ep_flush_nbx, and ucp_ep_print_info for the transports.
# Control messages go through ucp_tag_send_nbx / ucp_tag_probe_nb / ucp_tag_msg_recv_nbx
# too: ucxx's tag_send and tag_probe + tag_recv_with_handle (Array wrappers, tag objects,
# request objects with their own bookkeeping) cost ~43 µs per message sent and ~20 µs per
# message received right after a large copy, and a pull transfer has two messages on its
# critical path.


class _MemMapParams(ctypes.Structure):  # ucp_mem_map_params_t (ucp.h, UCX 1.21)
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("address", ctypes.c_void_p),
        ("length", ctypes.c_size_t),
        ("flags", ctypes.c_uint),
        ("prot", ctypes.c_uint),
        ("memory_type", ctypes.c_int),
        ("exported_memh_buffer", ctypes.c_void_p),
    ]


class _TagRecvInfo(ctypes.Structure):  # ucp_tag_recv_info_t
    _fields_ = [("sender_tag", ctypes.c_uint64), ("length", ctypes.c_size_t)]


class _RequestParam(ctypes.Structure):  # ucp_request_param_t (ucp.h, UCX 1.21)
    _fields_ = [
        ("op_attr_mask", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("request", ctypes.c_void_p),
        ("cb", ctypes.c_void_p),
        ("datatype", ctypes.c_uint64),
        ("user_data", ctypes.c_void_p),
        ("reply_buffer", ctypes.c_void_p),
        ("memory_type", ctypes.c_int),
        ("recv_info", ctypes.c_void_p),
        ("memh", ctypes.c_void_p),
    ]


_UCS_OK, _UCS_INPROGRESS, _UCS_ERR_LAST = 0, 1, -100
_MEM_MAP_FIELDS = 1 | 2 | 16  # ADDRESS | LENGTH | MEMORY_TYPE
_OP_ATTR_FIELD_MEMORY_TYPE = 1 << 6
_MEMORY_TYPE_HOST, _MEMORY_TYPE_CUDA = 0, 1


class _Ucp:
    """The few libucp calls ucxx does not expose, bound with ctypes to the libucp ucxx loaded."""

    def __init__(self) -> None:
        path = self._loaded_libucp()
        lib = ctypes.CDLL(path)
        vp, sz, u64, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int
        st = ctypes.c_int8  # ucs_status_t is a packed (one byte) enum

        def fn(name: str, res: Any, *args: Any) -> Any:
            f = getattr(lib, name)
            f.restype, f.argtypes = res, list(args)
            return f

        self.path = path
        self.mem_map_ = fn("ucp_mem_map", st, vp, ctypes.POINTER(_MemMapParams), ctypes.POINTER(vp))
        self.mem_unmap = fn("ucp_mem_unmap", st, vp, vp)
        self.rkey_pack_ = fn("ucp_rkey_pack", st, vp, vp, ctypes.POINTER(vp), ctypes.POINTER(sz))
        self.rkey_buffer_release = fn("ucp_rkey_buffer_release", None, vp)
        self.ep_rkey_unpack = fn("ucp_ep_rkey_unpack", st, vp, ctypes.c_char_p, ctypes.POINTER(vp))
        self.rkey_destroy = fn("ucp_rkey_destroy", None, vp)
        self.put_nbx = fn("ucp_put_nbx", vp, vp, vp, sz, u64, vp, ctypes.POINTER(_RequestParam))
        self.get_nbx = fn("ucp_get_nbx", vp, vp, vp, sz, u64, vp, ctypes.POINTER(_RequestParam))
        self.ep_flush_nbx = fn("ucp_ep_flush_nbx", vp, vp, ctypes.POINTER(_RequestParam))
        self.tag_send_nbx = fn("ucp_tag_send_nbx", vp, vp, ctypes.c_char_p, sz, u64, ctypes.POINTER(_RequestParam))
        self.tag_probe_nb = fn("ucp_tag_probe_nb", vp, vp, u64, u64, i, ctypes.POINTER(_TagRecvInfo))
        self.tag_msg_recv_nbx = fn("ucp_tag_msg_recv_nbx", vp, vp, vp, sz, vp, ctypes.POINTER(_RequestParam))
        self.request_check_status = fn("ucp_request_check_status", st, vp)
        self.request_free = fn("ucp_request_free", None, vp)
        self.ep_print_info = fn("ucp_ep_print_info", None, vp, vp)
        libucs = ctypes.CDLL(os.path.join(os.path.dirname(path), "libucs.so.0"))
        self.status_string_ = libucs.ucs_status_string
        self.status_string_.restype, self.status_string_.argtypes = ctypes.c_char_p, [i]
        libc = ctypes.CDLL(None)
        self.tmpfile, self.fflush, self.fclose, self.fileno = libc.tmpfile, libc.fflush, libc.fclose, libc.fileno
        self.tmpfile.restype = vp
        self.fflush.argtypes = self.fclose.argtypes = self.fileno.argtypes = [vp]

    @staticmethod
    def _loaded_libucp() -> str:
        """The libucp.so.0 that ucxx linked against (libucx wheel), never another copy
        (NIXL bundles its own UCX under mangled names)."""
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libucp.so" in line}
        import libucx  # the wheel ucxx depends on

        libdir = os.path.join(os.path.dirname(libucx.__file__), "lib")
        for p in sorted(paths):
            if os.path.dirname(p) == libdir:
                return p
        return os.path.join(libdir, "libucp.so.0")

    def status_string(self, status: int) -> str:
        return self.status_string_(status).decode()

    def check(self, status: int, what: str) -> None:
        if status != _UCS_OK:
            raise UcxError(f"{what} failed: {self.status_string(status)}")

    @staticmethod
    def split(ptr: int | None) -> tuple[int, int | None]:
        """A ucs_status_ptr_t as (status, request or None)."""
        if not ptr:
            return _UCS_OK, None
        if ptr >= (1 << 64) + _UCS_ERR_LAST:
            return ptr - (1 << 64), None
        return _UCS_INPROGRESS, ptr

    def finish(self, request: int) -> int | None:
        """The status of an operation's request once it completed (the request is then
        freed), or None while it is in progress."""
        status = self.request_check_status(request)
        if status == _UCS_INPROGRESS:
            return None
        self.request_free(request)
        return status

    def mem_map(self, context: int, address: int, length: int, memory_type: int) -> int:
        params = _MemMapParams(field_mask=_MEM_MAP_FIELDS, address=address, length=length, memory_type=memory_type)
        memh = ctypes.c_void_p()
        self.check(self.mem_map_(context, ctypes.byref(params), ctypes.byref(memh)), "ucp_mem_map")
        return int(memh.value)

    def rkey_pack(self, context: int, memh: int) -> bytes:
        buf, n = ctypes.c_void_p(), ctypes.c_size_t()
        self.check(self.rkey_pack_(context, memh, ctypes.byref(buf), ctypes.byref(n)), "ucp_rkey_pack")
        try:
            return ctypes.string_at(buf, n.value)
        finally:
            self.rkey_buffer_release(buf)

    def rkey_unpack(self, ep: int, packed: bytes) -> int:
        rkey = ctypes.c_void_p()
        self.check(self.ep_rkey_unpack(ep, packed, ctypes.byref(rkey)), "ucp_ep_rkey_unpack")
        return int(rkey.value)

    def ep_info(self, ep: int) -> str:
        f = self.tmpfile()
        try:
            self.ep_print_info(ep, f)
            self.fflush(f)
            fd = self.fileno(f)
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
        finally:
            self.fclose(f)


# --------------------------------------------------------------------------- transfers


class _Op:
    """One UCP operation (a tagged send or receive, a flush): ``request`` is UCP's (None once
    complete), ``error`` UCP's reason for a failure; ``state()`` is "PROC", "DONE" or "ERR"
    (the request is freed once complete)."""

    __slots__ = ("ucp", "request", "error")
    what = "UCP operation"

    def _started(self, ucp: _Ucp, ptr: int | None) -> None:
        self.ucp, self.error = ucp, None
        status, self.request = ucp.split(ptr)
        if self.request is None and status != _UCS_OK:
            self.error = f"{self.what}: {ucp.status_string(status)}"

    def state(self) -> str:
        if self.request is not None:
            status = self.ucp.finish(self.request)
            if status is None:
                return "PROC"
            self.request = None
            if status != _UCS_OK:
                self.error = f"{self.what}: {self.ucp.status_string(status)}"
        return "ERR" if self.error is not None else "DONE"


class TagSend(_Op):
    """One control message sent with ``ucp_tag_send_nbx``. A small message usually leaves at
    once (no ``request``); otherwise the request is kept, with the bytes it reads, until UCP
    completes it."""

    __slots__ = ("data",)
    what = "ucp_tag_send_nbx"

    def __init__(self, ucp: _Ucp, ep: int, data: bytes, tag: int, param: Any) -> None:
        self.data = data
        self._started(ucp, ucp.tag_send_nbx(ep, data, len(data), tag, param))


class TagRecv(_Op):
    """One control message found by ``probe`` and received with ``ucp_tag_msg_recv_nbx``
    into ``buf`` (a message already here completes at once)."""

    __slots__ = ("buf", "sender_tag")
    what = "ucp_tag_msg_recv_nbx"

    def __init__(self, ucp: _Ucp, worker: int, message: int, info: _TagRecvInfo, param: Any) -> None:
        n = info.length
        self.buf, self.sender_tag = bytearray(max(1, n)), info.sender_tag
        # the address of its first byte: a ``c_char * n`` array would make a ctypes type per
        # new length (7-16 µs warm, more right after a copy; message lengths vary)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self._started(ucp, ucp.tag_msg_recv_nbx(worker, address, n, message, param))

    @classmethod
    def probe(cls, ucp: _Ucp, worker: int, tag: int, mask: int, info: _TagRecvInfo, param: Any) -> TagRecv | None:
        """The next message matching ``tag``/``mask`` taken off UCP's queue and being
        received, or None when there is none."""
        message = ucp.tag_probe_nb(worker, tag, mask, 1, ctypes.byref(info))
        return cls(ucp, worker, message, info, param) if message else None


class _Flush(_Op):
    """``ucp_ep_flush_nbx``: complete once every operation posted before it on the endpoint
    is complete, at the peer too."""

    __slots__ = ()
    what = "ucp_ep_flush_nbx"

    def __init__(self, ucp: _Ucp, ep: int) -> None:
        self._started(ucp, ucp.ep_flush_nbx(ep, ctypes.byref(_RequestParam())))


class _Xfer:
    """One PUT or GET of a request: a UCP operation per (layer, run), then one flush of the
    endpoint. The operations' requests are handed back to UCP at once (``ucp_request_free``
    lets an operation complete internally); the flush completes only when every operation
    before it is complete, at the peer too. So a transfer of thousands of runs is tracked by
    one request. ``state()`` is "PROC", "DONE" or "ERR"."""

    def __init__(self, ucp: _Ucp, ep: int) -> None:
        self.ucp = ucp
        self.ep = ep
        self.flush: _Flush | None = None
        self.error: str | None = None  # the first failure: of a PUT/GET, else of the flush

    def add(self, ptr: int | None, what: str) -> None:
        status, request = self.ucp.split(ptr)
        if request is not None:
            self.ucp.request_free(request)  # completes internally; the flush covers it
        elif status != _UCS_OK and self.error is None:
            self.error = f"{what}: {self.ucp.status_string(status)}"

    def start_flush(self) -> None:
        self.flush = _Flush(self.ucp, self.ep)

    def state(self) -> str:
        if self.flush is None or self.flush.state() == "PROC":
            return "PROC"
        self.error = self.error or self.flush.error
        return "ERR" if self.error is not None else "DONE"

    def release(self) -> bool:
        """UCP cannot cancel a PUT/GET in flight: released only once the flush completed."""
        return self.state() != "PROC"
