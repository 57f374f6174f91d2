"""llama.cpp integration: decode GGUF models in llama.cpp's own engine under eviction policies.

Needs the ``[llamacpp]`` extra (llama-cpp-python, built from source by ``make install``). Importing
this package is cheap; llama-cpp-python loads on first use. See docs/llamacpp.md.
"""

from nexus_client.llamacpp.library import LlamaCppMissing
from nexus_client.llamacpp.mirror import KVMirror
from nexus_client.llamacpp.model import LlamaModel, ModelShape, resolve_gguf
from nexus_client.llamacpp.worker import LlamaWorker, SequenceResult, WorkerStats, context_cells

__all__ = [
    "KVMirror",
    "LlamaCppMissing",
    "LlamaModel",
    "LlamaWorker",
    "ModelShape",
    "SequenceResult",
    "WorkerStats",
    "context_cells",
    "resolve_gguf",
]
