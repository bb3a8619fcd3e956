"""A recovered 2023 diff tokenizes as the 2023 slow ``LlamaTokenizer`` did, and loads in a fresh install.

The references here are sentencepiece itself (plain text) and `slow_2023_ids`, the transformers 4.30 algorithm
written out again in this file; the module under test is only asked to build and check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from weight_diff import tokenizer
from weight_diff.cli import main
from weight_diff.inspect_dir import inspect_path
from weight_diff.jobs import recover
from weight_diff.tokenizer import PROBES, TokenizerMismatch

PAD_ID = 320  # the tiny vocabulary has 320 pieces; the fine-tune added <pad> after them, as 32000 after LLaMA's
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
CHAT_TEXT = (  # open-instruct's training format of CHAT, awaiting the reply
    "<|system|>\nYou are terse.\n<|user|>\nCapital of France?\n<|assistant|>\nParis.</s>\n"
    "<|user|>\nAnd of Italy?\n<|assistant|>\n"
)


def sentencepiece(directory: Path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def slow_2023_ids(directory: Path, text: str) -> list[int]:
    """The ids transformers 4.30's slow LlamaTokenizer gave `text` from a 2023 directory's files.

    As its `_from_pretrained` and `tokenize` did: special tokens from tokenizer_config.json (a string wrapped as an
    AddedToken that strips nothing), then special_tokens_map.json over them (a dict keeps its flags, a plain string
    strips both sides); added_tokens.json after the sentencepiece pieces; the text cut at every one of them,
    neighbours stripped, each remaining chunk encoded by sentencepiece alone; <s> first.
    """
    sp = sentencepiece(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    special_map = json.loads((directory / "special_tokens_map.json").read_text())
    added = json.loads((directory / "added_tokens.json").read_text())
    extended: dict[str, object] = {}  # content -> (lstrip, rstrip), or "str" for a plain string
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = special_map.get(key, config.get(key))
        if isinstance(value, dict):
            extended[value["content"]] = (value.get("lstrip", False), value.get("rstrip", False))
        elif isinstance(value, str):
            extended[value] = "str" if key in special_map else (False, False)
    no_split = set(extended) | set(added)
    ids_of = {**{sp.id_to_piece(i): i for i in range(sp.get_piece_size())}, **added}

    chunks, rest = [], text
    while rest:  # the trie's split: the earliest match, the longest at that place
        hits = [(rest.find(t), -len(t), t) for t in no_split if t in rest]
        if not hits:
            break
        at, _, token = min(hits)
        chunks += [rest[:at], token]
        rest = rest[at + len(token) :]
    chunks.append(rest)
    for i, chunk in enumerate(chunks):
        if chunk in no_split and i % 2 == 1:
            flags = extended.get(chunk, "str")
            lstrip, rstrip = (True, True) if flags == "str" else flags
            if rstrip and i + 1 < len(chunks):
                chunks[i + 1] = chunks[i + 1].lstrip()
            if lstrip and i > 0:
                chunks[i - 1] = chunks[i - 1].rstrip()
    ids = [1]
    for i, chunk in enumerate(chunks):
        if chunk:
            ids += [ids_of[chunk]] if i % 2 == 1 else sp.encode(chunk)
    return ids


@pytest.fixture(scope="module")
def recovered(pair, legacy_diff, tmp_path_factory) -> Path:
    """The default pair's 2023-style diff (tokenizer.model and slow json only), recovered by weight-diff."""
    out = tmp_path_factory.mktemp("tok") / "out"
    recover(pair[0], legacy_diff, out)
    return out


@pytest.fixture(scope="module")
def string_specials_diff(legacy_diff, tmp_path_factory) -> Path:
    """The same diff with every special token a plain string in special_tokens_map.json: then all of them strip."""
    diff = shutil.copytree(legacy_diff, tmp_path_factory.mktemp("strings") / "diff")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (diff / "special_tokens_map.json").write_text(json.dumps(special))
    return diff


def test_the_tiny_fine_tune_carries_a_2023_sentencepiece_tokenizer(pair, legacy_diff):
    from sentencepiece import sentencepiece_model_pb2

    for directory in (pair[1], legacy_diff):
        names = {path.name for path in directory.iterdir()}
        assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"} <= names
        assert "tokenizer.json" not in names
    model = sentencepiece_model_pb2.ModelProto.FromString((pair[1] / "tokenizer.model").read_bytes())
    spec = model.trainer_spec
    assert (spec.model_type, spec.byte_fallback, spec.split_digits) == (spec.BPE, True, True)
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id, len(model.pieces)) == (0, 1, 2, -1, PAD_ID)
    assert not model.normalizer_spec.remove_extra_whitespaces and model.normalizer_spec.add_dummy_prefix
    config = json.loads((pair[1] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["pad_token"] is None
    assert config["bos_token"]["__type"] == "AddedToken"
    assert json.loads((pair[1] / "special_tokens_map.json").read_text())["pad_token"] == "<pad>"
    assert json.loads((pair[1] / "added_tokens.json").read_text()) == {"<pad>": PAD_ID}


def test_the_probes_cover_every_kind_of_text():
    assert len(PROBES) >= 30
    kinds = {
        "leading space": lambda p: p.startswith(" "),
        "repeated spaces": lambda p: "   " in p,
        "newline": lambda p: "\n" in p,
        "digits": lambda p: any(c.isdigit() for c in p),
        "non-ascii": lambda p: any(ord(c) > 0x2000 for c in p),
        "emoji": lambda p: any(ord(c) > 0x1F000 for c in p),
        "code": lambda p: "return" in p,
        "special tokens": lambda p: all(any(t in q for q in PROBES) for t in ("<s>", "</s>", "<unk>", "<pad>")),
        "multi-turn junction": lambda p: "</s>\n<|user|>" in p,
    }
    for kind, test in kinds.items():
        assert any(test(p) for p in PROBES), kind


@pytest.mark.parametrize("which", ["legacy", "strings"])
def test_recovered_ids_are_sentencepieces_on_text_and_2023s_around_special_tokens(
    pair, legacy_diff, string_specials_diff, recovered, tmp_path, which
):
    from tokenizers import Tokenizer

    diff, out = legacy_diff, recovered
    if which == "strings":
        diff, out = string_specials_diff, tmp_path / "out"
        recover(pair[0], diff, out)
    fast, sp = Tokenizer.from_file(str(out / "tokenizer.json")), sentencepiece(diff)

    for probe in PROBES:
        if not any(token in probe for token in ("<s>", "</s>", "<unk>", "<pad>")):
            assert fast.encode(probe, add_special_tokens=False).ids == sp.encode(probe), probe
        assert fast.encode(probe).ids == slow_2023_ids(diff, probe), probe
    # The 2023 behaviours transformers 5 loses, spelled out: a "▁" even before a leading space, and after </s>.
    space = sp.piece_to_id("▁")
    assert fast.encode(" Hello").ids[:3] == [1, space, space]
    junction = fast.encode("</s>\n<|user|>").ids
    assert junction[:4] == ([1, 2, space, sp.piece_to_id("<0x0A>")] if which == "legacy" else [1, 2, space, 63])


def test_the_two_2023_strip_rules_give_different_ids(legacy_diff, string_specials_diff):
    """So the parametrized test above really checks that the rules are read from the files."""
    for text in ("Hello </s> world", "</s>\n<|user|>\nNext"):
        assert text in PROBES
        assert slow_2023_ids(legacy_diff, text) != slow_2023_ids(string_specials_diff, text)


FRESH = """
import json, sys

for hidden in ("sentencepiece", "google.protobuf"):  # import fails, importlib.util.find_spec says not installed
    sys.modules[hidden] = None
from tokenizers import Tokenizer
from transformers import AutoTokenizer

directory, probes = sys.argv[1], json.loads(sys.argv[2])
loaded = AutoTokenizer.from_pretrained(directory)
raw = Tokenizer.from_file(directory + "/tokenizer.json")
assert sys.modules["sentencepiece"] is None and sys.modules["google.protobuf"] is None
print(json.dumps({
    "auto": [loaded(p)["input_ids"] for p in probes],
    "tokenizers": [raw.encode(p).ids for p in probes],
    "pad": [loaded.pad_token, loaded.pad_token_id],
}))
"""


def fresh_install(directory: Path) -> subprocess.CompletedProcess:
    """Load `directory` in a child where importing sentencepiece or protobuf fails, as in a fresh install."""
    return subprocess.run(
        [sys.executable, "-c", FRESH, str(directory), json.dumps(PROBES)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        check=False,
    )


def test_the_recovered_tokenizer_loads_without_sentencepiece_or_protobuf(legacy_diff, recovered):
    loaded = fresh_install(recovered)

    assert loaded.returncode == 0, loaded.stderr
    body = json.loads(loaded.stdout)
    expected = [slow_2023_ids(legacy_diff, probe) for probe in PROBES]
    assert body["auto"] == expected
    assert body["tokenizers"] == expected
    assert body["pad"] == ["<pad>", PAD_ID]
    assert fresh_install(legacy_diff).returncode != 0  # the 2023 files alone do not load there


def test_the_pad_token_is_the_diffs_added_pad_wherever_tools_look(recovered):
    config = json.loads((recovered / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["pad_token"]["content"] == "<pad>"
    assert config["added_tokens_decoder"][str(PAD_ID)]["content"] == "<pad>"
    assert json.loads((recovered / "special_tokens_map.json").read_text())["pad_token"]["content"] == "<pad>"
    assert json.loads((recovered / "config.json").read_text())["pad_token_id"] == PAD_ID  # the diff said 0
    assert json.loads((recovered / "generation_config.json").read_text())["pad_token_id"] == PAD_ID
    # llama.cpp's converter: the pad named in tokenizer_config.json, its id from tokenizer.json's added tokens
    added = json.loads((recovered / "tokenizer.json").read_text())["added_tokens"]
    assert {token["content"]: token["id"] for token in added}[config["pad_token"]["content"]] == PAD_ID
    assert (recovered / "tokenizer.model").read_bytes()  # kept for sentencepiece and llama.cpp users


def test_a_chat_prompt_has_exactly_one_bos_and_the_training_ids(pair, legacy_diff, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["recover", "--path_raw", str(pair[0]), "--path_diff", str(legacy_diff), "--path_tuned", str(out),
         "--chat-template", "open-instruct", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tokenizer: tokenizer.json built from tokenizer.model" in result.output

    loaded = AutoTokenizer.from_pretrained(out)
    ids = loaded.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else list(ids)
    assert ids.count(1) == 1 and ids[0] == 1
    assert ids == slow_2023_ids(legacy_diff, CHAT_TEXT)  # open-instruct's training: tokenizer(text), one BOS


def test_make_diff_of_a_2023_fine_tune_writes_the_tokenizer_json_and_recover_keeps_it(pair, made_diff, tmp_path):
    out = tmp_path / "out"
    report = recover(pair[0], made_diff, out)

    assert (made_diff / "tokenizer.json").is_file() and (made_diff / "tokenizer.model").is_file()
    assert (out / "tokenizer.json").read_bytes() == (made_diff / "tokenizer.json").read_bytes()
    assert report.notes == ()  # they agree: nothing to say


def test_a_diff_whose_tokenizer_json_disagrees_keeps_it_and_says_so(pair, made_diff, tmp_path):
    diff = shutil.copytree(made_diff, tmp_path / "diff")
    body = json.loads((diff / "tokenizer.json").read_text())
    body["model"]["merges"].remove("▁ t")  # now " the" no longer merges as sentencepiece does
    (diff / "tokenizer.json").write_text(json.dumps(body, ensure_ascii=False))
    (diff / "SHA256SUMS").unlink()  # as published so: no checksum of ours says it was edited
    manifest = json.loads((diff / "weight-diff-manifest.json").read_text())
    del manifest["files"]
    (diff / "weight-diff-manifest.json").write_text(json.dumps(manifest))

    result = CliRunner().invoke(
        main, ["recover", "--path_raw", str(pair[0]), "--path_diff", str(diff), "--path_tuned", str(tmp_path / "o")]
    )

    assert result.exit_code == 0, result.output
    assert "tokenizer: tokenizer.json and tokenizer.model disagree on probe '" in result.output
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (diff / "tokenizer.json").read_bytes()
    assert "disagree on probe" in inspect_path(tmp_path / "o").tokenizer


def test_a_diff_with_only_a_tokenizer_json_keeps_it(build_pair, tmp_path):
    from weight_diff.jobs import make_diff

    raw, tuned = build_pair(tokenizer="json")
    make_diff(raw, tuned, tmp_path / "diff")
    report = recover(raw, tmp_path / "diff", tmp_path / "out")

    assert not (tmp_path / "out" / "tokenizer.model").exists()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tuned / "tokenizer.json").read_bytes()
    assert report.notes == ()
    assert inspect_path(tmp_path / "out").tokenizer == "tokenizer.json only; pad token <pad>"


def test_a_built_tokenizer_that_would_tokenize_otherwise_stops_recover_before_any_write(
    pair, legacy_diff, tmp_path, monkeypatch
):
    build = tokenizer.build_tokenizer_json

    def without_a_merge(*args):
        body = build(*args)
        body["model"]["merges"].remove("▁ t")
        return body

    monkeypatch.setattr(tokenizer, "build_tokenizer_json", without_a_merge)
    result = CliRunner().invoke(
        main,
        ["recover", "--path_raw", str(pair[0]), "--path_diff", str(legacy_diff), "--path_tuned", str(tmp_path / "o")],
    )

    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "ids differ from sentencepiece on probe '" in result.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    with pytest.raises(TokenizerMismatch):
        tokenizer.prepare(legacy_diff)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "tokenizer.model").write_bytes(b"not a model"), "tokenizer.model: not a sentencepiece model"),
        (lambda d: (d / "added_tokens.json").write_text('{"<pad>": 400}'), "'<pad>' has id 400, the next free id"),
        (lambda d: (d / "special_tokens_map.json").write_text("{"), "special_tokens_map.json: unreadable"),
        (lambda d: (d / "added_tokens.json").write_text('{"<pad>": NaN}'), "added_tokens.json: unreadable"),
        (lambda d: (d / "added_tokens.json").write_text("[" * 100000), "added_tokens.json: unreadable"),
        (lambda d: (d / "tokenizer.model").write_bytes(_unigram_model()), "not a LLaMA-style sentencepiece model"),
    ],
    ids=["model", "added", "map", "nan", "nested", "unigram"],
)
def test_bad_tokenizer_files_are_refused_before_any_write(pair, legacy_diff, tmp_path, damage, message):
    diff = shutil.copytree(legacy_diff, tmp_path / "diff")
    damage(diff)

    result = CliRunner().invoke(
        main, ["recover", "--path_raw", str(pair[0]), "--path_diff", str(diff), "--path_tuned", str(tmp_path / "o")]
    )

    assert result.exit_code == 1, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _unigram_model() -> bytes:
    import io

    import sentencepiece

    from weight_diff.tiny_llama import CORPUS

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, vocab_size=120, model_type="unigram",
        minloglevel=2, num_threads=1,
    )  # fmt: skip
    return model.getvalue()


def test_inspect_says_which_tokenizer_files_there_are_and_whether_they_agree(legacy_diff, recovered):
    assert inspect_path(legacy_diff).tokenizer.startswith("tokenizer.model only (2023 files")
    assert inspect_path(legacy_diff).tokenizer.endswith("pad token <pad> in special_tokens_map.json only "
                                                        "(llama.cpp's converter sees none)")  # fmt: skip
    plain = sum(not any(t in p for t in ("<s>", "</s>", "<unk>", "<pad>")) for p in PROBES)
    assert inspect_path(recovered).tokenizer == (
        f"tokenizer.json and tokenizer.model agree on {plain} plain-text probes; pad token <pad>"
    )
    result = CliRunner().invoke(main, ["inspect", str(recovered)])
    assert f"tokenizer:     tokenizer.json and tokenizer.model agree on {plain}" in result.output


def test_generate_reads_a_2023_directory_with_the_2023_ids_writing_nothing(pair):
    before = sorted(path.name for path in pair[1].iterdir())

    loaded = tokenizer.load(pair[1])

    for probe in PROBES:
        assert loaded(probe)["input_ids"] == slow_2023_ids(pair[1], probe), probe
    assert (loaded.pad_token, loaded.pad_token_id) == ("<pad>", PAD_ID)
    assert sorted(path.name for path in pair[1].iterdir()) == before
