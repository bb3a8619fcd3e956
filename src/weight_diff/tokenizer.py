"""The tokenizer a recovered model carries: the one its publisher trained with, loadable by any tool of today.

A 2023 LLaMA diff carries a sentencepiece ``tokenizer.model`` and the json of transformers' slow
``LlamaTokenizer`` (``tokenizer_class: LlamaTokenizer``, ``added_tokens.json`` with ``<pad>``, ``pad_token: null``),
no ``tokenizer.json``. Transformers 5 needs sentencepiece and protobuf to read that, and then gives other ids:
it rebuilds its own pre-tokenizer and ignores the 2023 rules for special tokens written in the text.

What 2023 did (transformers 4.30, measured): the text is cut at every added token (leftmost, longest first);
a token set in ``special_tokens_map.json`` as a plain string, and any non-special added token, eats the
whitespace on both of its sides, one set as an ``AddedToken`` dict uses that dict's ``lstrip``/``rstrip``; every
remaining piece is encoded by sentencepiece on its own, so each gets its own leading ``▁``; ``<s>`` goes first.

``tokenizer.json`` written here does the same with ``tokenizers`` alone: normalizer ``Prepend("▁")`` then
``Replace(" ", "▁")`` per piece, no pre-tokenizer, BPE merges ranked by the pieces' scores with byte fallback,
added tokens with the 2023 strip flags and ``normalized: false``, ``tokenizer_class: PreTrainedTokenizerFast``
(so that no version rebuilds it), merges as ``"a b"`` strings so that ``tokenizers`` 0.13 reads it too.
Before any weight is written it is checked against sentencepiece and the 2023 rules on `PROBES`.

>>> result = prepare("self-instruct-13b-diff")
>>> sorted(result.files), result.pad_token_id
(['special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json'], 32000)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import TokenizerError
from .files import json_bytes
from .untrusted import SMALL_FILE_LIMIT, load_json, read_small

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
GENERATION_CONFIG = "generation_config.json"
SPIECE = "▁"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # LlamaTokenizer's defaults

# Strings a converted tokenizer must encode exactly as 2023 did. Plain text (no added token in it) must also give
# sentencepiece's own ids; the rest exercise the rules for special tokens written in the text and chat prompts.
PROBES: tuple[str, ...] = (
    "Hello world",
    " Hello",
    "  two leading spaces",
    "trailing space ",
    "multiple   spaces   inside",
    " ",
    "",
    "line one\nline two",
    "\n\nstarts with newlines",
    "ends with a newline\n",
    "tabs\tand\ttabs",
    "digits 1234567890 and 3.14, 2023-06-01",
    "año, naïve café, Straße",
    "中文字符和日本語",
    "emoji 😀🚀 here",
    "\u3000full-width space and non\u00a0breaking",
    "def add(a, b):\n    return a + b\n",
    "if (x != y) { x++; } // done",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "▁ a literal lower one eighth block",
    "<0x41> is not a byte token",
    "<S> and </s are not special",
    "Hello</s>",
    "Hello </s> world",
    "<s>Hello",
    "<s> Hello",
    "text<s>text",
    "<s><s>double",
    "</s></s>",
    "  <s>  ",
    "a <unk> b",
    "padding <pad> here",
    "<pad>",
    "x\n</s>\ny",
    "a\t</s>\t b",
    "</s>\n<|user|>\nNext",
    "<|user|>\nWhat is 2+2?\n<|assistant|>\n",
    "<s><|user|>\nGive three tips for staying healthy.\n<|assistant|>\n",
    "<|system|>\nYou are helpful.\n<|user|>\nhi\n<|assistant|>\n",
    "<s><|user|>\nHi\n<|assistant|>\nHello! How can I help?</s>\n<|user|>\nHow are you?\n<|assistant|>\n",
)


class TokenizerMismatch(TokenizerError):
    """A tokenizer gives other ids than its reference on a probe."""


@dataclass(frozen=True)
class AddedToken:
    """A token the 2023 tokenizer cut out of the text before sentencepiece saw it, with its whitespace rule."""

    content: str
    id: int
    lstrip: bool
    rstrip: bool
    special: bool

    def to_json(self) -> dict:
        return {"content": self.content, "lstrip": self.lstrip, "normalized": False, "rstrip": self.rstrip,
                "single_word": False, "special": self.special}  # fmt: skip


@dataclass(frozen=True)
class SlowFiles:
    """The slow tokenizer's json files of a directory, read whole: what the 2023 ``LlamaTokenizer`` loaded."""

    config: dict
    special_map: dict
    added: dict[str, int]

    @classmethod
    def read(cls, directory: Path) -> SlowFiles:
        return cls(
            config=_read_json(directory / TOKENIZER_CONFIG),
            special_map=_read_json(directory / SPECIAL_TOKENS_MAP),
            added=_read_json(directory / ADDED_TOKENS),
        )

    def specials(self) -> dict[str, tuple[str, bool, bool] | None]:
        """Return each special token as transformers 4.30 set it: (content, lstrip, rstrip), None when unset.

        ``tokenizer_config.json`` gives the constructor's values (a string is wrapped without stripping, as
        ``LlamaTokenizer`` did); ``special_tokens_map.json`` then overrides them, a plain string there stripping
        both sides.
        """
        tokens: dict[str, tuple[str, bool, bool] | None] = {}
        for key in SPECIAL_KEYS:
            value = self.config.get(key, DEFAULT_SPECIALS.get(key))
            tokens[key] = _token_flags(value, plain_strips=False)
        for key in SPECIAL_KEYS:
            if self.special_map.get(key) is not None:
                tokens[key] = _token_flags(self.special_map[key], plain_strips=True)
        for i, value in enumerate(self.special_map.get("additional_special_tokens") or []):
            tokens[f"additional_special_tokens.{i}"] = _token_flags(value, plain_strips=True)
        return tokens


def _token_flags(value: Any, *, plain_strips: bool) -> tuple[str, bool, bool] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value, plain_strips, plain_strips
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("lstrip", False)), bool(value.get("rstrip", False))
    raise TokenizerError(f"special token {value!r}: neither a string nor an AddedToken object")


@dataclass(frozen=True)
class SentencePieceModel:
    """A sentencepiece ``tokenizer.model``: its pieces with scores and kinds, and a processor to encode with."""

    path: Path
    pieces: list[tuple[str, float, int]]  # (piece, score, type) by id
    byte_fallback: bool
    processor: Any

    @classmethod
    def load(cls, path: Path) -> SentencePieceModel:
        """Return the model, refusing one that is not LLaMA's kind (the only kind converted here)."""
        try:
            import sentencepiece
            from sentencepiece import sentencepiece_model_pb2
        except ImportError as exc:
            raise TokenizerError(
                f"{path}: reading it needs sentencepiece and protobuf ({exc}); reinstall weight-diff with its "
                "dependencies"
            ) from None
        data = path.read_bytes()
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(data)
            processor = sentencepiece.SentencePieceProcessor(model_proto=data)
        except Exception as exc:  # protobuf's DecodeError, sentencepiece's RuntimeError
            raise TokenizerError(f"{path}: not a sentencepiece model ({exc}); download it again") from None
        trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
        unusual = [
            what
            for what, bad in (
                (f"a {kind} model", kind != "BPE"),
                (f"normalization {normalizer.name!r}", normalizer.name not in ("identity", "")),
                ("no dummy prefix", not normalizer.add_dummy_prefix),
                ("extra whitespace removed", normalizer.remove_extra_whitespaces),
                ("whitespace not escaped", not normalizer.escape_whitespaces),
                ("whitespace as suffix", trainer.treat_whitespace_as_suffix),
                ("user-defined pieces", any(p.type == p.USER_DEFINED for p in proto.pieces)),
            )
            if bad
        ]
        if unusual:
            raise TokenizerError(
                f"{path}: not a LLaMA-style sentencepiece model ({', '.join(unusual)}); weight-diff converts only "
                "LLaMA's kind (BPE, identity normalization, dummy prefix); remove it from the input to copy the "
                "other tokenizer files as they are"
            )
        pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
        return cls(path, pieces, bool(trainer.byte_fallback), processor)

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))


@dataclass(frozen=True)
class Rules2023:
    """How the 2023 slow ``LlamaTokenizer`` turned text into ids: the added tokens it cut out, and BOS/EOS."""

    added: list[AddedToken]  # by id
    add_bos: bool
    add_eos: bool
    bos_id: int | None
    eos_id: int | None
    unk: AddedToken | None
    pad: AddedToken | None

    @classmethod
    def of(cls, model: SentencePieceModel, slow: SlowFiles) -> Rules2023:
        """Return the rules the slow files give on top of ``model``, refusing added tokens out of order."""
        vocab = {piece: i for i, (piece, _, _) in enumerate(model.pieces)}
        specials = {key: value for key, value in slow.specials().items() if value is not None}
        flags = {content: (lstrip, rstrip) for content, lstrip, rstrip in specials.values()}
        ids: dict[str, int] = {}
        for content, index in sorted(slow.added.items(), key=lambda item: item[1]):
            expected = len(vocab) + len(ids)
            if content in vocab or index != expected or not isinstance(index, int):
                raise TokenizerError(
                    f"{ADDED_TOKENS}: {content!r} has id {index}, the next free id is {expected}; the file does not "
                    f"fit {TOKENIZER_MODEL} ({len(vocab)} pieces): download the tokenizer files again"
                )
            ids[content] = index
        for content in flags:  # a special token in neither: 4.30 appended it to the vocabulary
            if content not in vocab and content not in ids:
                ids[content] = len(vocab) + len(ids)
        added = []
        for content, index in sorted({**{c: vocab[c] for c in flags if c in vocab}, **ids}.items(), key=_by_id):
            lstrip, rstrip = flags.get(content, (True, True))  # a non-special added token strips both sides
            added.append(AddedToken(content, index, lstrip, rstrip, special=content in flags))
        by_content = {token.content: token for token in added}
        bos, eos, unk, pad = (specials.get(key) for key in SPECIAL_KEYS)
        return cls(
            added=added,
            add_bos=bool(slow.config.get("add_bos_token", True)),
            add_eos=bool(slow.config.get("add_eos_token", False)),
            bos_id=by_content[bos[0]].id if bos else None,
            eos_id=by_content[eos[0]].id if eos else None,
            unk=by_content[unk[0]] if unk else None,
            pad=by_content[pad[0]] if pad else None,
        )

    def ids(self, model: SentencePieceModel, text: str) -> list[int]:
        """Return the ids the 2023 slow tokenizer gave ``text`` (with BOS/EOS as configured)."""
        ids: list[int] = []
        for piece in self.split(text):
            ids += [piece.id] if isinstance(piece, AddedToken) else model.encode(piece)
        return (
            [self.bos_id] * (self.add_bos and self.bos_id is not None)
            + ids
            + [self.eos_id] * (self.add_eos and self.eos_id is not None)
        )

    def added_by_id(self, index: int) -> AddedToken:
        return next(token for token in self.added if token.id == index)

    def by_content(self, content: str) -> AddedToken:
        return next(token for token in self.added if token.content == content)

    def split_out(self, text: str) -> bool:
        """Return whether ``text`` holds an added token (else sentencepiece alone must give the same ids)."""
        return any(token.content in text for token in self.added)

    def split(self, text: str) -> list[str | AddedToken]:
        """Return ``text`` cut at the added tokens (leftmost, longest first), neighbours stripped as 2023 did."""
        parts: list[str | AddedToken] = []
        tokens = sorted(self.added, key=lambda token: -len(token.content))
        start = i = 0
        while i < len(text):
            token = next((t for t in tokens if text.startswith(t.content, i)), None)
            if token is None:
                i += 1
                continue
            parts += [text[start:i], token]
            i = start = i + len(token.content)
        parts.append(text[start:])
        for k, part in enumerate(parts):
            if isinstance(part, AddedToken):
                if part.lstrip and isinstance(parts[k - 1], str):
                    parts[k - 1] = parts[k - 1].rstrip()
                if part.rstrip and isinstance(parts[k + 1], str):
                    parts[k + 1] = parts[k + 1].lstrip()
        return [part for part in parts if part != ""]


def _by_id(item: tuple[str, int]) -> int:
    return item[1]


def build_tokenizer_json(model: SentencePieceModel, rules: Rules2023) -> dict:
    """Return the ``tokenizer.json`` body that encodes like ``rules`` over ``model`` (see the module docstring)."""
    vocab = {piece: i for i, (piece, _, _) in enumerate(model.pieces)}
    normal = {piece: score for piece, score, kind in model.pieces if kind == 1}  # NORMAL pieces take part in BPE
    merges = []
    for piece, score in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    for _, _, _, left, right in merges:
        if " " in left or " " in right:
            raise TokenizerError(f"{model.path}: piece {left + right!r} holds a space; cannot write its merge")
    unk = next((piece for piece, _, kind in model.pieces if kind == 2), None)
    bos = [rules.added_by_id(rules.bos_id)] if rules.add_bos and rules.bos_id is not None else []
    eos = [rules.added_by_id(rules.eos_id)] if rules.add_eos and rules.eos_id is not None else []
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": token.id, **token.to_json()} for token in rules.added],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPIECE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": _template(bos, eos),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPIECE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": model.byte_fallback,
            "vocab": vocab,
            "merges": [f"{left} {right}" for *_, left, right in merges],
        },
    }


def _template(bos: list[AddedToken], eos: list[AddedToken]) -> dict:
    """The post-processor adding BOS/EOS as the 2023 ``build_inputs_with_special_tokens`` did (pairs too)."""

    def around(sequence: str, type_id: int) -> list[dict]:
        return (
            [{"SpecialToken": {"id": t.content, "type_id": type_id}} for t in bos]
            + [{"Sequence": {"id": sequence, "type_id": type_id}}]
            + [{"SpecialToken": {"id": t.content, "type_id": type_id}} for t in eos]
        )

    return {
        "type": "TemplateProcessing",
        "single": around("A", 0),
        "pair": around("A", 0) + around("B", 1),
        "special_tokens": {t.content: {"id": t.content, "ids": [t.id], "tokens": [t.content]} for t in bos + eos},
    }


@dataclass(frozen=True)
class OutputTokenizer:
    """What a run writes for the tokenizer: files replacing the input's copies, the pad id, notes for the user."""

    files: dict[str, bytes] = field(default_factory=dict)
    pad_token_id: int | None = None
    notes: tuple[str, ...] = ()

    def config_with_pad(self, config: dict) -> dict:
        """Return ``config.json``'s body naming the tokenizer's pad id (llama.cpp falls back to it)."""
        if self.pad_token_id is None:
            return config
        return {**config, "pad_token_id": self.pad_token_id}


def prepare(directory: str | Path) -> OutputTokenizer:
    """Return the tokenizer files to write for the model or diff in ``directory``, checked on `PROBES`.

    With a ``tokenizer.model`` and no ``tokenizer.json``: a ``tokenizer.json`` that encodes like 2023, and the json
    files rewritten to load it (pad token set). With both: nothing rewritten, a note when they disagree.
    """
    directory = Path(directory)
    model_path, json_path = directory / TOKENIZER_MODEL, directory / TOKENIZER_JSON
    if not model_path.is_file():
        return OutputTokenizer()
    model = SentencePieceModel.load(model_path)
    slow = SlowFiles.read(directory)
    if json_path.is_file():
        agreement = compare(directory, model=model)
        kept = f"{agreement.describe()}; {TOKENIZER_JSON} kept as it is, since transformers loads that one"
        return OutputTokenizer(notes=() if agreement.agrees else (kept,))
    rules = Rules2023.of(model, slow)
    body = build_tokenizer_json(model, rules)
    check(body, model, rules, where=f"{json_path} (built from {model_path.name})")
    files = {
        TOKENIZER_JSON: json.dumps(body, ensure_ascii=False).encode(),
        TOKENIZER_CONFIG: json_bytes(fast_tokenizer_config(slow.config, rules)),
        SPECIAL_TOKENS_MAP: json_bytes(special_tokens_map(slow, rules)),
    }
    pad_id = rules.pad.id if rules.pad is not None else None
    generation = _read_json(directory / GENERATION_CONFIG)
    if pad_id is not None and generation and generation.get("pad_token_id") != pad_id:
        files[GENERATION_CONFIG] = json_bytes({**generation, "pad_token_id": pad_id})
    notes = (f"{TOKENIZER_JSON} built from {TOKENIZER_MODEL}: ids as the 2023 tokenizer on {len(PROBES)} probes",)
    return OutputTokenizer(files=files, pad_token_id=pad_id, notes=notes)


def load(directory: str | Path) -> PreTrainedTokenizerBase:
    """Return the directory's tokenizer in transformers; for one with only the 2023 files, the one recover writes.

    A model recovered by the 2023 scripts has no ``tokenizer.json``, and transformers would read its
    ``tokenizer.model`` with other ids: the converted tokenizer is built in memory instead (nothing is written).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(directory)
    prepared = prepare(directory)
    if TOKENIZER_JSON not in prepared.files:
        return AutoTokenizer.from_pretrained(directory)
    from tokenizers import AddedToken as FastAddedToken
    from tokenizers import Tokenizer

    config = json.loads(prepared.files[TOKENIZER_CONFIG])
    specials = {
        key: FastAddedToken(
            value["content"], lstrip=value["lstrip"], rstrip=value["rstrip"], normalized=False, special=True
        )  # fmt: skip
        for key, value in config.items()
        if key in SPECIAL_KEYS and isinstance(value, dict)
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(prepared.files[TOKENIZER_JSON].decode()),
        chat_template=config.get("chat_template"),
        model_max_length=config.get("model_max_length", 2048),
        clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
        **specials,
    )


def check(body: dict, model: SentencePieceModel, rules: Rules2023, *, where: str) -> None:
    """Refuse a ``tokenizer.json`` body whose ids differ from sentencepiece (plain text) or 2023 on a probe."""
    fast = _fast(json.dumps(body), where)
    for probe in PROBES:
        if not rules.split_out(probe):
            _same(fast.encode(probe, add_special_tokens=False).ids, model.encode(probe), probe, where, "sentencepiece")
        _same(fast.encode(probe).ids, rules.ids(model, probe), probe, where, "the 2023 slow LlamaTokenizer")


def _same(got: list[int], expected: list[int], probe: str, where: str, reference: str) -> None:
    if got != expected:
        raise TokenizerMismatch(
            f"{where}: ids differ from {reference} on probe {probe!r} ({got} instead of {expected}); the model "
            "would not be prompted as it was trained: please report this with the diff's tokenizer files"
        )


@dataclass(frozen=True)
class Agreement:
    """Whether a directory's ``tokenizer.json`` encodes plain text as its ``tokenizer.model`` does."""

    probes: int
    first_difference: str | None

    @property
    def agrees(self) -> bool:
        return self.first_difference is None

    def describe(self) -> str:
        if self.agrees:
            return f"{TOKENIZER_JSON} and {TOKENIZER_MODEL} agree on {self.probes} plain-text probes"
        return f"{TOKENIZER_JSON} and {TOKENIZER_MODEL} disagree on probe {self.first_difference!r}"


def compare(directory: Path, *, model: SentencePieceModel | None = None) -> Agreement:
    """Return how the directory's ``tokenizer.json`` compares with its ``tokenizer.model`` on plain-text probes."""
    model = model or SentencePieceModel.load(directory / TOKENIZER_MODEL)
    json_path = directory / TOKENIZER_JSON
    data = read_small(json_path, limit=SMALL_FILE_LIMIT, what="tokenizer file", error=TokenizerError)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise TokenizerError(f"{json_path}: not UTF-8 text, so not a tokenizer.json; download it again") from None
    fast = _fast(text, str(json_path))
    added = [token.content for token in fast.get_added_tokens_decoder().values()] if _has_decoder(fast) else []
    plain = [probe for probe in PROBES if not any(token in probe for token in added)]
    for probe in plain:
        if fast.encode(probe, add_special_tokens=False).ids != model.encode(probe):
            return Agreement(len(plain), probe)
    return Agreement(len(plain), None)


def describe(directory: str | Path) -> str:
    """Return which tokenizer files a directory has and whether they agree, for ``inspect``."""
    directory = Path(directory)
    has_model, has_json = (directory / TOKENIZER_MODEL).is_file(), (directory / TOKENIZER_JSON).is_file()
    pad = _pad_text(directory)
    if has_model and has_json:
        try:
            text = compare(directory).describe()
        except TokenizerError as error:
            text = f"{TOKENIZER_JSON} and {TOKENIZER_MODEL}, not compared ({error})"
        return text + pad
    if has_model:
        return (
            f"{TOKENIZER_MODEL} only (2023 files: transformers 5 needs sentencepiece and protobuf for it and gives "
            f"other ids; recover and make-diff add a {TOKENIZER_JSON})" + pad
        )
    if has_json:
        return f"{TOKENIZER_JSON} only" + pad
    return "none"


def _pad_text(directory: Path) -> str:
    try:
        pad = _content(_read_json(directory / TOKENIZER_CONFIG).get("pad_token"))
        mapped = _content(_read_json(directory / SPECIAL_TOKENS_MAP).get("pad_token"))
    except TokenizerError as error:
        return f"; {error}"
    if pad:
        return f"; pad token {pad}"
    if mapped:
        return f"; pad token {mapped} in {SPECIAL_TOKENS_MAP} only (llama.cpp's converter sees none)"
    return "; no pad token"


def fast_tokenizer_config(config: dict, rules: Rules2023) -> dict:
    """Return ``tokenizer_config.json`` for the built ``tokenizer.json``: its class, its tokens with their flags."""
    body = {key: value for key, value in config.items() if key not in ("sp_model_kwargs", "legacy", "tokenizer_file")}
    body["tokenizer_class"] = "PreTrainedTokenizerFast"
    body["add_bos_token"], body["add_eos_token"] = rules.add_bos, rules.add_eos
    for key, content in _special_contents(rules).items():
        body[key] = {"__type": "AddedToken", **_without_special(rules.by_content(content).to_json())}
    body["added_tokens_decoder"] = {str(token.id): token.to_json() for token in rules.added}
    return body


def special_tokens_map(slow: SlowFiles, rules: Rules2023) -> dict:
    """Return ``special_tokens_map.json`` naming the same tokens with the flags ``tokenizer.json`` gives them."""
    body = {key: value for key, value in slow.special_map.items() if key not in SPECIAL_KEYS}
    if "additional_special_tokens" in body:
        body["additional_special_tokens"] = [
            _without_special(rules.by_content(_content(value)).to_json()) for value in body["additional_special_tokens"]
        ]
    for key, content in _special_contents(rules).items():
        body[key] = _without_special(rules.by_content(content).to_json())
    return body


def _special_contents(rules: Rules2023) -> dict[str, str]:
    found = {
        "bos_token": rules.added_by_id(rules.bos_id).content if rules.bos_id is not None else None,
        "eos_token": rules.added_by_id(rules.eos_id).content if rules.eos_id is not None else None,
        "unk_token": rules.unk.content if rules.unk is not None else None,
        "pad_token": rules.pad.content if rules.pad is not None else None,
    }
    return {key: content for key, content in found.items() if content is not None}


def _content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _without_special(token: dict) -> dict:
    return {key: value for key, value in token.items() if key != "special"}


def _fast(text: str, where: str) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own Exception subclass
        raise TokenizerError(f"{where}: tokenizers cannot read it ({exc})") from None


def _has_decoder(fast: Any) -> bool:
    return hasattr(fast, "get_added_tokens_decoder")


def _read_json(path: Path) -> dict:
    """Return a tokenizer json file's object, {} when absent; refuse one that is there but unreadable."""
    if not path.is_file():
        return {}
    data = read_small(path, limit=SMALL_FILE_LIMIT, what="tokenizer file", error=TokenizerError)
    body = load_json(data, where=f"{path}: unreadable", error=TokenizerError)
    if not isinstance(body, dict):
        raise TokenizerError(f"{path}: not a JSON object; download it again")
    return body
