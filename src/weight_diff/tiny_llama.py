"""Tiny random LLaMA checkpoints, built offline in well under a second.

No real model can be downloaded where the tests, the demo and the benchmark run, so they all work on tiny
LLaMA-shaped models made here: a real sentencepiece tokenizer trained in-process with LLaMA's settings and saved
in the 2023 files (or a `tokenizers` one with a `tokenizer.json`), a random `LlamaForCausalLM`,
and a "fine-tune" of it that adds a `<pad>` token the way the 2023 Alpaca / open-instruct recipes did.

Weights are written by hand in the Hugging Face layouts (safetensors or zip-format `torch.save` `.bin`,
unsharded or sharded with an index), not through `save_pretrained`: transformers 5 no longer writes `.bin`,
and the legacy layouts are exactly what users of a diff tool hold on disk.

`transformers` and `tokenizers` are imported inside the functions that need them: `import transformers`
costs seconds, and the rest of the package must stay quick to import.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerBase

__all__ = [
    "CORPUS",
    "SentencePieceTokenizer",
    "build_tokenizer",
    "make_raw_and_tuned",
    "save_checkpoint",
    "save_meta_dir",
    "save_model_dir",
    "tiny_config",
    "train_sentencepiece",
]

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_N_BYTES = 256
_MIN_PIECES = 2  # trained pieces beyond the specials and the 256 byte tokens

# A small English corpus, so that the tokenizer learns real merges and really tokenizes text.
CORPUS = """\
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
A language model reads text one token at a time and learns to predict the next token from the ones before it.
Fine-tuning changes the weights of a model only a little, so the difference between the tuned weights and the
raw weights is small, and it can be published where the original model itself may not be shared.
Anyone who holds the raw model can add the difference back and recover the tuned model, number for number.
The weights are stored in files that begin with a header, followed by the bytes of every tensor in turn.
Once upon a time there was a little town by the sea. The people of the town went out on their boats every
morning, and in the evening they came home with fish, stories and salt in their hair.
She asked him what he wanted to do with his life, and he said that he would like to write a book one day.
It is better to be slow and right than quick and wrong, but it is best to be quick and right.
Water boils at one hundred degrees at sea level; at the top of a high mountain it boils at a lower heat.
In the spring the trees are green, in the summer the days are long, and in the winter the nights are cold.
Please write a short poem about the moon. Explain why the sky is blue. Give three tips for staying healthy.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many legs does a spider have? A spider has eight legs, while an insect has six.
Translate this sentence into French, then summarize the paragraph below in one line.
The instruction was clear: answer the question, be helpful and honest, and say so when you do not know.
"""


def _train_backend(vocab_size: int) -> Any:
    """Train the `tokenizers.Tokenizer` behind `build_tokenizer`: LLaMA's layout, with exactly `vocab_size`
    entries.

    LLaMA's vocabulary is `<unk>`, `<s>`, `</s>`, the 256 byte tokens `<0x00>`..`<0xFF>` (byte fallback, so no
    text is ever unknown), then the learned pieces; this keeps that order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_pieces = vocab_size - 3 - _N_BYTES
    if n_pieces < _MIN_PIECES:
        raise ValueError(
            f"vocab_size must be at least {3 + _N_BYTES + _MIN_PIECES} (3 special tokens, "
            f"{_N_BYTES} byte tokens and some learned pieces), got {vocab_size}"
        )
    # The trainer counts special tokens and the initial alphabet inside its vocab_size: leave room for merges.
    trainer = trainers.BpeTrainer(
        vocab_size=3 + n_pieces,
        special_tokens=[UNK, BOS, EOS],
        limit_alphabet=max(1, min(40, n_pieces // 2)),
        show_progress=False,
    )
    trainee = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainee.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(trainee.to_str())["model"]
    by_id = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    pieces = [p for p, _ in by_id if p not in (UNK, BOS, EOS)]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    # The alphabet alone overflowing the budget cannot happen with limit_alphabet, but be sure.
    if len(pieces) > n_pieces:
        raise ValueError(f"vocab_size {vocab_size} is too small for the corpus alphabet")
    # A vocab larger than the corpus can fill gets unreachable filler pieces, like unused slots in real ones.
    pieces += [f"<unused_{i}>" for i in range(n_pieces - len(pieces))]

    vocab = {UNK: UNK_ID, BOS: BOS_ID, EOS: EOS_ID}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(_N_BYTES)})
    vocab.update({p: 3 + _N_BYTES + i for i, p in enumerate(pieces)})
    assert len(vocab) == vocab_size

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.normalizer = None
    # What transformers' own (non-legacy) LLaMA tokenizer uses: one "▁" before the text, spaces become "▁".
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerBase:
    """A LLaMA-style tokenizer (BPE with byte fallback, Metaspace) trained in-process on `CORPUS`.

    No LLaMA tokenizer ships in any pip package and nothing can be downloaded, so tests train one. It has
    `<unk>`=0, `<s>`=1, `</s>`=2, adds `<s>` in front like LLaMA, `len(tokenizer) == vocab_size`, and survives
    `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    from transformers import LlamaTokenizerFast  # in transformers 5 an alias of LlamaTokenizer

    return LlamaTokenizerFast(
        tokenizer_object=_train_backend(vocab_size),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


@functools.lru_cache(maxsize=4)
def train_sentencepiece(vocab_size: int = 320) -> bytes:
    """Return a sentencepiece ``tokenizer.model`` trained on `CORPUS` with LLaMA's settings, `vocab_size` pieces.

    LLaMA's trainer spec: BPE, byte fallback, digits split, identity normalization, a dummy prefix, extra
    whitespace kept, `<unk>`/`<s>`/`</s>` = 0/1/2 and no pad piece. The character coverage is lowered so that
    the rarer characters of a small corpus go to byte fallback and leave room for merges. Cached: a few ms once.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.99,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _added_token_2023(content: str) -> dict:
    """A special token as transformers 4.28-4.30 saved a slow `LlamaTokenizer`'s."""
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


@dataclass(frozen=True)
class SentencePieceTokenizer:
    """The tokenizer files of a 2023 LLaMA checkpoint: `tokenizer.model` and the slow `LlamaTokenizer`'s json.

    With `pad`, the fine-tune's: `<pad>` added after the sentencepiece vocabulary (`added_tokens.json`), named
    in `special_tokens_map.json` while `tokenizer_config.json` says `"pad_token": null`, as in the published
    open-instruct, Alpaca and Tulu v1 diffs. No `tokenizer.json`, as in them.
    """

    vocab_size: int = 320
    pad: bool = False
    model_max_length: int = 2048

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the files into `directory` (the name of transformers' method, so either kind can be saved)."""
        directory = Path(directory)
        (directory / "tokenizer.model").write_bytes(train_sentencepiece(self.vocab_size))
        config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": {"__type": "AddedToken", **_added_token_2023(BOS)},
            "clean_up_tokenization_spaces": False,
            "eos_token": {"__type": "AddedToken", **_added_token_2023(EOS)},
            "model_max_length": self.model_max_length,
            "pad_token": None,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": {"__type": "AddedToken", **_added_token_2023(UNK)},
        }
        special = {"bos_token": _added_token_2023(BOS), "eos_token": _added_token_2023(EOS)}
        if self.pad:
            special["pad_token"] = PAD
            (directory / "added_tokens.json").write_text(json.dumps({PAD: self.vocab_size}) + "\n")
        special["unk_token"] = _added_token_2023(UNK)
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def tiny_config(*, vocab_size: int = 320, **overrides: Any) -> LlamaConfig:
    """A 2-layer, 64-wide `LlamaConfig` (LLaMA's structure: untied embeddings, RMSNorm, SwiGLU, rotary).

    Special-token ids match `build_tokenizer`; `pad_token_id` is None like raw LLaMA unless overridden.
    """
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


_WEIGHT_FILE_RE = re.compile(
    r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json)$"
)


def _standalone(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """`t` as a contiguous CPU tensor owning its whole storage, copied only when needed.

    `torch.save` writes whole storages (a view would drag its base along and tensors would come back shared)
    and safetensors refuses shared or non-contiguous tensors.
    """
    t = t.detach().cpu()
    ptr = t.untyped_storage().data_ptr()
    owns_storage = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    if not t.is_contiguous() or not owns_storage or ptr in seen:
        t = t.contiguous().clone()
        ptr = t.untyped_storage().data_ptr()
    seen.add(ptr)
    return t


def _plan_shards(sizes: list[int], shards: int) -> list[int]:
    """Shard index of each tensor: state-dict order, roughly equal bytes, no empty shard."""
    total = sum(sizes)
    plan, k, cum = [], 0, 0
    for i, size in enumerate(sizes):
        plan.append(k)
        cum += size
        shards_left, tensors_left = shards - k - 1, len(sizes) - i - 1
        if shards_left > 0 and (cum >= total * (k + 1) / shards or tensors_left == shards_left):
            k += 1
    return plan


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], directory: str | Path, *, fmt: str = "safetensors", shards: int = 1
) -> list[Path]:
    """Write `state_dict` in a Hugging Face weights layout without transformers, and return the files written.

    `fmt="safetensors"`: `model.safetensors`, or `model-0000i-of-0000n.safetensors` and
    `model.safetensors.index.json`; `fmt="bin"`: the same with `pytorch_model` and zip-format `torch.save`
    (the 2023 layout, which transformers 5 no longer writes). Weight files of any layout already in
    `directory` are removed first, as `save_pretrained` does, so that a loader never sees two checkpoints.
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    names = list(state_dict)
    if not 1 <= shards <= max(1, len(names)):
        raise ValueError(f"shards must be between 1 and the number of tensors ({len(names)}), got {shards}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.is_file() and _WEIGHT_FILE_RE.match(old.name):
            old.unlink()

    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    sizes = [state_dict[n].numel() * state_dict[n].element_size() for n in names]
    plan = _plan_shards(sizes, shards)
    if shards == 1:
        filenames = [f"{stem}.{ext}"]
    else:
        filenames = [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]

    written = []
    seen: set[int] = set()
    for k, filename in enumerate(filenames):
        part = {n: _standalone(state_dict[n], seen) for n, s in zip(names, plan, strict=True) if s == k}
        path = directory / filename
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)
        written.append(path)
        del part
    if shards > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {n: filenames[s] for n, s in zip(names, plan, strict=True)},
        }
        index_path = directory / f"{stem}.{ext}.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_path)
    return written


def _set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    """Record the weights' dtype in the config: `dtype` in transformers 5, `torch_dtype` in 4.x."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def _inv_freq_buffers(config: Any) -> dict[int, torch.Tensor]:
    """The per-layer `rotary_emb.inv_freq` buffers that 2023 LLaMA conversions stored next to the weights."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return {i: inv_freq.clone() for i in range(config.num_hidden_layers)}


def save_model_dir(
    directory: str | Path,
    *,
    state_dict: dict[str, torch.Tensor],
    config: LlamaConfig,
    tokenizer: PreTrainedTokenizerBase | SentencePieceTokenizer,
    fmt: str = "safetensors",
    shards: int = 1,
    dtype: torch.dtype | None = None,
    inv_freq: bool = False,
) -> Path:
    """Write a complete model directory (weights, `config.json`, `generation_config.json`, tokenizer files).

    Weights are cast to `dtype` when given and written by `save_checkpoint`; the config records their dtype.
    `inv_freq=True` adds float32 `model.layers.{i}.self_attn.rotary_emb.inv_freq` buffers, as the 2023 `.bin`
    conversions of raw LLaMA did: a tool must recognise them as non-weights.
    """
    from transformers import GenerationConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {n: t.to(dtype) if dtype and t.is_floating_point() else t for n, t in state_dict.items()}
    weights_dtype = dtype or next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)
    if inv_freq:
        buffers = _inv_freq_buffers(config)
        with_buffers: dict[str, torch.Tensor] = {}
        for name, t in weights.items():
            with_buffers[name] = t
            m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", name)
            if m and int(m.group(1)) in buffers:  # where the module registration order put it
                layer = int(m.group(1))
                with_buffers[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = buffers.pop(layer)
        for i, buf in buffers.items():
            with_buffers[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = buf
        weights = with_buffers
    save_checkpoint(weights, directory, fmt=fmt, shards=shards)

    config = copy.deepcopy(config)
    _set_config_dtype(config, weights_dtype)
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _perturb_(t: torch.Tensor, generator: torch.Generator, rel_std: float = 1e-3) -> torch.Tensor:
    """Add, in place, seeded Gaussian noise of std `rel_std` x the tensor's RMS: a stand-in for training."""
    rms = (torch.linalg.vector_norm(t).item() / max(1, t.numel()) ** 0.5) or 1.0
    # normal_ into a buffer is several times faster than torch.randn(shape) on CPU.
    return t.add_(torch.empty_like(t).normal_(0.0, rel_std * rms, generator=generator))


def _random_llama_weights(config: LlamaConfig, *, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of a freshly initialised `LlamaForCausalLM(config)`, seeded, in `dtype`.

    The model is built on the meta device for its names and shapes, and the weights are drawn here with the
    distribution of transformers' `_init_weights` (normal(0, initializer_range) for linear and embedding
    weights, ones for RMSNorm, zeros for biases and the padding row): instantiating the model for real
    initialises every weight twice and takes 15 s at 13B width, this takes a few.
    """
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    weights = {}
    for name, meta in model.state_dict().items():
        if "rotary_emb" in name:  # a buffer, should a version persist it
            continue
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        t = torch.empty(meta.shape, dtype=torch.float32)
        if leaf == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            t.normal_(0.0, std, generator=generator)
            if getattr(module, "padding_idx", None) is not None:
                t[module.padding_idx] = 0
        elif leaf == "weight":
            t.fill_(1.0)
        else:
            t.zero_()
        weights[name] = t.to(dtype)
    return weights


def make_raw_and_tuned(
    workdir: str | Path,
    *,
    seed: int = 0,
    raw_fmt: str = "safetensors",
    raw_shards: int = 1,
    raw_dtype: torch.dtype = torch.float16,
    tuned_fmt: str = "safetensors",
    tuned_shards: int = 1,
    tuned_dtype: torch.dtype = torch.float32,
    add_pad: bool = True,
    inv_freq: bool = False,
    config_overrides: dict[str, Any] | None = None,
    tokenizer: str = "sentencepiece",
) -> tuple[Path, Path]:
    """Build `workdir/raw` (a random tiny LLaMA) and `workdir/tuned` (a "fine-tune" of it); return both paths.

    The tuned model starts from the raw weights as stored (`raw_dtype` upcast to float32). With `add_pad` it
    gains a `<pad>` token whose `embed_tokens` and `lm_head` rows are the float32 mean of the existing rows
    (Alpaca's `smart_tokenizer_and_embedding_resize`); then every weight gets a small seeded perturbation.
    `inv_freq` adds the 2023 rotary buffers to the raw checkpoint only, where real raw LLaMA `.bin` files hold
    them. `tokenizer="sentencepiece"` gives both the 2023 files (`SentencePieceTokenizer`: `tokenizer.model`, the
    fine-tune's pad named in `special_tokens_map.json` only, `pad_token_id` 0 in its config as in the published
    diffs); `tokenizer="json"` gives `build_tokenizer`'s `tokenizer.json` instead.
    """
    if tokenizer not in ("sentencepiece", "json"):
        raise ValueError(f"tokenizer must be 'sentencepiece' or 'json', got {tokenizer!r}")
    workdir = Path(workdir)
    overrides = dict(config_overrides or {})
    config = tiny_config(**overrides)
    if tokenizer == "json":
        raw_tokenizer: Any = build_tokenizer(config.vocab_size)
    else:
        raw_tokenizer = SentencePieceTokenizer(config.vocab_size)

    raw = _random_llama_weights(config, seed=seed, dtype=raw_dtype)
    raw_dir = save_model_dir(
        workdir / "raw",
        state_dict=raw,
        config=config,
        tokenizer=raw_tokenizer,
        fmt=raw_fmt,
        shards=raw_shards,
        dtype=raw_dtype,
        inv_freq=inv_freq,
    )

    tuned = {n: t.to(torch.float32, copy=True) for n, t in raw.items()}  # never aliases raw
    tuned_config = copy.deepcopy(config)
    tuned_tokenizer = copy.deepcopy(raw_tokenizer)
    if add_pad:
        n_new = 1
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            old = tuned[name]
            tuned[name] = torch.cat([old, old.mean(dim=0, keepdim=True).expand(n_new, -1)], dim=0)
        tuned_config.vocab_size = config.vocab_size + n_new
        if tokenizer == "json":
            tuned_tokenizer.add_special_tokens({"pad_token": PAD})
            tuned_config.pad_token_id = tuned_tokenizer.pad_token_id
        else:
            tuned_tokenizer = SentencePieceTokenizer(config.vocab_size, pad=True)
            tuned_config.pad_token_id = UNK_ID  # what the 2023 diffs' config.json says (LLaMA's, never updated)
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    tuned = {n: _perturb_(t, generator) for n, t in tuned.items()}
    tuned_dir = save_model_dir(
        workdir / "tuned",
        state_dict=tuned,
        config=tuned_config,
        tokenizer=tuned_tokenizer,
        fmt=tuned_fmt,
        shards=tuned_shards,
        dtype=tuned_dtype,
    )
    return raw_dir, tuned_dir


# Hugging Face name (after "model.layers.N.") -> Meta's name and the dimension Meta's model-parallel shards split.
_META_LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_META_TOP = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}


def meta_pieces(name: str, tensor: torch.Tensor, *, n_heads: int, shards: int) -> tuple[str, list[torch.Tensor]]:
    """Return Meta's name for a Hugging Face LLaMA tensor and its piece in each of Meta's model-parallel shards.

    The inverse of the 2023 conversion: q and k rows go back to Meta's rotary order (within a head, Meta row
    ``2 * b + a`` is Hugging Face row ``a * d/2 + b``), then tensors are cut along the dimension Meta's shards
    split (norms are whole in every shard).
    """
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match:
        meta_leaf, dim = _META_LAYER[match.group(2)]
        meta_name = f"layers.{match.group(1)}.{meta_leaf}"
    else:
        meta_name, dim = _META_TOP[name]
    if meta_name.endswith(("wq.weight", "wk.weight")):
        rows, width = tensor.shape
        tensor = tensor.reshape(n_heads, 2, rows // n_heads // 2, width).transpose(1, 2).reshape(rows, width)
    if dim is None:
        return meta_name, [tensor.clone() for _ in range(shards)]
    return meta_name, [piece.clone() for piece in tensor.chunk(shards, dim=dim)]


def save_meta_dir(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    config: Any,
    shards: int,
    norm_eps: float | None = None,
    checklist: bool = True,
) -> Path:
    """Write ``tensors`` (a Hugging Face LLaMA's, read on demand) in the layout of Meta's original download.

    ``directory`` gets ``params.json``, ``consolidated.NN.pth`` (one ``torch.save`` zip per shard, each layer's
    tensors views of one storage, as in Meta's files, plus ``rope.freqs``) and, with ``checklist``, the
    ``checklist.chk`` of md5 sums Meta ships. One shard is held in memory at a time.
    """
    import hashlib

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_heads = config.num_attention_heads
    head_dim = config.hidden_size // n_heads
    params = {
        "dim": config.hidden_size,
        "multiple_of": 256,
        "n_heads": n_heads,
        "n_layers": config.num_hidden_layers,
        "norm_eps": config.rms_norm_eps if norm_eps is None else norm_eps,
        "vocab_size": -1,
    }
    (directory / "params.json").write_text(json.dumps(params))
    rope = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    groups: dict[str, list[str]] = {}  # a layer's tensors share one storage in Meta's files
    for name in tensors:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"layers.{layer.group(1)}" if layer else name, []).append(name)
    for shard in range(shards):
        state: dict[str, torch.Tensor] = {}
        for names in groups.values():
            members = {}
            for name in names:
                meta_name, pieces = meta_pieces(name, tensors[name], n_heads=n_heads, shards=shards)
                members[meta_name] = pieces[shard]
                del pieces
            flat = torch.cat([t.reshape(-1) for t in members.values()])
            offset = 0
            for meta_name, piece in members.items():
                state[meta_name] = flat[offset : offset + piece.numel()].view(piece.shape)
                offset += piece.numel()
            del members
        state["rope.freqs"] = rope.clone()
        torch.save(state, directory / f"consolidated.{shard:02d}.pth")
        del state
    if checklist:
        lines = []
        for path in sorted(directory.iterdir()):
            if path.name.startswith("consolidated.") or path.name == "params.json":
                digest = hashlib.md5()
                with path.open("rb") as file:
                    while chunk := file.read(2**24):
                        digest.update(chunk)
                lines.append(f"{digest.hexdigest()}  {path.name}\n")
        (directory / "checklist.chk").write_text("".join(lines))
    return directory
