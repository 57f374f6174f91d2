"""The native pieces the llama.cpp worker needs beyond llama-cpp-python's own bindings.

llama-cpp-python (pinned in the ``[llamacpp]`` extra) binds ``llama.h``; the graph callback hands
us raw ``struct ggml_tensor *`` pointers, so this module declares that struct (``ggml.h`` of the
vendored ggml) and binds three functions of the package's own ``lib/libggml-base.so``:
``ggml_backend_tensor_get`` (copy a computed tensor out of its backend buffer), ``ggml_op_name``
(which op produced it: the post-RoPE ``Qcur``/``Kcur`` are the ones made by ``ROPE``) and
``ggml_tensor_overhead`` (to check the declared layout against the library at load time).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path
from typing import Any

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
_GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): offs, size, next, type + 4 bytes padding


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml (vendored by llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class LlamaCppMissing(ImportError):
    """llama-cpp-python is not installed (the ``[llamacpp]`` extra; ``make install`` builds it)."""


@functools.cache
def llama() -> Any:
    """The ``llama_cpp`` module (llama.cpp's C API through ctypes), with the backend initialised once."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppMissing(
            "the llama.cpp worker needs llama-cpp-python==0.3.36: pip install -e '.[llamacpp]' "
            "(builds llama.cpp from source with g++, a few minutes; `make install` does it)"
        ) from exc
    llama_cpp.llama_backend_init()
    _quiet(llama_cpp)
    return llama_cpp


_LOG_CB: Any = None  # the ctypes callback must outlive every llama.cpp call that may log


def _quiet(llama_cpp: Any) -> None:
    """Keep llama.cpp's error lines only (model loading prints hundreds of info lines)."""
    global _LOG_CB

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, _user: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR (NONE, DEBUG, INFO, WARN, ERROR, CONT)
            import sys

            sys.stderr.write(text.decode(errors="replace"))

    _LOG_CB = _log
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """The package's ``lib/libggml-base.so`` with the three functions used here bound and checked."""
    llama()  # loads libllama and with it this library; CDLL below returns the same handle
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None
    folder = Path(spec.origin).parent / "lib"
    found = sorted(folder.glob("libggml-base.so*")) or sorted(folder.glob("libggml-base.*"))
    if not found:
        raise LlamaCppMissing(f"no libggml-base shared library in {folder}: llama-cpp-python looks incomplete")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_tensor_overhead.argtypes = []
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    expected = lib.ggml_tensor_overhead() - _GGML_OBJECT_SIZE
    if ctypes.sizeof(GgmlTensor) != expected:
        raise RuntimeError(f"struct ggml_tensor is {expected} bytes in {found[0].name}, declared "
                           f"{ctypes.sizeof(GgmlTensor)}: this llama-cpp-python is not the pinned 0.3.36")
    return lib


@functools.cache
def op_name(code: int) -> str:
    """The name of ``enum ggml_op`` value ``code`` (e.g. ``"ROPE"``); only ever called with codes read
    from real tensors (the library indexes a table without a bounds check)."""
    name = ggml_base().ggml_op_name(code)
    return "" if name is None else name.decode()
