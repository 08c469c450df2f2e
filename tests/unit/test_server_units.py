"""Pure pieces of the server: priority parsing, stop-string hold-back, chat templates,
settings, and the metric names contract."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from llamaherd_server import metrics
from llamaherd_server.chat import ChatTemplateError, render_chat
from llamaherd_server.engine import safe_emit_length
from llamaherd_server.ggufgen import CHATML_TEMPLATE, build_vocab
from llamaherd_server.protocol import parse_priority
from llamaherd_server.settings import ServerSettings


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, 0),
        (9, 9),
        ("3", 3),
        ("high", 2),
        (" LOW ", 0),
        ("critical", 3),
        (2.0, 2),
    ],
)
def test_priority_accepts_numbers_and_names(given: object, expected: int) -> None:
    assert parse_priority(given) == expected


@pytest.mark.parametrize("given", [-1, 10, "urgent", "", 1.5, True, None, [1]])
def test_priority_refuses_anything_else_and_says_what_is_allowed(given: object) -> None:
    with pytest.raises(ValueError, match="priority"):
        parse_priority(given)


@pytest.mark.parametrize(
    ("text", "stops", "safe"),
    [
        ("hello wor", ("world",), len("hello ")),
        ("hello", ("world",), 5),
        ("abc\n", ("\n\n",), 3),
        ("abc", (), 3),
        ("xEN", ("END", "ENOUGH"), 1),
    ],
)
def test_text_that_may_start_a_stop_string_is_held_back(
    text: str, stops: tuple[str, ...], safe: int
) -> None:
    assert safe_emit_length(text, stops) == safe


def test_chatml_template_renders_the_conversation_and_the_assistant_turn() -> None:
    prompt = render_chat(
        CHATML_TEMPLATE,
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
    )
    assert prompt == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_missing_or_broken_chat_template_is_a_clear_error() -> None:
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="system messages only"):
        render_chat(
            "{{ raise_exception('system messages only') }}", [{"role": "user", "content": "hi"}]
        )
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        render_chat("{% for %}", [{"role": "user", "content": "hi"}])


def test_generated_vocabulary_pieces_are_unique() -> None:
    # llama.cpp aborts the whole process on a duplicate piece, so this must hold for any size.
    for size in (600, 4096, 32000):
        tokens, scores, types = build_vocab(size)
        assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == size


def test_settings_from_env_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setenv("LLAMAHERD_MODEL", str(model))
    monkeypatch.setenv("LLAMAHERD_SLOTS", "3")
    monkeypatch.setenv("LLAMAHERD_CONTEXT_SIZE", "1024")
    s = ServerSettings()
    assert (s.slots, s.context_size, s.served_model_name) == (3, 1024, "m")
    s = ServerSettings(
        _cli_parse_args=["--slots", "5", "--token-budget", "64"], _cli_kebab_case=True
    )  # type: ignore[call-arg]
    assert (s.slots, s.token_budget, s.context_size) == (5, 64, 1024)


def test_settings_refuse_a_missing_model_and_out_of_range_values(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="model file not found"):
        ServerSettings(model=tmp_path / "nope.gguf")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(ValidationError, match="slots"):
        ServerSettings(model=model, slots=0)


def test_metric_contract_names_are_exported() -> None:
    names = metrics.exported_names()
    for required in [
        "llamaherd_requests_waiting",
        "llamaherd_requests_running",
        "llamaherd_slots",
        "llamaherd_request_latency_seconds_bucket",
        "llamaherd_time_to_first_token_seconds_bucket",
        "llamaherd_inter_token_latency_seconds_bucket",
        "llamaherd_queue_wait_seconds_bucket",
        "llamaherd_prompt_tokens_total",
        "llamaherd_generated_tokens_total",
        "llamaherd_requests_total",
        "llamaherd_batch_size_bucket",
        "llamaherd_kv_cache_usage_ratio",
    ]:
        assert required in names, required
