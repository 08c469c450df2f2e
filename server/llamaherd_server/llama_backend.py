"""The llama.cpp binding: model and context, tokens, sampler chains, batches and KV, through
llama-cpp-python's ctypes API. It knows nothing of requests or scheduling (see
:mod:`llamaherd_server.engine`); it implements :class:`~llamaherd_server.backend.Backend`."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import cudadriver, sampling
from .backend import BackendFactory, BatchToken, ContextShape
from .cudadriver import Devices
from .generation import SamplingParams
from .loadfail import ModelLoadError, check_model_file

# The engine's logger: the load line has always come from there.
log = logging.getLogger("llamaherd.engine")


class _LlamaErrors:
    """Keeps llama.cpp's error log lines while a call runs (it says *why* a load failed only
    there), still handing every line to llama-cpp-python's own callback."""

    _ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.lines: list[tuple[int, str]] = []
        self._callback: Any = None
        self._forward: Any = None

    def __enter__(self) -> _LlamaErrors:
        try:
            from llama_cpp import _logger

            self._forward = _logger.llama_log_callback
        except (ImportError, AttributeError):
            self._forward = None
        forward = self._forward
        lines = self.lines

        def capture(level: int, text: bytes, user_data: Any) -> None:
            if level in (self._ERROR - 1, self._ERROR) and text:
                lines.append((level, text.decode("utf-8", errors="replace")))
            if forward is not None:
                with contextlib.suppress(Exception):  # never raise into C
                    forward(level, text, user_data)

        try:
            self._callback = self.lib.llama_log_callback(capture)
            self.lib.llama_log_set(self._callback, ctypes.c_void_p(0))
        except (AttributeError, TypeError):
            self._callback = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._callback is not None:
            self.lib.llama_log_set(self._forward, ctypes.c_void_p(0))

    def last(self) -> str:
        """The most telling error line: llama.cpp's "error loading model: <why>" if there is
        one, else the first error line ("failed to load model" comes last and says nothing)."""
        lines = [(level, " ".join(text.split())) for level, text in self.lines]
        marker = "error loading model: "
        for _, line in lines:
            if marker in line:
                return line.split(marker, 1)[1]
        return next((line for level, line in lines if level == self._ERROR and line), "")


class _FloatMatrix:
    """float32 memory that llama.cpp owns, as numpy sees it (no copy)."""

    def __init__(self, address: int, rows: int, cols: int) -> None:
        self.__array_interface__ = {
            "data": (address, True),
            "shape": (rows, cols),
            "typestr": "<f4",
            "version": 3,
        }


class _Batch:
    """A ``llama_batch`` over numpy arrays that this object owns, one sequence per token.

    Filled with a few array assignments per step instead of five ctypes item writes per
    token (which cost about 2 us a token: a 512-token prefill chunk spent a millisecond just
    filling the batch). ``seq_id[i]`` points at element ``i`` of one int32 array."""

    def __init__(self, lib: Any, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        int32_p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (int32_p * capacity)(
            *(ctypes.cast(base + 4 * i, int32_p) for i in range(capacity))
        )
        struct = lib.llama_batch()
        struct.n_tokens = 0
        struct.token = self.token.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        struct.embd = None
        struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos))
        struct.n_seq_id = self.n_seq_id.ctypes.data_as(int32_p)
        struct.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(int32_p))
        struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = struct

    def fill(self, entries: Sequence[BatchToken]) -> None:
        n = len(entries)
        if n > self.capacity:
            raise ValueError(f"{n} tokens do not fit a batch of {self.capacity}")
        if n == 1:
            (token, pos, seq_id, logits) = entries[0]
            self.token[0], self.pos[0], self.seq[0], self.logits[0] = token, pos, seq_id, logits
        else:
            tokens, positions, seq_ids, logits_flags = zip(*entries, strict=True)
            self.token[:n] = tokens
            self.pos[:n] = positions
            self.seq[:n] = seq_ids
            self.logits[:n] = logits_flags
        self.struct.n_tokens = n


class LlamaBackend:
    """One llama.cpp model and one context with a unified KV cache of ``slots`` x
    ``context_size`` cells shared by ``sequences`` sequence ids (running requests and cached
    prefixes), and a batch of ``batch_size`` tokens."""

    def __init__(
        self,
        model_path: Path,
        *,
        slots: int,
        context_size: int,
        sequences: int | None = None,
        batch_size: int,
        threads: int,
        gpu_layers: int,
    ) -> None:
        self.model_path = model_path
        self.slots = slots
        self.sequences = sequences or slots
        self.context_size = context_size
        self.batch_size = batch_size
        self.threads = threads
        self.gpu_layers = gpu_layers
        self.n_vocab = 0
        self.chat_template: str | None = None
        self.bos_text = ""
        self.eos_text = ""
        self.can_share_prefixes = False
        self.devices: Devices | None = None
        self.lib: Any = None
        self.model: Any = None
        self.ctx: Any = None
        self.vocab: Any = None
        self.mem: Any = None
        self.batch: _Batch | None = None
        self._pieces: list[bytes | None] = []
        self._eog: list[bool | None] = []

    @classmethod
    def factory(cls, model_path: Path, *, threads: int, gpu_layers: int) -> BackendFactory:
        """What an :class:`~llamaherd_server.engine.Engine` is built with to run this model on
        llama.cpp: it makes the backend for the context shape it needs."""

        def make(shape: ContextShape) -> LlamaBackend:
            return cls(
                model_path,
                slots=shape.slots,
                context_size=shape.context_size,
                sequences=shape.sequences,
                batch_size=shape.batch_size,
                threads=threads,
                gpu_layers=gpu_layers,
            )

        return make

    # ---- lifecycle -------------------------------------------------------------------

    def load(self) -> None:
        cudadriver.prepare()
        import llama_cpp as lib

        # llama-cpp-python prints llama.cpp's own log lines through this logger's level.
        logging.getLogger("llama-cpp-python").setLevel(
            logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR
        )
        self.lib = lib
        lib.llama_backend_init()
        self.devices = cudadriver.list_devices(lib)
        if self.gpu_layers != 0 and not self.devices.gpus:
            log.warning(
                "gpu-layers=%d, but llama.cpp sees no GPU (%s): the model runs on the CPU",
                self.gpu_layers,
                self.devices.note
                or (
                    "this build has no GPU backend"
                    if not self.devices.offload_supported
                    else "no GPU device is visible"
                ),
            )
            self.gpu_layers = 0
        check_model_file(self.model_path, gpu_layers=self.gpu_layers)
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = self.gpu_layers if self.gpu_layers >= 0 else 999
        with _LlamaErrors(lib) as errors:
            model = lib.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not model:
            detail = errors.last() or (
                "corrupt or truncated file, an unknown architecture, or not enough memory"
            )
            raise ModelLoadError(f"llama.cpp could not load it: {detail}")
        self.model = model
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.slots * self.context_size
        cparams.n_batch = self.batch_size
        cparams.n_ubatch = min(self.batch_size, 512)
        cparams.n_seq_max = self.sequences
        cparams.kv_unified = True
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        with _LlamaErrors(lib) as errors:
            ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            detail = errors.last()
            raise ModelLoadError(
                f"llama.cpp could not create a context of {self.slots} x "
                f"{self.context_size} tokens (out of memory? try fewer slots or a smaller "
                "context-size)" + (f": {detail}" if detail else "")
            )
        self.ctx = ctx
        self.vocab = lib.llama_model_get_vocab(model)
        self.mem = lib.llama_get_memory(ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        # Part of a sequence can be shared or removed only in a plain attention KV cache.
        self.can_share_prefixes = not (
            lib.llama_model_is_recurrent(model)
            or lib.llama_model_is_hybrid(model)
            or lib.llama_model_n_swa(model) > 0
        )
        self.batch = _Batch(lib, self.batch_size)
        self._pieces = [None] * self.n_vocab
        self._eog = [None] * self.n_vocab
        template = lib.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8") if template else None
        self.bos_text = self.token_text(lib.llama_vocab_bos(self.vocab))
        self.eos_text = self.token_text(lib.llama_vocab_eos(self.vocab))
        log.info(
            "model loaded: %s, %d slots x %d tokens, token budget %d, %d threads",
            self.model_path.name,
            self.slots,
            self.context_size,
            self.batch_size,
            self.threads,
        )

    def free(self) -> None:
        lib = self.lib
        if lib is None:
            return
        self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.vocab = None
            self.mem = None
            lib.llama_model_free(self.model)
            self.model = None

    # ---- tokens ----------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        lib = self.lib
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (lib.llama_token * n_max)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (lib.llama_token * n_max)()
            n = lib.llama_tokenize(
                self.vocab, data, len(data), buf, n_max, add_special, parse_special
            )
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        if not special and 0 <= token < len(self._pieces):
            piece = self._pieces[token]
            if piece is None:
                piece = self._pieces[token] = self._piece(token, False)
            return piece
        return self._piece(token, special)

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        if 0 <= token < len(self._eog):
            eog = self._eog[token]
            if eog is None:
                eog = self._eog[token] = bool(self.lib.llama_vocab_is_eog(self.vocab, token))
            return eog
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # ---- sampling --------------------------------------------------------------------

    def make_sampler(self, params: SamplingParams, seed: int) -> Any:
        lib = self.lib
        p = params
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if p.has_penalties:
            lib.llama_sampler_chain_add(
                chain,
                lib.llama_sampler_init_penalties(
                    self.n_vocab,
                    p.penalty_last_n,
                    p.repeat_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                ),
            )
        if p.temperature < sampling.GREEDY_BELOW:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if p.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(p.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(p.temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def accept(self, sampler: Any, tokens: Sequence[int]) -> None:
        accept = self.lib.llama_sampler_accept
        for token in tokens:
            accept(sampler, token)

    def free_sampler(self, sampler: Any) -> None:
        self.lib.llama_sampler_free(sampler)

    def sample(self, sampler: Any, index: int) -> int:
        token: int = self.lib.llama_sampler_sample(sampler, self.ctx, index)
        return token

    def logits(self, n_outputs: int) -> np.ndarray:
        """The last decode's logits, ``n_outputs`` rows in batch order (llama_get_logits puts
        them in that order first: llama.cpp may have reordered them across micro-batches).
        A view of llama.cpp's buffer, valid until the next decode: read it, never write it."""
        address = ctypes.cast(self.lib.llama_get_logits(self.ctx), ctypes.c_void_p).value
        if not address:
            raise RuntimeError("llama.cpp returned no logits")
        return np.asarray(_FloatMatrix(address, n_outputs, self.n_vocab))

    def argmax(self, rows: Sequence[int], n_outputs: int) -> list[int]:
        return sampling.argmax_rows(self.logits(n_outputs), rows)

    def softmax_sample(
        self,
        rows: Sequence[int],
        n_outputs: int,
        temperatures: Sequence[float],
        uniforms: Sequence[float],
    ) -> list[int]:
        return sampling.softmax_sample_rows(self.logits(n_outputs), rows, temperatures, uniforms)

    # ---- batches and KV --------------------------------------------------------------

    def decode(self, entries: Sequence[BatchToken]) -> int:
        batch = self.batch
        assert batch is not None, "decode before load"
        batch.fill(entries)
        rc: int = self.lib.llama_decode(self.ctx, batch.struct)
        return rc

    def seq_rm(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq_id, -1, -1)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_trim(self, seq_id: int, keep: int) -> bool:
        return bool(self.lib.llama_memory_seq_rm(self.mem, seq_id, keep, -1))

    def seq_save(self, seq_id: int) -> bytes:
        lib = self.lib
        size = lib.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_ubyte * size)()
        n = lib.llama_state_seq_get_data(self.ctx, buf, size, seq_id)
        return bytes(buf)[:n]

    def seq_restore(self, data: bytes, seq_id: int) -> bool:
        buf = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
        return bool(self.lib.llama_state_seq_set_data(self.ctx, buf, len(data), seq_id))
