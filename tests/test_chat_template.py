"""``--chat-template``: what recover and make-diff write is what transformers applies, to the character."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from weight_diff.chat_template import OPEN_INSTRUCT
from weight_diff.cli import main
from weight_diff.inspect_dir import inspect_path
from weight_diff.tiny_llama import make_raw_and_tuned

HI = [{"role": "user", "content": "Hi"}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
OWN_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_raw_and_tuned(tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def diff(pair, tmp_path_factory) -> Path:
    """A diff made without --chat-template from a tuned model that has none (the 2023 Open-Instruct case)."""
    out = tmp_path_factory.mktemp("plain") / "diff"
    cli("make-diff", "--path_raw", pair[0], "--path_tuned", pair[1], "--path_diff", out)
    return out


def cli(*args) -> None:
    result = CliRunner().invoke(main, [*map(str, args), "-q"])
    assert result.exit_code == 0, result.output


def recover(raw: Path, diff: Path, out: Path, *template: str) -> Path:
    cli("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", out, *template)
    return out


def apply(model: Path, messages: list[dict], generation_prompt: bool = True) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_open_instruct_single_turn_is_the_model_cards_format(pair, diff, tmp_path):
    out = recover(pair[0], diff, tmp_path / "out", "--chat-template", "open-instruct")

    assert apply(out, HI) == "<s><|user|>\nHi\n<|assistant|>\n"


def open_instruct_training_text(messages: list[dict]) -> str:
    """open-instruct's finetune.py (2023), written from its rules: each turn's content stripped, the turns joined,
    the whole text stripped; the tokenizer then put BOS first."""
    text = ""
    for message in messages:
        content = message["content"].strip()
        text += {"system": f"<|system|>\n{content}\n", "user": f"<|user|>\n{content}\n",
                 "assistant": f"<|assistant|>\n{content}</s>\n"}[message["role"]]  # fmt: skip
    return "<s>" + text.strip()


PADDED = [
    {"role": "user", "content": "  Two lines:\nfirst\n\n"},
    {"role": "assistant", "content": "\nOK.  "},
    {"role": "user", "content": "Again?\t"},
    {"role": "assistant", "content": "Yes."},
]


@pytest.mark.parametrize(
    "messages", [HI, CONVERSATION, CONVERSATION[:3], PADDED], ids=["hi", "four", "three", "padded"]
)
def test_open_instruct_renders_its_training_text_and_prompts_after_it(pair, diff, tmp_path, messages):
    out = recover(pair[0], diff, tmp_path / "out", "--chat-template", "open-instruct")

    assert apply(out, messages, generation_prompt=False) == open_instruct_training_text(messages)
    assert apply(out, messages) == open_instruct_training_text(messages) + "\n<|assistant|>\n"


def test_open_instruct_multi_turn_is_the_model_cards_format_between_turns(pair, diff, tmp_path):
    out = recover(pair[0], diff, tmp_path / "out", "--chat-template", "open-instruct")

    assert apply(out, CONVERSATION) == (
        "<s><|system|>\nYou are terse.\n"
        "<|user|>\nCapital of France?\n"
        "<|assistant|>\nParis.</s>\n"
        "<|user|>\nAnd of Italy?\n"
        "<|assistant|>\n"
    )
    assert apply(out, CONVERSATION[:3], generation_prompt=False).endswith("<|assistant|>\nParis.</s>")


def test_the_template_is_written_into_tokenizer_config_json_and_its_checksum(pair, diff, tmp_path):
    out = recover(pair[0], diff, tmp_path / "out", "--chat-template", "open-instruct")

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == OPEN_INSTRUCT
    assert config["model_max_length"] == 2048  # the diff's other keys are kept
    assert not (out / "chat_template.jinja").exists()  # so transformers read it from tokenizer_config.json
    assert inspect_path(out).sums.status == "verified"  # SHA256SUMS covers the rewritten file


def test_an_unknown_role_is_refused_by_the_template(pair, diff, tmp_path):
    from jinja2 import TemplateError

    out = recover(pair[0], diff, tmp_path / "out", "--chat-template", "open-instruct")

    with pytest.raises(TemplateError, match="open-instruct template: unknown role tool"):
        apply(out, [{"role": "tool", "content": "{}"}])


def test_a_template_file_of_the_users_own(pair, diff, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text(OWN_TEMPLATE)

    out = recover(pair[0], diff, tmp_path / "out", "--chat-template", template)

    assert apply(out, CONVERSATION[1:3]) == "[user] Capital of France?\n[assistant] Paris.\n"


def test_neither_a_built_in_name_nor_a_file_is_a_usage_error(pair, diff, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "recover",
            "--path_raw",
            str(pair[0]),
            "--path_diff",
            str(diff),
            "--path_tuned",
            str(tmp_path / "out"),
            "--chat-template",
            "open-instruckt",
            "-q",
        ],
    )

    assert result.exit_code == 2
    assert "--chat-template open-instruckt: neither a built-in template (open-instruct) nor a readable file" in (
        result.stderr
    )


def make_diff_with_open_instruct(pair, tmp_path):
    diff = tmp_path / "diff"
    cli("make-diff", "--path_raw", pair[0], "--path_tuned", pair[1], "--path_diff", diff,
        "--chat-template", "open-instruct")  # fmt: skip
    return diff


def test_make_diff_embeds_the_template_and_recover_keeps_it_without_the_flag(pair, tmp_path):
    diff = make_diff_with_open_instruct(pair, tmp_path)
    assert json.loads((diff / "tokenizer_config.json").read_text())["chat_template"] == OPEN_INSTRUCT

    out = recover(pair[0], diff, tmp_path / "out")

    assert apply(out, HI) == "<s><|user|>\nHi\n<|assistant|>\n"


def test_the_flag_replaces_a_template_the_diff_carries_in_tokenizer_config(pair, tmp_path):
    diff = make_diff_with_open_instruct(pair, tmp_path)
    template = tmp_path / "mine.jinja"
    template.write_text(OWN_TEMPLATE)

    out = recover(pair[0], diff, tmp_path / "out", "--chat-template", template)

    assert apply(out, HI) == "[user] Hi\n"


@pytest.fixture
def diff_with_jinja_file(pair, tmp_path) -> Path:
    """A diff of a tuned model saved by transformers 5 with a template: it lands in chat_template.jinja."""
    from transformers import AutoTokenizer

    tuned = shutil.copytree(pair[1], tmp_path / "tuned")
    tokenizer = AutoTokenizer.from_pretrained(tuned)
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(tuned)
    assert (tuned / "chat_template.jinja").read_text() == OWN_TEMPLATE
    assert "chat_template" not in json.loads((tuned / "tokenizer_config.json").read_text())
    diff = tmp_path / "diff"
    cli("make-diff", "--path_raw", pair[0], "--path_tuned", tuned, "--path_diff", diff)
    return diff


def test_a_diffs_chat_template_jinja_is_kept_without_the_flag(pair, diff_with_jinja_file, tmp_path):
    out = recover(pair[0], diff_with_jinja_file, tmp_path / "out")

    assert apply(out, HI) == "[user] Hi\n"


def test_the_flag_wins_over_a_chat_template_jinja_in_the_diff(pair, diff_with_jinja_file, tmp_path):
    out = recover(pair[0], diff_with_jinja_file, tmp_path / "out", "--chat-template", "open-instruct")

    assert apply(out, HI) == "<s><|user|>\nHi\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("{% for message in messages %}{{ message['content'] }}{% endfor %", "not a valid Jinja template (line 1:"),
        ("{% for m in messages %}{{ m['content'] | trimm }}{% endfor %}", "No filter named 'trimm'"),
        ("{% break %}{{ messages }}", "not a valid Jinja template"),
        ('{"chat_template": "{{ messages }}", "bos_token": "<s>"}', "a JSON file, not a template"),
    ],
    ids=["unclosed", "unknown-filter", "break-outside-loop", "tokenizer-config"],
)
def test_a_template_file_that_will_not_compile_is_refused_before_anything_is_written(pair, diff, tmp_path, text, said):
    # Each was written, and generate (or any tool) then failed on it: "unexpected TemplateSyntaxError ... report
    # it". Parsing alone let an unknown filter or a break outside a loop through.
    template = tmp_path / "broken.jinja"
    template.write_text(text)
    out = tmp_path / "out"
    args = ["recover", "--path_raw", pair[0], "--path_diff", diff, "--path_tuned", out, "--chat-template", template]
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"--chat-template {template}: " in result.output and said in result.output, result.output
    assert not out.exists()


def test_a_template_with_transformers_generation_tag_is_taken(pair, diff, tmp_path):
    # {% generation %} marks the assistant's tokens for transformers (return_assistant_tokens_mask); plain Jinja
    # does not know the tag, and it was refused.
    template = tmp_path / "masked.jinja"
    template.write_text(
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
    )
    out = recover(pair[0], diff, tmp_path / "out", "--chat-template", template)
    assert apply(out, CONVERSATION[1:3]) == "Capital of France?Paris."
