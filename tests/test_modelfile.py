"""Modelfile parser and writer: Ollama's ``parser/parser_test.go`` cases (with real parameter
names, since we check them while parsing), line numbers, quoting, round trips."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pollama.errors import InvalidRequest, ModelfileError
from pollama.format import go_float
from pollama.modelfile import (
    _BREAKS,
    _WHITESPACE,
    ERR_INVALID_COMMAND,
    ERR_INVALID_ROLE,
    Command,
    CreateFields,
    Modelfile,
    render_modelfile,
)

LLAMA3_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}"
    "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}"
    "<|eot_id|>"
)


def commands(text: str | bytes) -> list[tuple[str, str]]:
    return [(c.name, c.args) for c in Modelfile.parse(text).commands]


def parse_error(text: str | bytes) -> ModelfileError:
    with pytest.raises(ModelfileError) as err:
        Modelfile.parse(text)
    return err.value


# --- Ollama's parser_test.go ------------------------------------------------------------------


def test_parse_file() -> None:
    text = (
        "\nFROM model1\nADAPTER adapter1\nLICENSE MIT\nPARAMETER top_k 1\n"
        'PARAMETER temperature 0.5\nTEMPLATE """' + LLAMA3_TEMPLATE + '"""    \n'
    )
    assert commands(text) == [
        ("from", "model1"),
        ("adapter", "adapter1"),
        ("license", "MIT"),
        ("top_k", "1"),
        ("temperature", "0.5"),
        ("template", LLAMA3_TEMPLATE),
    ]


def test_parse_draft_renderer_parser() -> None:
    text = "\nFROM base\nDRAFT ./assistant\nRENDERER renderer1\nPARSER parser1\n"
    modelfile = Modelfile.parse(text)
    assert [(c.name, c.args) for c in modelfile.commands] == [
        ("from", "base"),
        ("draft", "./assistant"),
        ("renderer", "renderer1"),
        ("parser", "parser1"),
    ]
    assert "DRAFT ./assistant\n" in str(modelfile)


def test_parse_trim_space() -> None:
    text = (
        '\nFROM "     model 1"\nADAPTER      adapter3\nLICENSE "MIT       "\n'
        "PARAMETER top_k        1\nPARAMETER seed    2\n"
        'TEMPLATE """   ' + LLAMA3_TEMPLATE + '   """    \n'
    )
    assert commands(text) == [
        ("from", "     model 1"),
        ("adapter", "adapter3"),
        ("license", "MIT       "),
        ("top_k", "1"),
        ("seed", "2"),
        ("template", "   " + LLAMA3_TEMPLATE + "   "),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('FROM "FOO  BAR  "', [("from", "FOO  BAR  ")]),
        ('FROM "FOO BAR"\nPARAMETER top_k 1', [("from", "FOO BAR"), ("top_k", "1")]),
        ("FROM     FOOO BAR    ", [("from", "FOOO BAR")]),
        ("FROM /what/is/the path ", [("from", "/what/is/the path")]),
        ("FROM foo", [("from", "foo")]),
        ("FROM /path/to/model", [("from", "/path/to/model")]),
        ("FROM /path/to/model/fp16.bin", [("from", "/path/to/model/fp16.bin")]),
        ("FROM llama3:latest", [("from", "llama3:latest")]),
        ("FROM llama3:7b-instruct-q4_K_M", [("from", "llama3:7b-instruct-q4_K_M")]),
        ("PARAMETER top_k 1\nFROM foo", [("top_k", "1"), ("from", "foo")]),
        (
            "PARAMETER stop the \nFROM lemons make lemonade ",
            [("stop", "the"), ("from", "lemons make lemonade")],
        ),
    ],
)
def test_parse_from(text: str, expected: list[tuple[str, str]]) -> None:
    assert commands(text) == expected


@pytest.mark.parametrize("text", ["", "PARAMETER top_k 1", "# only a comment\n", "SYSTEM hi\n"])
def test_missing_from(text: str) -> None:
    err = parse_error(text)
    assert err.reason == "no FROM line"
    assert err.line == 0
    assert str(err) == "no FROM line"


def test_parameter_missing_value() -> None:
    err = parse_error("\nFROM foo\nPARAMETER top_k\n")
    assert err.reason.startswith("unexpected EOF")
    assert err.line == 3


def test_bad_command() -> None:
    err = parse_error("\nFROM foo\nBADCOMMAND param1 value1\n")
    assert err.line == 3
    assert err.reason == ERR_INVALID_COMMAND
    assert str(err) == f"(line 3): {ERR_INVALID_COMMAND}"
    assert isinstance(err, InvalidRequest)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\n",
            [("message", "system: You are a file parser. Always parse things.")],
        ),
        (
            "\nFROM foo\nMESSAGE system You are a file parser. Always parse things.",
            [("message", "system: You are a file parser. Always parse things.")],
        ),
        (
            "\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\n"
            "MESSAGE user Hey there!\nMESSAGE assistant Hello, I want to parse all the things!\n",
            [
                ("message", "system: You are a file parser. Always parse things."),
                ("message", "user: Hey there!"),
                ("message", "assistant: Hello, I want to parse all the things!"),
            ],
        ),
        (
            '\nFROM foo\nMESSAGE system """\nYou are a multiline file parser. Always parse '
            'things.\n"""\n\t\t\t',
            [("message", "system: \nYou are a multiline file parser. Always parse things.\n")],
        ),
    ],
)
def test_parse_messages(text: str, expected: list[tuple[str, str]]) -> None:
    assert commands(text) == [("from", "foo"), *expected]


@pytest.mark.parametrize(
    ("text", "reason", "line"),
    [
        ("\nFROM foo\nMESSAGE badguy I'm a bad guy!\n", ERR_INVALID_ROLE, 3),
        ("\nFROM foo\nMESSAGE User hi\n", ERR_INVALID_ROLE, 3),
        ("\nFROM foo\nMESSAGE user: hi\n", ERR_INVALID_ROLE, 3),
        ("\nFROM foo\nMESSAGE system\n", "unexpected EOF: missing MESSAGE text", 3),
        ("\nFROM foo\nMESSAGE system", "unexpected EOF: missing MESSAGE text", 3),
    ],
)
def test_parse_message_errors(text: str, reason: str, line: int) -> None:
    err = parse_error(text)
    assert (err.reason, err.line) == (reason, line)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'SYSTEM """\nThis is a\nmultiline system.\n"""\n\t\t\t',
            "\nThis is a\nmultiline system.\n",
        ),
        ('SYSTEM """\nThis is a\nmultiline system."""\n\t\t\t', "\nThis is a\nmultiline system."),
        ('SYSTEM """This is a\nmultiline system."""\n\t\t\t', "This is a\nmultiline system."),
        ('SYSTEM """This is a multiline system."""\n\t\t\t', "This is a multiline system."),
        (
            'SYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
            '\nThis is a multiline system with "quotes".\n',
        ),
        ('SYSTEM """"""\n', ""),
        ('SYSTEM ""\n', ""),
        ('SYSTEM "\'"\n', "'"),
        ('SYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n', "''\"'\"\"'\"\"'\"'''''\"\"'\"\"'"),
        ('TEMPLATE """\n{{ .Prompt }}\n"""', "\n{{ .Prompt }}\n"),
        ('SYSTEM "one\ntwo"\n', "one\ntwo"),
        ('SYSTEM say "hi" now\n', 'say "hi" now'),
    ],
)
def test_parse_quoted(text: str, expected: str) -> None:
    modelfile = Modelfile.parse("\nFROM foo\n" + text)
    assert modelfile.commands[1].args == expected
    assert modelfile.commands[1].line == 3


@pytest.mark.parametrize(
    "text",
    [
        'SYSTEM """This is a multiline system.""\n\t\t\t',
        'SYSTEM "\n\t\t\t',
        'SYSTEM "abc" def\n',  # a value that opens a quote must end with it
    ],
)
def test_parse_unterminated_quote(text: str) -> None:
    err = parse_error("\nFROM foo\n" + text)
    assert err.reason.startswith("unexpected EOF: unterminated")
    assert err.line == 3


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        ("num_ctx 1", "num_ctx", "1"),
        ("num_batch 1", "num_batch", "1"),
        ("num_gpu 1", "num_gpu", "1"),
        ("main_gpu 1", "main_gpu", "1"),
        ("use_mmap true", "use_mmap", "true"),
        ("num_thread 1", "num_thread", "1"),
        ("draft_num_predict 8", "draft_num_predict", "8"),
        ("draft_always true", "draft_always", "true"),
        ("num_keep 1", "num_keep", "1"),
        ("seed 1", "seed", "1"),
        ("num_predict 1", "num_predict", "1"),
        ("top_k 1", "top_k", "1"),
        ("top_p 1.0", "top_p", "1.0"),
        ("min_p 0.05", "min_p", "0.05"),
        ("typical_p 1.0", "typical_p", "1.0"),
        ("repeat_last_n 1", "repeat_last_n", "1"),
        ("temperature 1.0", "temperature", "1.0"),
        ("repeat_penalty 1.0", "repeat_penalty", "1.0"),
        ("presence_penalty 1.0", "presence_penalty", "1.0"),
        ("frequency_penalty 1.0", "frequency_penalty", "1.0"),
        ("stop ### User:", "stop", "### User:"),
        ("stop ### User: ", "stop", "### User:"),
        ('stop "### User:"', "stop", "### User:"),
        ('stop "### User: "', "stop", "### User: "),
        ('stop """### User:"""', "stop", "### User:"),
        ('stop """### User:\n"""', "stop", "### User:\n"),
        ("stop <|endoftext|>", "stop", "<|endoftext|>"),
        ("stop <|eot_id|>", "stop", "<|eot_id|>"),
        ("stop </s>", "stop", "</s>"),
    ],
)
def test_parse_parameters(line: str, name: str, value: str) -> None:
    assert commands(f"FROM foo\nPARAMETER {line}\n") == [("from", "foo"), (name, value)]


@pytest.mark.parametrize("name", ["numa", "num_gqa", "Temperature", "TOP_K"])
def test_unknown_parameter_lists_valid_names(name: str) -> None:
    err = parse_error(f"FROM foo\n\nPARAMETER {name} 1\n")
    assert err.line == 3
    assert err.reason.startswith(f"unknown parameter '{name}'")
    assert "temperature, repeat_penalty" in err.reason


def test_deprecated_parameters_are_dropped_with_a_warning() -> None:
    modelfile = Modelfile.parse(
        "FROM foo\nPARAMETER penalize_newline true\nPARAMETER mirostat 2\nPARAMETER top_k 3\n"
    )
    assert [(c.name, c.args) for c in modelfile.commands] == [("from", "foo"), ("top_k", "3")]
    assert modelfile.warnings == [
        "parameter penalize_newline is deprecated",
        "parameter mirostat is deprecated",
    ]
    assert "mirostat" not in str(modelfile)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("PARAMETER temperature hot", "invalid float value [hot]"),
        ("PARAMETER top_k 1.5", "invalid int value [1.5]"),
        ("PARAMETER use_mmap yes", "invalid bool value [yes]"),
        ("PARAMETER num_ctx -1", 'parameter "num_ctx" must be at least 0 (got -1)'),
        ("PARAMETER num_batch 0", 'parameter "num_batch" must be at least 1 (got 0)'),
    ],
)
def test_bad_parameter_values_have_line_numbers(text: str, reason: str) -> None:
    err = parse_error(f"# comment\nFROM foo\n{text}\n")
    assert (err.reason, err.line) == (reason, 3)


def test_comments() -> None:
    assert commands("\n# comment\nFROM foo\n\t") == [("from", "foo")]
    # '#' only starts a comment at the start of a line
    assert commands("FROM foo # not a comment\n  # indented comment\n") == [
        ("from", "foo # not a comment")
    ]


@pytest.mark.parametrize(
    "text",
    [
        "\nFROM foo\nADAPTER adapter1\nLICENSE MIT\nPARAMETER top_k 1\nPARAMETER seed 2\n"
        "TEMPLATE template1\nMESSAGE system You are a file parser. Always parse things.\n"
        "MESSAGE user Hey there!\nMESSAGE assistant Hello, I want to parse all the things!\n",
        "\nFROM foo\nADAPTER adapter1\nLICENSE MIT\nPARAMETER top_k 1\nTEMPLATE template1\n"
        'MESSAGE system """\nYou are a store greeter. Always respond with "Hello!".\n"""\n'
        "MESSAGE user Hey there!\nMESSAGE assistant Hello, I want to parse all the things!\n",
        '\nFROM foo\nADAPTER adapter1\nLICENSE """\nVery long and boring legal text.\n'
        'Blah blah blah.\n"Oh look, a quote!"\n"""\n\nPARAMETER top_k 1\nTEMPLATE template1\n'
        'MESSAGE system """\nYou are a store greeter. Always respond with "Hello!".\n"""\n',
        '\nFROM foo\nSYSTEM ""\n',
        'FROM "  spaced  "\nSYSTEM \t\n',
    ],
)
def test_format_parse_round_trip(text: str) -> None:
    modelfile = Modelfile.parse(text)
    again = Modelfile.parse(str(modelfile))
    assert again == modelfile
    assert str(again) == str(modelfile)


# --- encodings, line breaks, non-printable runes -----------------------------------------------

UTF16_DATA = "FROM bob\nPARAMETER top_k 1\nPARAMETER num_ctx 4096\nSYSTEM You are a utf16 file.\n"
UTF16_EXPECTED = [
    ("from", "bob"),
    ("top_k", "1"),
    ("num_ctx", "4096"),
    ("system", "You are a utf16 file."),
]


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe" + UTF16_DATA.encode("utf-16-le"),
        b"\xfe\xff" + UTF16_DATA.encode("utf-16-be"),
        b"\xef\xbb\xbf" + UTF16_DATA.encode(),
        UTF16_DATA.encode(),
        "\ufeff" + UTF16_DATA,
    ],
)
def test_encodings(data: str | bytes) -> None:
    assert commands(data) == UTF16_EXPECTED


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])  # Python's utf-16 writes a BOM
def test_multibyte(encoding: str) -> None:
    data = "FROM test\n\tSYSTEM 你好👋".encode(encoding)
    assert commands(data) == [("from", "test"), ("system", "你好👋")]


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert commands(b"FROM foo\nSYSTEM a\xffb\n")[1] == ("system", "a\ufffdb")


def test_carriage_return_line_breaks_and_line_numbers() -> None:
    assert commands("FROM a\rSYSTEM b\r") == [("from", "a"), ("system", "b")]
    assert commands("FROM a\r\nSYSTEM b\r\n") == [("from", "a"), ("system", "b")]
    # \r\n counts once, a lone \r counts as a line break
    assert parse_error("FROM a\r\n\r\nBAD x\r\n").line == 3
    assert parse_error("FROM a\r\rBAD x").line == 3
    assert [c.line for c in Modelfile.parse("FROM a\r\n\r\nSYSTEM b\rLICENSE c").commands] == [
        1,
        3,
        4,
    ]


def test_non_printable_runes_are_dropped() -> None:
    assert commands("FROM foo\nSYSTEM a\x00b\u200bc\x07\n") == [("from", "foo"), ("system", "abc")]
    # a stray zero-width rune before an instruction does not break it, as in Ollama
    assert commands("\u200bFROM foo\n") == [("from", "foo")]


def test_instructions_are_case_insensitive() -> None:
    assert commands("from a\nSyStEm b\nparameter top_k 2\nmessage user hi\nLicense l\n") == [
        ("from", "a"),
        ("system", "b"),
        ("top_k", "2"),
        ("message", "user: hi"),
        ("license", "l"),
    ]


def test_every_instruction_and_line_numbers() -> None:
    text = (
        "# header\n"  # 1
        "FROM base\n"  # 2
        "ADAPTER ./lora.gguf\n"  # 3
        "DRAFT ./draft.gguf\n"  # 4
        'TEMPLATE """{{ .System }}\n'  # 5
        '{{ .Prompt }}"""\n'  # 6
        "SYSTEM be brief\n"  # 7
        "LICENSE MIT\n"  # 8
        "RENDERER qwen3-coder\n"  # 9
        "PARSER qwen3-coder\n"  # 10
        "PARAMETER stop a\n"  # 11
        "MESSAGE user hi\n"  # 12
        "REQUIRES 0.14.0\n"  # 13
    )
    modelfile = Modelfile.parse(text)
    assert [(c.name, c.line) for c in modelfile.commands] == [
        ("from", 2),
        ("adapter", 3),
        ("draft", 4),
        ("template", 5),
        ("system", 7),
        ("license", 8),
        ("renderer", 9),
        ("parser", 10),
        ("stop", 11),
        ("message", 12),
        ("requires", 13),
    ]
    # an error after a multi-line value still reports its own line
    assert parse_error(text + "\nOOPS x\n").line == 15


@pytest.mark.parametrize(
    ("text", "reason", "line"),
    [
        ("FROM", "unexpected EOF: missing value for FROM", 1),
        ("FROM foo\nSYSTEM\n", "unexpected EOF: missing value for SYSTEM", 2),
        ("FROM foo\nPARAMETER\n", "unexpected EOF: missing value for PARAMETER", 2),
        ("FROM foo\nPARAMETER \n", "unexpected EOF: missing PARAMETER value", 2),
        ("FROM foo\nPARAMETER top-k 1\n", "invalid character '-' in parameter name", 2),
        ("FROM foo\nFROM2 x\n", ERR_INVALID_COMMAND, 2),
        ("FROM foo\nFROM: x\n", ERR_INVALID_COMMAND, 2),
        ("FROM foo\n\n\nBAD", ERR_INVALID_COMMAND, 4),
        ('FROM foo\nSYSTEM """a\nb\nc', 'unexpected EOF: unterminated """ quote', 2),
        ("FROM foo\nADAPTER a\nADAPTER b\n", "only one adapter is currently supported", 3),
        ("FROM foo\nDRAFT a\nDRAFT b\n", "only one draft model is currently supported", 3),
        ("FROM foo\nREQUIRES latest\n", "requires must be a valid semver (e.g. 0.14.0)", 2),
    ],
)
def test_errors_and_their_lines(text: str, reason: str, line: int) -> None:
    err = parse_error(text)
    assert (err.reason, err.line) == (reason, line)
    assert str(err) == f"(line {line}): {reason}"


def test_extra_blanks_before_parameter_name_and_role() -> None:
    assert commands("FROM foo\nPARAMETER   top_k 1\nMESSAGE \tuser  hi\n") == [
        ("from", "foo"),
        ("top_k", "1"),
        ("message", "user: hi"),
    ]


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("0.14.0", "0.14.0"),
        ("v0.14.0", "0.14.0"),
        ("1", "1"),
        ("1.2", "1.2"),
        ("1.2.3-rc.1+build.05", "1.2.3-rc.1+build.05"),
        ("1.2.3-0alpha", "1.2.3-0alpha"),
    ],
)
def test_requires_valid(value: str, normalized: str) -> None:
    assert Modelfile.parse(f"FROM a\nREQUIRES {value}\n").to_create_fields().requires == normalized


@pytest.mark.parametrize(
    "value", ["1.2.3.4", "01.2.3", "1.2-rc", "1.2.3-01", "1.2.3-", "1.2.3+", "vv1", "1.2.3-a..b"]
)
def test_requires_invalid(value: str) -> None:
    assert parse_error(f"FROM a\nREQUIRES {value}\n").line == 2


# --- create fields ----------------------------------------------------------------------------


def test_create_fields_like_ollama_create_request() -> None:
    fields = Modelfile.parse(
        "FROM test\nPARAMETER temperature 0.5\nPARAMETER top_k 1\nSYSTEM You are a bot.\n"
        "LICENSE license1\nLICENSE license2\nMESSAGE user Hello there!\n"
        "MESSAGE assistant Hi! How are you?\n"
    ).to_create_fields()
    assert fields == CreateFields(
        froms=["test"],
        license=["license1", "license2"],
        system="You are a bot.",
        parameters={"temperature": 0.5, "top_k": 1},
        messages=[
            {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "Hi! How are you?"},
        ],
    )
    assert fields.from_ == "test"
    assert type(fields.parameters["top_k"]) is int


def test_create_fields_accumulate_and_override() -> None:
    fields = Modelfile.parse(
        "FROM ./model.gguf\nFROM ./mmproj.gguf\nADAPTER ./lora\nDRAFT ./draft\n"
        "TEMPLATE one\nTEMPLATE two\nSYSTEM s1\nSYSTEM s2\n"
        "PARAMETER stop <|im_end|>\nPARAMETER temperature 0.1\nPARAMETER stop </s>\n"
        "PARAMETER temperature 0.2\nRENDERER r\nPARSER p\nREQUIRES v0.14.1\n"
        "MESSAGE system sys: with colon\n"
    ).to_create_fields()
    assert fields.froms == ["./model.gguf", "./mmproj.gguf"]
    assert fields.from_ == "./model.gguf"
    assert fields.adapters == ["./lora"]
    assert fields.draft == "./draft"
    assert (fields.template, fields.system) == ("two", "s2")
    assert fields.parameters == {"stop": ["<|im_end|>", "</s>"], "temperature": 0.2}
    assert (fields.renderer, fields.parser, fields.requires) == ("r", "p", "0.14.1")
    assert fields.messages == [{"role": "system", "content": "sys: with colon"}]


def test_create_fields_empty() -> None:
    fields = Modelfile.parse("FROM x").to_create_fields()
    assert fields == CreateFields(froms=["x"])
    assert fields.template is None and fields.system is None and fields.parameters == {}


SEED_GUIDE = """# 继承哪个模型（支持 Ollama Hub 上的模型名）
FROM qwen3:14b

# 设置默认系统提示
SYSTEM "你是由崔亮创建的AI助手，你叫亮仔，你回答问题时需要使用中文。"

# 设置默认参数
PARAMETER temperature 0.5 
PARAMETER num_ctx 4096 
"""  # noqa: W291 - the trailing blanks are part of the guide's file


def test_seed_guide_modelfile() -> None:
    modelfile = Modelfile.parse(SEED_GUIDE)
    assert [(c.name, c.args, c.line) for c in modelfile.commands] == [
        ("from", "qwen3:14b", 2),
        ("system", "你是由崔亮创建的AI助手，你叫亮仔，你回答问题时需要使用中文。", 5),
        ("temperature", "0.5", 8),
        ("num_ctx", "4096", 9),
    ]
    assert modelfile.warnings == []
    fields = modelfile.to_create_fields()
    assert fields.from_ == "qwen3:14b"
    assert fields.system == "你是由崔亮创建的AI助手，你叫亮仔，你回答问题时需要使用中文。"
    assert fields.parameters == {"temperature": 0.5, "num_ctx": 4096}
    assert str(modelfile) == (
        "FROM qwen3:14b\n"
        "SYSTEM 你是由崔亮创建的AI助手，你叫亮仔，你回答问题时需要使用中文。\n"
        "PARAMETER temperature 0.5\n"
        "PARAMETER num_ctx 4096\n"
    )
    assert Modelfile.parse(SEED_GUIDE.encode("utf-16")) == modelfile


# --- writer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (Command("from", "llama3:8b"), "FROM llama3:8b"),
        (Command("from", "/path with space/m.gguf"), "FROM /path with space/m.gguf"),
        (Command("from", " lead"), 'FROM " lead"'),
        (Command("stop", "<|eot_id|>"), "PARAMETER stop <|eot_id|>"),
        (Command("stop", "### User: "), 'PARAMETER stop "### User: "'),
        (Command("temperature", "0.7"), "PARAMETER temperature 0.7"),
        (Command("system", "one\ntwo"), 'SYSTEM "one\ntwo"'),
        (Command("system", 'say "hi"\nok'), 'SYSTEM """say "hi"\nok"""'),
        (Command("system", 'say "hi"'), 'SYSTEM say "hi"'),
        (Command("system", '"quoted"'), 'SYSTEM """"quoted""""'),
        (Command("system", ""), 'SYSTEM ""'),
        (Command("system", "\ttab"), 'SYSTEM "\ttab"'),
        (Command("template", "a\rb"), 'TEMPLATE "a\rb"'),
        (Command("license", "MIT"), "LICENSE MIT"),
        (Command("adapter", "./lora.gguf"), "ADAPTER ./lora.gguf"),
        (Command("draft", "./d.gguf"), "DRAFT ./d.gguf"),
        (Command("renderer", "r"), "RENDERER r"),
        (Command("parser", "p"), "PARSER p"),
        (Command("requires", "0.14.0"), "REQUIRES 0.14.0"),
        (Command("message", "user: Hey there!"), "MESSAGE user Hey there!"),
        (Command("message", "system: \nmulti\n"), 'MESSAGE system "\nmulti\n"'),
    ],
)
def test_command_str_quoting(command: Command, text: str) -> None:
    assert str(command) == text
    parsed = Modelfile.parse(f"FROM x\n{text}\n").commands[-1]
    assert parsed == command


def test_render_modelfile_like_ollama_show() -> None:
    text = render_modelfile(
        "/models/blobs/sha256-abc",
        name="smollm2:135m",
        adapters=["/models/blobs/sha256-lora"],
        projectors=["/models/blobs/sha256-proj"],
        template="{{ .Prompt }}",
        system="You are\nhelpful.",
        parameters={
            "stop": ["<|im_start|>", "<|im_end|>"],
            "temperature": 0.2,
            "num_ctx": 4096,
            "use_mmap": False,
            "top_p": 1.0,
        },
        license=["Apache 2.0", 'MIT\n"quoted"'],
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    )
    assert text == (
        '# Modelfile generated by "pollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        "# FROM smollm2:135m\n"
        "\n"
        "FROM /models/blobs/sha256-abc\n"
        "ADAPTER /models/blobs/sha256-lora\n"
        "FROM /models/blobs/sha256-proj\n"
        "TEMPLATE {{ .Prompt }}\n"
        'SYSTEM "You are\nhelpful."\n'
        "PARAMETER stop <|im_start|>\n"
        "PARAMETER stop <|im_end|>\n"
        "PARAMETER temperature 0.2\n"
        "PARAMETER num_ctx 4096\n"
        "PARAMETER use_mmap false\n"
        "PARAMETER top_p 1\n"
        "LICENSE Apache 2.0\n"
        'LICENSE """MIT\n"quoted""""\n'
        "MESSAGE user hi\n"
        "MESSAGE assistant hello\n"
    )
    fields = Modelfile.parse(text).to_create_fields()
    assert fields == CreateFields(
        froms=["/models/blobs/sha256-abc", "/models/blobs/sha256-proj"],
        adapters=["/models/blobs/sha256-lora"],
        template="{{ .Prompt }}",
        system="You are\nhelpful.",
        parameters={
            "stop": ["<|im_start|>", "<|im_end|>"],
            "temperature": 0.2,
            "num_ctx": 4096,
            "use_mmap": False,
            "top_p": 1.0,
        },
        license=["Apache 2.0", 'MIT\n"quoted"'],
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    )


def test_render_modelfile_minimal_and_optional_instructions() -> None:
    assert render_modelfile("/b/m", system="", template=None) == (
        '# Modelfile generated by "pollama show"\nFROM /b/m\n'
    )
    text = render_modelfile(
        "/b/m", draft="/b/d", renderer="qwen3", parser="qwen3", requires="0.14.0",
        parameters={"num_ctx": 1048576.0},  # a JSON float for an int option stays an int
    )  # fmt: skip
    fields = Modelfile.parse(text).to_create_fields()
    assert (fields.draft, fields.renderer, fields.parser, fields.requires) == (
        "/b/d",
        "qwen3",
        "qwen3",
        "0.14.0",
    )
    assert fields.parameters == {"num_ctx": 1048576}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.5, "0.5"),
        (1.0, "1"),
        (-2.5, "-2.5"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (123456.0, "123456"),
        (1e6, "1e+06"),
        (1048576.5, "1.0485765e+06"),
        (0.0, "0"),
        (1e100, "1e+100"),
    ],
)
def test_go_float_formatting(value: float, text: str) -> None:
    assert go_float(value) == text


# --- round trip properties --------------------------------------------------------------------

_CHARS = st.sampled_from(list("ab \"\n\t\r#:'Ü你👋") + ['"""'])
def _representable(value: str) -> bool:
    """Whether ``_quote(value)`` reads back as ``value``: no dropped (non-printable) runes, and
    no line inside a ``\"\"\"`` value that ends with ``\"\"\"`` (the quote would close there;
    the language has no escapes). Every value ``parse`` returns passes."""
    if not all(ch.isprintable() or ch in _WHITESPACE for ch in value):
        return False
    if '"' not in value:
        return True
    return not any(
        value[:i].rstrip(_WHITESPACE).endswith('"""') for i, ch in enumerate(value) if ch in _BREAKS
    )


_VALUES = st.lists(_CHARS, max_size=12).map("".join).filter(_representable)
_PARAM_VALUES = {
    "stop": _VALUES,
    "temperature": st.sampled_from(["0.5", "1", "0.25", "1e-05"]),
    "num_ctx": st.integers(0, 2**20).map(str),
    "use_mmap": st.sampled_from(["true", "false"]),
    "seed": st.integers(-(2**63), 2**63 - 1).map(str),
}
_COMMAND = st.one_of(
    st.builds(
        Command,
        st.sampled_from(["from", "system", "template", "license", "renderer", "parser"]),
        _VALUES,
    ),  # fmt: skip
    st.builds(
        lambda role, text: Command("message", f"{role}: {text}"),
        st.sampled_from(["system", "user", "assistant"]),
        _VALUES,
    ),
    st.sampled_from(sorted(_PARAM_VALUES)).flatmap(
        lambda name: _PARAM_VALUES[name].map(lambda v: Command(name, v))
    ),
)


@given(st.lists(_COMMAND, max_size=8), _VALUES)
def test_str_then_parse_is_identity(cmds: list[Command], base: str) -> None:
    modelfile = Modelfile([Command("from", base), *cmds])
    assert Modelfile.parse(str(modelfile)) == modelfile


_LINE_STARTS = st.sampled_from(
    ["FROM ", "SYSTEM ", "TEMPLATE ", "PARAMETER stop ", "MESSAGE user ", "# ", "", "\t"]
)


@given(st.lists(st.tuples(_LINE_STARTS, st.lists(_CHARS, max_size=10).map("".join)), max_size=8))
def test_parse_of_str_of_parse_is_identity(lines: list[tuple[str, str]]) -> None:
    text = "FROM x\n" + "\n".join(start + rest for start, rest in lines)
    try:
        modelfile = Modelfile.parse(text)
    except ModelfileError:
        assume(False)
        return
    assert all(_representable(c.args) for c in modelfile.commands)
    assert Modelfile.parse(str(modelfile)) == modelfile


@given(
    st.dictionaries(
        st.sampled_from(["temperature", "top_p", "num_ctx", "seed", "use_mmap", "stop"]),
        st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.integers(0, 2**20), st.booleans()),
    )
)
def test_render_parses_back_to_the_same_parameters(raw: dict[str, object]) -> None:
    from pollama.options import OPTIONS, _float32_shortest

    # build a well-typed parameters dict from the random values
    params: dict[str, object] = {}
    for key, value in raw.items():
        kind = OPTIONS[key].kind
        if kind == "bool":
            params[key] = bool(value)
        elif kind == "int":
            params[key] = abs(int(value)) % 2**20  # type: ignore[call-overload]
        elif kind == "float":
            params[key] = _float32_shortest(float(value))  # type: ignore[arg-type]
        else:
            params[key] = [str(value), "</s>"]
    text = render_modelfile("/b/m", parameters=params)
    assert Modelfile.parse(text).to_create_fields().parameters == params
