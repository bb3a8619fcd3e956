"""Meta's original LLaMA download read as the Hugging Face model the 2023 conversion made of it, bit for bit.

Meta's layout: ``PARENT/tokenizer.model`` and one directory per size (``7B/``, ``13B/``, ...) holding
``params.json``, ``checklist.chk`` (md5 of each file) and ``consolidated.NN.pth``: one zip pickle of float16
tensors per model-parallel shard. transformers v4.28 to v4.32's ``convert_llama_weights_to_hf.py`` made the
Hugging Face checkpoints the 2023 diffs were made against. Its rules, applied here while streaming:

- ``wq``, ``wk``, ``wv``, ``w1``, ``w3`` and ``output`` are the shards' rows one after the other (dim 0);
  ``wo``, ``w2`` and ``tok_embeddings`` put the shards' columns side by side (dim 1);
  the norms are taken from shard 0; ``rope.freqs`` is dropped;
- ``wq`` and ``wk`` rows are reordered for Hugging Face's rotary layout: within each head of ``d`` rows,
  Hugging Face row ``a * d/2 + b`` is Meta row ``2 * b + a``;
- float16 values are copied unchanged (since v4.33 the script rounds them to bfloat16: not these models).

No shard is loaded: ``torch.load(mmap=True)`` gives each piece's byte offset, and rows are read with ``pread``
through the checkpoint's own reader, so memory stays flat however many shards there are.

>>> with Checkpoint.open("LLaMA/13B") as raw:          # or "LLaMA", choosing the size by what is needed
...     raw.tensors["model.layers.0.self_attn.q_proj.weight"].shape
(5120, 5120)
"""

from __future__ import annotations

import math
import re
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import (
    DIRECT_ALIGN,
    Checkpoint,
    TensorInfo,
    aligned_bytes,
    read_bin_header,
    refuse_empty,
    tensor_twice,
)
from ..errors import CheckpointError, PlanError
from ..files import CONFIG_NAME, read_json_object
from ..manifest import file_digest
from ..untrusted import SMALL_FILE_LIMIT, load_json, read_small

PARAMS_NAME = "params.json"
CHECKLIST_NAME = "checklist.chk"
SHARD_RE = re.compile(r"^consolidated\.(\d{2})\.pth$")
DROPPED = ("rope.freqs",)  # recomputed by every implementation: not a weight

# Meta name -> (Hugging Face name, join dimension (None: norms, from shard 0), rotary permutation)
_LAYER_RULES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0, True),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0, True),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0, False),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1, False),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0, False),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1, False),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0, False),
    "attention_norm.weight": ("input_layernorm.weight", None, False),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None, False),
}
_TOP_RULES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1, False),
    "norm.weight": ("model.norm.weight", None, False),
    "output.weight": ("lm_head.weight", 0, False),
}
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")

# What params.json tells apart: the families' norm_eps, and the sizes' widths.
LLAMA1_EPS, LLAMA2_EPS = 1e-6, 1e-5
SIZES = {
    "LLaMA-1": {4096: "7B", 5120: "13B", 6656: "30B", 8192: "65B"},
    "LLaMA-2": {4096: "7B", 5120: "13B", 8192: "70B"},
}


@dataclass(frozen=True)
class MetaParams:
    """What ``params.json`` says about the model, and which LLaMA it names."""

    dim: int
    n_heads: int
    n_layers: int
    norm_eps: float
    n_kv_heads: int | None
    rope_theta: float | None

    @classmethod
    def read(cls, path: Path) -> MetaParams:
        body = load_json(
            read_small(path, limit=SMALL_FILE_LIMIT, what=PARAMS_NAME), where=f"{path}: not a Meta params.json"
        )
        try:
            if not isinstance(body, dict):
                raise TypeError("not a JSON object")
            params = cls(
                dim=int(body["dim"]),
                n_heads=int(body["n_heads"]),
                n_layers=int(body["n_layers"]),
                norm_eps=float(body["norm_eps"]),
                n_kv_heads=int(body["n_kv_heads"]) if body.get("n_kv_heads") is not None else None,
                rope_theta=float(body["rope_theta"]) if body.get("rope_theta") is not None else None,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{path}: not a readable Meta params.json ({type(exc).__name__}: {exc}); download it again"
            ) from None
        if params.dim <= 0 or params.n_heads <= 0 or params.dim % params.n_heads or (params.dim // params.n_heads) % 2:
            raise CheckpointError(f"{path}: dim {params.dim} and n_heads {params.n_heads} do not make rotary heads")
        return params

    @property
    def family(self) -> str:
        """Return "LLaMA-1", "LLaMA-2", "Code Llama" or a description: what norm_eps and the rest point to."""
        if self.rope_theta is not None and self.rope_theta != 10000.0:
            return "Code Llama"
        if math.isclose(self.norm_eps, LLAMA1_EPS, rel_tol=1e-6):
            return "LLaMA-1"
        if math.isclose(self.norm_eps, LLAMA2_EPS, rel_tol=1e-6):
            return "LLaMA-2"
        return f"an unknown LLaMA (norm_eps {self.norm_eps:g})"

    def describe(self) -> str:
        """Return e.g. "LLaMA-1 13B (dim 5120, 40 layers, norm_eps 1e-06)"."""
        size = SIZES.get(self.family, {}).get(self.dim)
        name = f"{self.family} {size}" if size else f"{self.family} of dim {self.dim}"
        return f"{name} (dim {self.dim}, {self.n_layers} layers, norm_eps {self.norm_eps:g})"


def is_meta_dir(directory: Path) -> bool:
    """Return True for a Meta size directory, or a parent holding such directories and no Hugging Face model."""
    if any(directory.glob("consolidated.*.pth")):
        return True
    if (directory / CONFIG_NAME).is_file():  # a Hugging Face model, whatever else lies beside it
        return False
    return (directory / PARAMS_NAME).is_file() or bool(_size_dirs(directory))


def _size_dirs(parent: Path) -> list[Path]:
    try:
        children = sorted(p for p in parent.iterdir() if p.is_dir())
    except OSError:
        return []
    sizes = [child for child in children if (child / PARAMS_NAME).is_file() or any(child.glob("consolidated.*.pth"))]
    return sorted(sizes, key=lambda child: (int(re.match(r"\d*", child.name).group() or 0), child.name))  # 7B, 13B


def size_hint(directory: str | Path) -> int | None:
    """Return the hidden size a model directory's config.json states (to pick a Meta size), None if it does not."""
    value = read_json_object(Path(directory) / CONFIG_NAME).get("hidden_size")
    return value if isinstance(value, int) else None


def describe(checkpoint: Checkpoint) -> str | None:
    """Return which LLaMA a Meta checkpoint's params.json names, None for any other checkpoint."""
    if checkpoint.layout != "meta":
        return None
    return f"{MetaParams.read(checkpoint.directory / PARAMS_NAME).describe()}, Meta's original format"


def pick_size_dir(directory: Path, hidden_size: int | None) -> Path:
    """Return the size directory to read: ``directory`` itself, or the one of its sizes that has ``hidden_size``."""
    if (directory / PARAMS_NAME).is_file() or any(directory.glob("consolidated.*.pth")):
        return directory
    sizes = _size_dirs(directory)
    if len(sizes) == 1:
        return sizes[0]
    described = {}
    for size in sizes:
        try:
            described[size] = MetaParams.read(size / PARAMS_NAME)
        except CheckpointError:
            described[size] = None
    names = ", ".join(size.name for size in sizes)
    if hidden_size is not None:
        fits = [size for size, params in described.items() if params is not None and params.dim == hidden_size]
        if len(fits) == 1:
            return fits[0]
        if not fits:
            raise CheckpointError(
                f"{directory}: Meta's download holds {names}, none of hidden size {hidden_size} as needed here; "
                "download that size"
            )
    example = sizes[-1]
    raise CheckpointError(
        f"{directory}: Meta's download holds several sizes ({names}); give the one you mean, e.g. {example}"
    )


@dataclass
class _Scratch:
    """Two reused read buffers per thread: a shard's rows land here before taking their place in the output."""

    _local: threading.local = field(default_factory=threading.local)

    def get(self, slot: int, nbytes: int) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        need = nbytes + 2 * DIRECT_ALIGN
        if slot not in buffers or buffers[slot].numel() < need:
            buffers[slot] = aligned_bytes(need)
        return buffers[slot]


@dataclass(frozen=True)
class Assembly:
    """How one Hugging Face tensor is read from Meta's shards: ``pieces`` (one per shard) joined along ``dim``,
    rows permuted for rotary within blocks of ``head_rows`` (0: not permuted)."""

    pieces: tuple[TensorInfo, ...]
    dim: int
    head_rows: int
    scratch: _Scratch

    def read_rows(
        self, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Return rows ``start:stop`` of the converted tensor, in ``out`` (bytes) when given."""
        if self.dim == 1:
            target = _target(out, info, start, stop)
            width = self.pieces[0].shape[1]
            nbytes = (stop - start) * width * info.dtype.itemsize
            for k, piece in enumerate(self.pieces):
                rows = checkpoint.read_rows(piece, start, stop, out=self.scratch.get(0, nbytes))
                target[:, k * width : (k + 1) * width].copy_(rows)
            return target
        if not self.head_rows:
            return self._joined_rows(checkpoint, info, start, stop, out)
        low = start - start % self.head_rows
        high = -(-stop // self.head_rows) * self.head_rows
        meta_rows = self._joined_rows(
            checkpoint, info, low, high, self.scratch.get(1, (high - low) * info.row_numel * info.dtype.itemsize)
        )
        target = _target(out, info, start, stop)
        torch.index_select(meta_rows, 0, rotary_rows(start, stop, self.head_rows) - low, out=target)
        return target

    def _joined_rows(
        self, checkpoint: Checkpoint, info: TensorInfo, start: int, stop: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Return rows ``start:stop`` of the shards' rows one after the other, read straight into ``out`` when
        they lie in one shard."""
        per = self.pieces[0].rows
        spans = [
            (k, max(start, k * per) - k * per, min(stop, (k + 1) * per) - k * per)
            for k in range(start // per, -(-stop // per))
        ]
        if len(spans) == 1:
            k, low, high = spans[0]
            return checkpoint.read_rows(self.pieces[k], low, high, out=out)
        target = _target(out, info, start, stop)
        done = 0
        for k, low, high in spans:
            nbytes = (high - low) * info.row_numel * info.dtype.itemsize
            target[done : done + high - low].copy_(
                checkpoint.read_rows(self.pieces[k], low, high, out=self.scratch.get(0, nbytes))
            )
            done += high - low
        return target


def rotary_rows(start: int, stop: int, head_rows: int) -> torch.Tensor:
    """Return, for Hugging Face rows ``start:stop`` of q or k, the Meta rows they come from.

    The 2023 script views Meta's rows as (heads, head_rows/2, 2) and swaps the last two: within a head, Hugging
    Face row ``a * head_rows/2 + b`` is Meta row ``2 * b + a``.
    """
    rows = torch.arange(start, stop, dtype=torch.int64)
    within = rows % head_rows
    half = head_rows // 2
    return rows - within + 2 * (within % half) + within // half


def _target(out: torch.Tensor | None, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    shape = (stop - start, *info.shape[1:])
    nbytes = math.prod(shape) * info.dtype.itemsize
    if out is None:
        out = aligned_bytes(nbytes)
    return out[:nbytes].view(info.dtype).view(shape)


def open_meta(directory: Path, *, hidden_size: int | None = None, verify_md5: bool = True) -> Checkpoint:
    """Return Meta's checkpoint in ``directory`` (a size directory or its parent) as a Hugging Face tensor table.

    Checks, before any tensor is read: params.json, every shard named in checklist.chk present and (unless
    ``verify_md5`` is False) of the md5 it lists, the shards' count and shapes consistent with each other and with
    params.json.
    """
    directory = pick_size_dir(directory, hidden_size)
    params_path = directory / PARAMS_NAME
    if not params_path.is_file():
        raise CheckpointError(f"{params_path}: missing; Meta's size directory holds it beside consolidated.*.pth")
    params = MetaParams.read(params_path)
    check_checklist(directory, verify_md5=verify_md5)
    shards = _shard_files(directory)
    pieces = [_read_shard(path) for path in shards]
    tensors = _assemble(directory, params, shards, pieces)
    config = hf_config(params, tensors)
    return Checkpoint(directory=directory, layout="meta", tensors=tensors, files=shards, config=config)


def _shard_files(directory: Path) -> list[Path]:
    """Return consolidated.00.pth ... in order, naming the first one missing from the sequence."""
    numbers = {}
    for path in directory.glob("consolidated.*.pth"):
        match = SHARD_RE.match(path.name)
        if match:
            numbers[int(match.group(1))] = path
    if not numbers:
        raise CheckpointError(f"{directory}: params.json but no consolidated.00.pth; download the weights")
    for number in range(max(numbers) + 1):
        if number not in numbers:
            raise CheckpointError(
                f"{directory / f'consolidated.{number:02d}.pth'}: missing (the directory has consolidated."
                f"{max(numbers):02d}.pth); download it again"
            )
    return [numbers[n] for n in range(len(numbers))]


def read_checklist(path: Path) -> dict[str, str]:
    """Return {file name: md5} from Meta's checklist.chk (``md5sum`` output)."""
    listed = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) != 32 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise CheckpointError(f"{path}:{number}: not an md5sum line: {line[:80]!r}; download it again")
        if "/" in name or "\\" in name or name in (".", ".."):  # only files beside it: nothing else is read
            raise CheckpointError(f"{path}:{number}: names {name!r}, not a file of this directory; download it again")
        listed[name] = digest.lower()
    return listed


def md5_bytes(path: str | Path, other_dir: str | Path) -> int:
    """Return how many bytes opening ``path`` as the raw model will md5 (0: not Meta's, no checklist.chk, or
    unreadable: opening it will say why). Lets the command line say why it is busy before the tensors flow."""
    path = Path(path)
    try:
        if not path.is_dir() or not is_meta_dir(path):
            return 0
        directory = pick_size_dir(path, size_hint(other_dir))
        listed = read_checklist(directory / CHECKLIST_NAME) if (directory / CHECKLIST_NAME).is_file() else {}
        return sum((directory / name).stat().st_size for name in listed if (directory / name).is_file())
    except (OSError, CheckpointError):
        return 0


def check_checklist(directory: Path, *, verify_md5: bool) -> None:
    """Refuse a file that checklist.chk lists and the directory lacks, or (``verify_md5``) whose md5 differs."""
    path = directory / CHECKLIST_NAME
    if not path.is_file():
        return
    listed = read_checklist(path)
    for name in listed:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing (listed in {CHECKLIST_NAME}); download it again")
    if not verify_md5:
        return
    names = sorted(listed, key=lambda name: -(directory / name).stat().st_size)
    with ThreadPoolExecutor(2) as pool:  # md5 is one core's work per file: two files at a time
        digests = dict(zip(names, pool.map(lambda name: file_digest(directory / name, "md5"), names), strict=True))
    for name in sorted(listed):
        if digests[name] != listed[name]:
            raise CheckpointError(
                f"{directory / name}: its md5 differs from {CHECKLIST_NAME} (damaged or incomplete download); "
                "download it again"
            )


def _read_shard(path: Path) -> dict[str, TensorInfo]:
    """Return one shard's tensors by Meta name, with their byte offsets (no tensor data is read)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: damaged or incomplete (not the zip archive torch.save writes); download it again"
        )
    found, _ = read_bin_header(path)
    table = {}
    for info in found:
        if info.name in DROPPED:
            continue
        if info.offset is None:
            raise CheckpointError(
                f"{path}: tensor {info.name} is not stored as a plain array; not a checkpoint as Meta released it"
            )
        table[info.name] = info
    refuse_empty(table.values())
    return table


def _hf_rule(meta_name: str) -> tuple[str, int | None, bool] | None:
    if meta_name in _TOP_RULES:
        return _TOP_RULES[meta_name]
    match = _LAYER_NAME.match(meta_name)
    if match and match.group(2) in _LAYER_RULES:
        name, dim, rotary = _LAYER_RULES[match.group(2)]
        return f"model.layers.{int(match.group(1))}.{name}", dim, rotary  # layers.00 is layers.0
    return None


def _assemble(
    directory: Path, params: MetaParams, shards: list[Path], pieces: list[dict[str, TensorInfo]]
) -> dict[str, TensorInfo]:
    """Return the Hugging Face tensor table, refusing shards that do not belong together or to params.json."""
    first = pieces[0]
    wq = first.get("layers.0.attention.wq.weight")
    if wq is None or len(wq.shape) != 2 or wq.shape[1] != params.dim:
        raise CheckpointError(
            f"{shards[0]}: no layers.0.attention.wq.weight of width {params.dim} as params.json says; not a LLaMA "
            "checkpoint of this size"
        )
    if params.n_kv_heads is not None and params.n_kv_heads != params.n_heads:
        raise CheckpointError(
            f"{directory}: {params.describe()} uses grouped-query attention (n_kv_heads {params.n_kv_heads}), "
            "which weight-diff does not read from Meta's format; convert it to Hugging Face format first"
        )
    expected = params.dim // wq.shape[0] if wq.shape[0] and params.dim % wq.shape[0] == 0 else None
    if expected != len(shards):
        if expected is not None and expected > len(shards):
            raise CheckpointError(
                f"{directory / f'consolidated.{len(shards):02d}.pth'}: missing; each shard holds 1/{expected} of "
                f"{params.describe()}, so {expected} shards are needed and {len(shards)} are here; download it again"
            )
        raise CheckpointError(
            f"{directory}: {len(shards)} consolidated.*.pth files, but consolidated.00.pth holds {wq.shape[0]} of "
            f"{params.dim} query rows; the shards come from different downloads: download them again"
        )
    if params.n_heads % len(shards):
        raise CheckpointError(f"{directory}: {params.n_heads} heads cannot be split over {len(shards)} shards")
    for path, table in zip(shards[1:], pieces[1:], strict=True):
        for name, info in first.items():
            other = table.get(name)
            if other is None or other.shape != info.shape or other.dtype != info.dtype:
                what = "lacks it" if other is None else f"has {other.dtype} {list(other.shape)}"
                raise CheckpointError(
                    f"{path}: does not belong with {shards[0].name} (tensor {name}: {shards[0].name} has "
                    f"{info.dtype} {list(info.shape)}, {path.name} {what}); the shards come from different "
                    "downloads: download them again"
                )
        extra = sorted(set(table) - set(first))
        if extra:
            raise CheckpointError(
                f"{path}: does not belong with {shards[0].name} (it has {extra[0]}, which {shards[0].name} lacks); "
                "download the shards again"
            )
    scratch = _Scratch()
    head_rows = params.dim // params.n_heads
    tensors: dict[str, TensorInfo] = {}
    meta_names: dict[str, str] = {}
    for meta_name, info in _hf_order(first):
        rule = _hf_rule(meta_name)
        if rule is None:
            raise CheckpointError(f"{shards[0]}: unexpected tensor {meta_name}; not a LLaMA checkpoint")
        name, dim, rotary = rule
        if name in tensors:
            raise tensor_twice(directory, name, f"{shards[0].name}'s {meta_names[name]}", meta_name)
        meta_names[name] = meta_name
        parts = tuple(table[meta_name] for table in pieces) if dim is not None else (info,)
        shape = list(info.shape)
        if dim is not None:
            shape[dim] *= len(parts)
        tensors[name] = TensorInfo(
            name,
            info.dtype,
            tuple(shape),
            info.file,
            None,
            assembly=Assembly(parts, dim or 0, head_rows if rotary else 0, scratch),
        )
    _check_against_params(directory, params, tensors)
    return tensors


def _hf_order(first: dict[str, TensorInfo]) -> list[tuple[str, TensorInfo]]:
    """Meta's tensors in the order of a Hugging Face LLaMA: embeddings, layer by layer, final norm, lm_head."""
    rules = list(_LAYER_RULES)

    def key(item: tuple[str, TensorInfo]) -> tuple:
        match = _LAYER_NAME.match(item[0])
        if match:
            part = match.group(2)
            return (1, int(match.group(1)), rules.index(part) if part in rules else len(rules), item[0])
        return ({"tok_embeddings.weight": 0, "norm.weight": 2, "output.weight": 3}.get(item[0], 4), 0, 0, item[0])

    return sorted(first.items(), key=key)


def _check_against_params(directory: Path, params: MetaParams, tensors: dict[str, TensorInfo]) -> None:
    embed = tensors.get("model.embed_tokens.weight")
    layers = {int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")}
    if embed is None or "lm_head.weight" not in tensors or "model.norm.weight" not in tensors:
        raise CheckpointError(f"{directory}: the shards lack tok_embeddings, norm or output; not a LLaMA checkpoint")
    if embed.shape[1] != params.dim or layers != set(range(params.n_layers)):
        raise CheckpointError(
            f"{directory}: the shards hold {len(layers)} layers of width {embed.shape[1]}, params.json says "
            f"{params.describe()}; params.json belongs to another size: download it again"
        )


def hf_config(params: MetaParams, tensors: dict[str, TensorInfo]) -> dict:
    """Return the config.json the 2023 conversion would have written for this checkpoint (the parts that matter)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": params.dim,
        "intermediate_size": tensors["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_attention_heads": params.n_heads,
        "num_hidden_layers": params.n_layers,
        "num_key_value_heads": params.n_heads,
        "rms_norm_eps": params.norm_eps,
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "torch_dtype": "float16",
    }


def check_base(raw: Checkpoint, other_dir: str | Path, role: str) -> None:
    """Refuse a Meta base of another family or size than the model in ``other_dir`` (diff or tuned) was made from.

    LLaMA-1 and LLaMA-2 have the same shapes at 7B and 13B; only their norm_eps (1e-6 against 1e-5) tells them
    apart without a manifest.
    """
    if raw.layout != "meta" or raw.config is None:
        return
    params = MetaParams.read(raw.directory / PARAMS_NAME)
    config = read_json_object(Path(other_dir) / CONFIG_NAME)
    eps = config.get("rms_norm_eps")
    if isinstance(eps, (int, float)) and not math.isclose(float(eps), params.norm_eps, rel_tol=1e-6):
        made_from = {LLAMA1_EPS: "LLaMA-1", LLAMA2_EPS: "LLaMA-2"}
        family = next((f for e, f in made_from.items() if math.isclose(float(eps), e, rel_tol=1e-6)), None)
        wanted = f"{family}'s" if family else "the matching"
        raise PlanError(
            f"{raw.directory}: Meta's params.json describes {params.describe()}, but the {role} was made from a "
            f"model with rms_norm_eps {eps:g}{f' ({family})' if family else ''}: give {wanted} download"
        )
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    if (isinstance(hidden, int) and hidden != params.dim) or (isinstance(layers, int) and layers != params.n_layers):
        size = SIZES.get(params.family, {}).get(hidden) if isinstance(hidden, int) else None
        named = f" ({params.family} {size})" if size else ""
        raise PlanError(
            f"{raw.directory}: Meta's params.json describes {params.describe()}, but the {role} is of hidden size "
            f"{hidden} and {layers} layers{named}: give that size's directory"
        )
