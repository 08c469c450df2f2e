"""Pure pieces of the server: priority parsing, stop-string hold-back, chat templates,
settings, and the metric names contract."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from llamaherd_server import metrics
from llamaherd_server.chat import ChatTemplateError, render_chat
from llamaherd_server.engine import safe_emit_length
from llamaherd_server.ggufgen import CHATML_TEMPLATE, build_vocab
from llamaherd_server.llama_backend import _LlamaErrors
from llamaherd_server.loadfail import (
    ModelLoadError,
    check_model_file,
    failure_message,
    write_termination_message,
)
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


def test_settings_refuse_out_of_range_values(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(ValidationError, match="slots"):
        ServerSettings(model=model, slots=0)
    with pytest.raises(ValidationError, match="engine_stall_seconds"):
        ServerSettings(model=model, engine_stall_seconds=0)
    # A missing model is not a settings error: it is a load failure, reported as one
    # (exit 1, the termination message), see test_model_file_checks.
    assert ServerSettings(model=tmp_path / "nope.gguf").model.name == "nope.gguf"


GGUF_HEADER = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") * 2


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (None, "no such file"),
        (b"<html>404 Not Found</html>", "not a GGUF file (starts with b'<htm'"),
        (b"", "not a GGUF file"),
        (b"GGUF\x03\x00", "truncated GGUF file: only 6 bytes"),
        (b"GGUF" + (7).to_bytes(4, "little") + bytes(16), "unsupported GGUF version 7"),
    ],
)
def test_model_file_checks(tmp_path: Path, content: bytes | None, cause: str) -> None:
    model = tmp_path / "m.gguf"
    if content is not None:
        model.write_bytes(content)
    with pytest.raises(ModelLoadError) as caught:
        check_model_file(model, cgroup_root=tmp_path / "no-cgroup")
    assert str(caught.value).startswith(cause)
    line = failure_message(model, str(caught.value))
    assert line.startswith(f"model load failed: {model}: {cause}")


def test_model_file_checks_memory_limit(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(GGUF_HEADER + bytes(4096))
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    check_model_file(model, cgroup_root=cgroup)  # no limit
    (cgroup / "memory.max").write_text("2048\n")
    with pytest.raises(ModelLoadError, match="more than the container's memory limit"):
        check_model_file(model, cgroup_root=cgroup)
    # Offloaded to a GPU, the host memory limit says nothing.
    check_model_file(model, gpu_layers=-1, cgroup_root=cgroup)
    (cgroup / "memory.max").write_text("max\n")
    check_model_file(model, cgroup_root=cgroup)
    with pytest.raises(ModelLoadError, match="not a regular file"):
        check_model_file(tmp_path, cgroup_root=cgroup)


def test_termination_message_is_written_where_it_can_be(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    assert write_termination_message(path, "model load failed: x: y")
    assert path.read_text() == "model load failed: x: y"
    # Kubernetes keeps 4096 bytes at most.
    assert write_termination_message(path, "z" * 10_000)
    assert len(path.read_bytes()) == 4096
    # Outside Kubernetes the folder may not exist: not an error.
    assert not write_termination_message(tmp_path / "missing" / "termination-log", "x")
    assert not write_termination_message(None, "x")
    # The default, /dev/termination-log, is created by the kubelet; never by the server.
    if not Path("/dev/termination-log").exists():
        assert not write_termination_message(Path("/dev/termination-log"), "x")
        assert not Path("/dev/termination-log").exists()


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


def test_llama_cpp_error_lines_become_the_load_failure_cause() -> None:
    errors = _LlamaErrors(lib=None)
    errors.lines += [
        (3, "llama_model_loader: some warning\n"),
        (
            4,
            "llama_model_load: error loading model: tensor 'x' data is not within the file "
            "bounds, model is corrupted or incomplete\n",
        ),
        (4, "llama_model_load_from_file_impl: failed to load model\n"),
    ]
    assert errors.last() == (
        "tensor 'x' data is not within the file bounds, model is corrupted or incomplete"
    )
    errors.lines[:] = [(3, "a warning"), (4, "llama_init_from_model: failed to allocate\n")]
    assert errors.last() == "llama_init_from_model: failed to allocate"
    errors.lines[:] = [(3, "only a warning")]
    assert errors.last() == ""
