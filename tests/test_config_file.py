"""pollama.toml: the settings file, its presets, its errors, and --print-config."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pollama.config import ConfigFileError, ModelPreset, load_settings, read_config_file
from pollama.config import file as config_file
from pollama.config.report import config_rows, format_config


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / ".ollama").mkdir()
    return tmp_path


def write(home: Path, text: str, mode: int = 0o600) -> Path:
    path = home / ".ollama" / "pollama.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_file_sets_settings_by_variable_or_short_name(home: Path) -> None:
    write(home, 'OLLAMA_NUM_PARALLEL = 3\nkeep_alive = "10m"\nOLLAMA_FLASH_ATTENTION = true\n'
                'OLLAMA_ORIGINS = ["http://a.example", "http://b.example"]\n'
                "POLLAMA_MAX_BODY_SIZE = 1024\n")  # fmt: skip
    s = load_settings({"HOME": str(home)})
    assert s.num_parallel == 3
    assert s.keep_alive == 600.0
    assert s.flash_attention is True
    assert s.origins == ("http://a.example", "http://b.example")
    assert s.max_body_size == 1024
    assert s.config == home / ".ollama" / "pollama.toml"


def test_environment_over_file_over_defaults(home: Path) -> None:
    write(home, "OLLAMA_NUM_PARALLEL = 3\nOLLAMA_MAX_QUEUE = 7\n")
    s = load_settings({"HOME": str(home), "OLLAMA_NUM_PARALLEL": "5"})
    assert (s.num_parallel, s.max_queue, s.max_loaded_models) == (5, 7, 0)
    rows, _ = config_rows({"HOME": str(home), "OLLAMA_NUM_PARALLEL": "5"})
    by_name = {row.variable: row for row in rows}
    assert (by_name["OLLAMA_NUM_PARALLEL"].value, by_name["OLLAMA_NUM_PARALLEL"].source) == (
        "5", "environment")  # fmt: skip
    assert by_name["OLLAMA_MAX_QUEUE"].source == f"file {home / '.ollama' / 'pollama.toml'}"
    assert by_name["OLLAMA_MAX_LOADED_MODELS"].source == "default"


def test_pollama_config_names_the_file_and_must_exist(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text("OLLAMA_MAX_QUEUE = 9\n")
    write(home, "OLLAMA_MAX_QUEUE = 3\n")
    assert load_settings({"HOME": str(home), "POLLAMA_CONFIG": str(other)}).max_queue == 9
    with pytest.raises(ConfigFileError, match="POLLAMA_CONFIG names .*missing.toml"):
        load_settings({"HOME": str(home), "POLLAMA_CONFIG": str(tmp_path / "missing.toml")})


def test_the_system_file_is_read_when_the_user_has_none(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc-pollama.toml"
    system.write_text("OLLAMA_MAX_QUEUE = 11\n")
    monkeypatch.setattr(config_file, "SYSTEM_CONFIG", system)
    assert load_settings({"HOME": str(home)}).max_queue == 11
    write(home, "OLLAMA_MAX_QUEUE = 12\n")  # the user's file comes first
    assert load_settings({"HOME": str(home)}).max_queue == 12


def test_no_file_means_defaults(home: Path) -> None:
    s = load_settings({"HOME": str(home)})
    assert s.config is None and s.presets == {} and s.num_parallel == 1


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('OLLAMA_NUM_PARALLEL = "four"\n', 1, "takes a whole number"),
        ("\n\nOLLAMA_KEEP_ALIVE = \"soon\"\n", 3, "takes a duration"),
        ("OLLAMA_NOPRUNE = \"maybe\"\n", 1, "takes true or false"),
        ("OLLAMA_MAX_QUEUE = -3\n", 1, "whole number of 0 or more"),
        ("OLLAMA_ORIGINS = { a = 1 }\n", 1, "takes a string, number or list"),
        ('[models."smollm2"]\nnum_ctx = "big"\n', 2, "num_ctx takes a whole number"),
        ('[models."smollm2"]\nnum_ctx = 2\n', 2, "between 4 and"),
        ('[models."smollm2"]\nkv_cache_type = "q3"\n', 2, "one of f16, q8_0, q4_0"),
        ('[models."smollm2"]\nkeep_alive = "a while"\n', 2, "'pinned'"),
        ('[models."smollm2"]\nflash_attention = "yes"\n', 2, "true or false"),
        ("models = 3\n", 1, "holds tables"),
    ],
)
def test_a_bad_value_names_the_line_and_what_to_write(
    home: Path, text: str, line: int, problem: str
) -> None:
    path = write(home, text)
    with pytest.raises(ConfigFileError) as caught:
        load_settings({"HOME": str(home)})
    assert f"{path} line {line}" in str(caught.value)
    assert problem in str(caught.value)


def test_a_toml_syntax_error_names_the_line(home: Path) -> None:
    write(home, "OLLAMA_NUM_PARALLEL = 2\nOLLAMA_MAX_QUEUE = = 3\n")
    with pytest.raises(ConfigFileError, match=r"line 2"):
        load_settings({"HOME": str(home)})


def test_unknown_settings_are_warnings_naming_them(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(home, 'OLLAMA_NUM_PARALLEL = 2\nOLLAMA_NUM_PARALEL = 4\nHOME = "/x"\n\n'
                '[models."smollm2"]\nnum_ctx = 4096\nfrobnicate = 1\n')  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pollama.config"):
        s = load_settings({"HOME": str(home)})
    assert s.num_parallel == 2 and s.user_home == home
    text = caplog.text
    assert "line 2: unknown setting 'OLLAMA_NUM_PARALEL'" in text
    assert "line 3: unknown setting 'HOME'" in text
    assert "line 7: models.\"smollm2\": unknown preset setting 'frobnicate'" in text


def test_a_file_others_may_write_is_refused(home: Path) -> None:
    path = write(home, "OLLAMA_NUM_PARALLEL = 2\n", mode=0o666)
    with pytest.raises(ConfigFileError, match=f"chmod o-w {path}"):
        load_settings({"HOME": str(home)})


def test_an_api_key_in_a_file_others_may_read_is_ignored(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "k" * 32
    write(home, f'OLLAMA_API_KEY = "{secret}"\n', mode=0o644)
    with caplog.at_level(logging.WARNING, logger="pollama.config"):
        assert load_settings({"HOME": str(home)}).api_key is None
    assert "OLLAMA_API_KEY ignored: others may read this file" in caplog.text
    assert secret not in caplog.text
    write(home, f'OLLAMA_API_KEY = "{secret}"\n', mode=0o600)
    assert load_settings({"HOME": str(home)}).api_key == secret


def test_presets_parse_with_pinned_and_durations(home: Path) -> None:
    write(home, '[models."qwen2.5-coder:0.5b"]\nnum_ctx = 8192\nnum_parallel = 2\n'
                'keep_alive = "pinned"\nflash_attention = false\nkv_cache_type = "Q8_0"\n'
                'num_gpu = 0\n\n[models.smollm2]\nkeep_alive = -1\n\n'
                '[models."all-minilm"]\nkeep_alive = 90\n')  # fmt: skip
    presets = load_settings({"HOME": str(home)}).presets
    assert presets["qwen2.5-coder:0.5b"] == ModelPreset(
        num_ctx=8192, num_parallel=2, keep_alive=math.inf, pinned=True, flash_attention=False,
        kv_cache_type="q8_0", num_gpu=0)  # fmt: skip
    assert presets["qwen2.5-coder:0.5b"].options() == {"num_ctx": 8192, "num_gpu": 0}
    assert presets["smollm2"] == ModelPreset(keep_alive=math.inf)
    assert presets["all-minilm"] == ModelPreset(keep_alive=90.0)


def test_read_config_file_is_what_a_reload_checks_first(home: Path) -> None:
    assert read_config_file({"HOME": str(home)}).path is None
    write(home, "OLLAMA_MAX_QUEUE = 4\n")
    config = read_config_file({"HOME": str(home)})
    assert config.values == {"max_queue": "4"}
    assert load_settings({"HOME": "/nonexistent"}, config_file=config).max_queue == 4


def test_print_config_lists_values_sources_presets_and_hides_secrets(home: Path) -> None:
    write(home, 'OLLAMA_KEEP_ALIVE = "1h"\n\n[models."smollm2:135m"]\nkeep_alive = "pinned"\n'
                "num_ctx = 4096\n")  # fmt: skip
    env = {"HOME": str(home), "OLLAMA_API_KEY": "s3cret-value", "OLLAMA_HOST": "127.0.0.1:9"}
    rows, settings = config_rows(env)
    text = format_config(rows, settings)
    assert "s3cret-value" not in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert lines["OLLAMA_KEEP_ALIVE"].split()[1:3] == ["1h0m0s", "file"]
    assert lines["OLLAMA_API_KEY"].split()[1:] == ["(set)", "environment"]
    assert lines["OLLAMA_HOST"].split()[1:] == ["http://127.0.0.1:9", "environment"]
    assert 'models."smollm2:135m": num_ctx=4096 keep_alive=pinned' in text


def test_serve_print_config_through_the_cli(home: Path) -> None:
    write(home, "OLLAMA_NUM_PARALLEL = 6\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "POLLAMA_"))}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-m", "pollama", "serve", "--print-config"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("OLLAMA_NUM_PARALLEL"))
    assert row.split()[1:3] == ["6", "file"]
    write(home, "OLLAMA_NUM_PARALLEL = [1]\n")
    out = subprocess.run([sys.executable, "-m", "pollama", "serve", "--print-config"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert "pollama.toml line 1: OLLAMA_NUM_PARALLEL" in out.stderr
