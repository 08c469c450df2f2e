"""What the scheduler needs from a model runtime: the small interface between
:class:`~llamaherd_server.engine.Engine` (admission, slots, token budget, chunked prefill,
cancellation, expiry) and the llama.cpp binding
(:class:`~llamaherd_server.llama_backend.LlamaBackend`).

The engine does not pick its backend: its caller hands it a :data:`BackendFactory`, which the
engine calls once with the :class:`ContextShape` it needs (the server passes
``LlamaBackend.factory(...)``; unit tests a fake). Only the scheduler thread calls
``make_sampler``, ``accept``, ``decode``, ``sample``, ``free_sampler``, ``seq_rm`` and
``seq_cp``; ``tokenize`` and ``token_bytes`` may run on any thread while the model is loaded.
Unit tests drive the scheduler with a fake that follows the same protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .generation import SamplingParams

# One entry of a decode batch: (token, position, sequence id, wants logits).
BatchToken = tuple[int, int, int, bool]


@dataclass(frozen=True)
class ContextShape:
    """The context the scheduler asks its backend for: one unified KV cache of ``slots`` x
    ``context_size`` cells shared by ``sequences`` sequence ids (running requests and cached
    prefixes), decoded in batches of at most ``batch_size`` tokens."""

    slots: int
    context_size: int
    sequences: int
    batch_size: int


class Backend(Protocol):
    # Known once load() has returned.
    n_vocab: int
    chat_template: str | None
    bos_text: str
    eos_text: str
    # Whether part of a sequence can be shared (seq_cp of a prefix) and the rest decoded anew:
    # a plain attention KV cache; not a recurrent, hybrid or sliding-window one.
    can_share_prefixes: bool

    def load(self) -> None:
        """Load the model and make the context; raise (ModelLoadError says why) on failure."""

    def free(self) -> None:
        """Free the context and the model; a no-op when nothing is loaded."""

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_bytes(self, token: int, *, special: bool = False) -> bytes: ...

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""

    def make_sampler(self, params: SamplingParams, seed: int) -> Any:
        """A sampler for one sequence; freed with free_sampler."""

    def accept(self, sampler: Any, tokens: Sequence[int]) -> None:
        """Feed tokens that the sampler did not pick (the prompt) to its penalties."""

    def free_sampler(self, sampler: Any) -> None: ...

    def decode(self, batch: Sequence[BatchToken]) -> int:
        """Run one batch through the model; 0 on success, llama_decode's code otherwise."""

    def sample(self, sampler: Any, index: int) -> int:
        """The next token from the logits of the batch entry at ``index``."""

    def argmax(self, rows: Sequence[int], n_outputs: int) -> list[int]:
        """Greedy tokens of several outputs of the last decode at once: ``rows`` index the
        ``n_outputs`` entries that asked for logits, in batch order. The same tokens as a
        greedy sampler's, without a pass over the vocabulary per sequence through the C API."""

    def softmax_sample(
        self,
        rows: Sequence[int],
        n_outputs: int,
        temperatures: Sequence[float],
        uniforms: Sequence[float],
    ) -> list[int]:
        """Plain temperature sampling of several outputs at once (see sampling.py): one token
        per row from softmax(logits / temperature), by inverse CDF of the given uniform."""

    def seq_rm(self, seq_id: int) -> None:
        """Drop every KV cell of one sequence."""

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Make the cells of ``src``'s positions ``p0`` to ``p1 - 1`` belong to ``dst`` too."""

    def seq_trim(self, seq_id: int, keep: int) -> bool:
        """Drop the cells of one sequence from position ``keep`` on."""

    def seq_save(self, seq_id: int) -> bytes:
        """One sequence's KV (all of its positions) as bytes, to restore later."""

    def seq_restore(self, data: bytes, seq_id: int) -> bool:
        """Put saved KV back into an empty sequence (new cells); False when it did not fit."""


# What an engine is given instead of a backend: it makes the one it drives, for its shape.
BackendFactory = Callable[[ContextShape], Backend]
