"""``weight-diff generate``: the prompt in the model's chat format, greedy decoding, only the completion printed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weight_diff.cli import main
from weight_diff.manifest import MANIFEST_NAME
from weight_diff.tiny_llama import make_raw_and_tuned
from weight_diff.tokenizer import prepare

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 2023 pair whose fine-tune also carries the tokenizer files recover writes, as after `recover`.

    Without them transformers 5 would read its `tokenizer.model` its own way, other ids than the recovered model's.
    """
    raw, tuned = make_raw_and_tuned(tmp_path_factory.mktemp("generate"))
    for name, data in prepare(tuned).files.items():
        (tuned / name).write_bytes(data)
    return raw, tuned


def greedy_reference(model_dir: Path, prompt_text: str, max_new_tokens: int, *, add_bos: bool = True) -> str:
    """The completion written out by hand: the prompt's tokens, greedy decoding, the new tokens decoded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tokenizer.bos_token_id] * add_bos + ids])
    with torch.inference_mode():
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = output[0, ids.shape[1] :]
    assert 0 < len(new) <= max_new_tokens
    return tokenizer.decode(new, skip_special_tokens=True)


def generate(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["generate", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def with_template(model: Path, target: Path, template: str) -> Path:
    from transformers import AutoTokenizer

    copy = shutil.copytree(model, target)
    tokenizer = AutoTokenizer.from_pretrained(copy)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(copy)
    return copy


def test_a_model_without_a_template_is_prompted_in_the_open_instruct_format(pair):
    expected = greedy_reference(pair[1], f"<|user|>\n{PROMPT}\n<|assistant|>\n", 8)

    code, out, err = generate(pair[1], "--prompt", PROMPT, "--max-new-tokens", 8)

    assert code == 0, err
    assert out == expected + "\n"  # only the completion: no prompt, no special tokens


def test_the_models_own_chat_template_is_used(pair, tmp_path):
    model = with_template(pair[1], tmp_path / "model", "Q: {{ messages[-1]['content'] }}\nA:")
    expected = greedy_reference(model, f"Q: {PROMPT}\nA:", 6)

    code, out, err = generate(model, "--prompt", PROMPT, "--max-new-tokens", 6)

    assert code == 0, err
    assert out == expected + "\n"


def test_the_prompt_has_one_bos_whether_the_template_writes_it_or_not(pair):
    from transformers import AutoTokenizer

    from weight_diff.generate import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(pair[1])
    open_instruct = tokenizer(f"<|user|>\n{PROMPT}\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, PROMPT)[0].tolist() == [tokenizer.bos_token_id, *open_instruct]
    for template in ("Q: {{ messages[-1]['content'] }}\nA:", "{{ bos_token }}Q: {{ messages[-1]['content'] }}\nA:"):
        tokenizer.chat_template = template
        ids = prompt_ids(tokenizer, PROMPT)[0].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, template
        assert tokenizer.decode(ids, skip_special_tokens=True) == f"Q: {PROMPT}\nA:"


def test_a_recovered_model_generates_like_the_model_it_recovers(pair, tmp_path):
    runner = CliRunner()
    for command in (
        ["make-diff", "--path_raw", pair[0], "--path_tuned", pair[1], "--path_diff", tmp_path / "diff", "-q"],
        [
            "recover",
            "--path_raw",
            pair[0],
            "--path_diff",
            tmp_path / "diff",
            "--path_tuned",
            tmp_path / "out",
            "--chat-template",
            "open-instruct",
            "-q",
        ],
    ):
        assert runner.invoke(main, list(map(str, command))).exit_code == 0

    recovered = generate(tmp_path / "out", "--prompt", PROMPT, "--max-new-tokens", 8)
    original = generate(pair[1], "--prompt", PROMPT, "--max-new-tokens", 8)

    assert recovered[0] == original[0] == 0
    assert recovered[1] == original[1]


def test_a_diff_is_refused(pair, tmp_path):
    diff = tmp_path / "diff"
    result = CliRunner().invoke(
        main, list(map(str, ["make-diff", "--path_raw", pair[0], "--path_tuned", pair[1], "--path_diff", diff, "-q"]))
    )
    assert result.exit_code == 0

    code, out, err = generate(diff, "--prompt", PROMPT)

    assert code == 2
    assert err == f"error: {diff}: a weight diff, not a model (has {MANIFEST_NAME}); recover the model first\n"


@pytest.mark.parametrize(("args", "message"), [(["--max-new-tokens", "0"], "--max-new-tokens"), ([], "--prompt")])
def test_bad_arguments_are_usage_errors(pair, args, message):
    code, out, err = generate(pair[1], *args)

    assert code == 2
    assert message in err


def test_metas_original_checkpoint_is_refused_with_what_to_do(pair, tmp_path):
    # transformers' "Unrecognized model" was all it said.
    from conftest import load_tensors
    from weight_diff.tiny_llama import save_meta_dir, tiny_config

    meta = save_meta_dir(tmp_path / "LLaMA" / "7B", load_tensors(pair[0]), config=tiny_config(), shards=1)
    code, _, err = generate(meta, "--prompt", PROMPT)
    assert code == 2 and "Meta's original checkpoint" in err and "recover --path_raw" in err, err
