"""llama.cpp's own log lines, routed to Python logging: shared by the emulator's llama.cpp engine and the
processor's GGUF tokenizer, so the processor needs none of the emulator for it."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

__all__ = ["route_llama_logs"]

_GGML_ERROR, _GGML_CONT = 4, 5  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_log_callback: Any = None  # the installed ctypes callback, kept alive here


def route_llama_logs() -> None:
    """Send llama.cpp's own log lines to the `llama.cpp` logger: errors as errors, the rest (model metadata, the
    SWA-cache and control-token warnings every load prints) at debug level.

    llama-cpp-python's handler maps ggml's levels off by one, so with `verbose=False` warnings still reach stderr.
    """
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    logger = logging.getLogger("llama.cpp")
    last = [logging.DEBUG]

    def log(level: int, text: bytes, user_data: Any) -> None:
        if level != _GGML_CONT:
            last[0] = logging.ERROR if level == _GGML_ERROR else logging.DEBUG
        message = text.decode("utf-8", "replace").rstrip()
        if message and logger.isEnabledFor(last[0]):
            logger.log(last[0], "%s", message)

    callback: Any = llama_cpp.llama_log_callback(log)  # a ctypes callback, kept alive below
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _log_callback = callback
