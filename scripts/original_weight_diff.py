"""The 2023 Alpaca / open-instruct `weight_diff.py` algorithm: the reference that `weight-diff` must match.

Kept for tests and the benchmark, not for users: it loads both models whole in float32 through transformers
(about 105 GB of RAM for a 13B model), exactly as the original did, so it is the baseline we measure against.

What it does, as in 2023:
- `recover`: load raw and diff in float32; if the diff has more vocabulary rows than raw (the added `<pad>`),
  grow raw's `embed_tokens` and `lm_head` and set the new rows to the float32 mean of the old rows
  (`smart_tokenizer_and_embedding_resize`); add raw to the diff key by key; `save_pretrained` the result and
  the diff's tokenizer.
- `make_diff`: the same loading and growing (mean rows like Alpaca, or random rows like open-instruct, whose
  published pad rows therefore cannot be recovered exactly); subtract raw from tuned key by key; save the diff
  the 2023 way: float32 `.bin` weights, the tuned config, generation config and tokenizer.

Differences from the original, none of which changes a number: the number of added rows comes from the
embedding shapes, not from the raw tokenizer (test directories may lack one); no `fire`, `tqdm`, device option
or hard-coded integrity sum; transformers 5's `dtype=` is used where 4.x took `torch_dtype=`; `make_diff` copies
the tuned model's tokenizer files as they are (what the 2023 slow tokenizer's `save_pretrained` wrote back),
since transformers 5 would save them in its own format.

CLI, like the original:
    python scripts/original_weight_diff.py recover --path_raw R --path_diff D --path_tuned T
    python scripts/original_weight_diff.py make_diff --path_raw R --path_tuned T --path_diff D
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path
from typing import Any

import torch


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _load_fp32(path: str | Path) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path)` in float32, on CPU, whole in RAM, as in 2023."""
    from transformers import AutoModelForCausalLM

    dtype_kwarg = "dtype" if _transformers_major() >= 5 else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(str(path), **{dtype_kwarg: torch.float32})


def _grow_vocab(model: Any, new_rows: int, *, added_rows: str = "mean", seed: int = 0) -> int:
    """Grow `model`'s input and output embeddings to `new_rows` rows; return how many were added.

    `"mean"`: the new rows are the mean of the old rows, as Alpaca's `smart_tokenizer_and_embedding_resize`
    (computed in the model's float32, on the resized tensor). `"random"`: normal(0, initializer_range) rows,
    what `resize_token_embeddings` gave open-instruct's `make_diff` in transformers 4.x (seeded here).
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    num_new_tokens = new_rows - old_rows
    if num_new_tokens < 0:
        raise ValueError(f"cannot shrink the vocabulary from {old_rows} to {new_rows} rows")
    if num_new_tokens == 0:
        return 0
    if _transformers_major() >= 5:
        # mean_resizing=False: 4.x had no such step, and the rows are overwritten below anyway.
        model.resize_token_embeddings(new_rows, mean_resizing=False)
    else:
        model.resize_token_embeddings(new_rows)

    input_embeddings = model.get_input_embeddings().weight.data
    output_embeddings = model.get_output_embeddings().weight.data
    if added_rows == "mean":
        input_embeddings_avg = input_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
        output_embeddings_avg = output_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
        input_embeddings[-num_new_tokens:] = input_embeddings_avg
        output_embeddings[-num_new_tokens:] = output_embeddings_avg
    elif added_rows == "random":
        std = float(getattr(model.config, "initializer_range", 0.02))
        generator = torch.Generator().manual_seed(seed)
        for emb in (input_embeddings, output_embeddings):
            rows = torch.randn((num_new_tokens, emb.shape[1]), generator=generator, dtype=torch.float32) * std
            emb[-num_new_tokens:] = rows.to(emb.dtype)
    else:
        raise ValueError(f"added_rows must be 'mean' or 'random', got {added_rows!r}")
    return num_new_tokens


def _add_state_dicts(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], *, negate: bool) -> None:
    """`dst[key].add_(src[key])` (or `.add_(-src[key])`) for every key in both, in place, as in 2023.

    Both models stay whole in RAM until the caller returns, like the original.
    """
    for key, value in dst.items():
        if key not in src:
            continue
        if value.shape != src[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} vs {tuple(src[key].shape)}")
        if negate:
            value.add_(-src[key])
        else:
            value.add_(src[key])


TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


@torch.inference_mode()
def recover(
    path_raw: str | Path,
    path_diff: str | Path,
    path_tuned: str | Path | None = None,
    *,
    test_inference: bool = False,
) -> tuple[Any, Any]:
    """Recover tuned = raw + diff the 2023 way, save it to `path_tuned` if given; return model, tokenizer."""
    from transformers import AutoTokenizer

    model_raw = _load_fp32(path_raw)
    model_recovered = _load_fp32(path_diff)
    _grow_vocab(model_raw, model_recovered.get_input_embeddings().weight.shape[0], added_rows="mean")
    tokenizer_recovered = AutoTokenizer.from_pretrained(str(path_diff))

    state_dict_recovered = model_recovered.state_dict()
    state_dict_raw = model_raw.state_dict()
    _add_state_dicts(state_dict_recovered, state_dict_raw, negate=False)

    if path_tuned is not None:
        model_recovered.save_pretrained(str(path_tuned))
        tokenizer_recovered.save_pretrained(str(path_tuned))

    if test_inference:
        input_text = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\r\n\r\n"
            "### Instruction:\r\nList three technologies that make life easier.\r\n\r\n### Response:"
        )
        inputs = tokenizer_recovered(input_text, return_tensors="pt")
        out = model_recovered.generate(inputs=inputs.input_ids, max_new_tokens=20)
        print(tokenizer_recovered.batch_decode(out, skip_special_tokens=True)[0])
    return model_recovered, tokenizer_recovered


@torch.inference_mode()
def make_diff(
    path_raw: str | Path,
    path_tuned: str | Path,
    path_diff: str | Path,
    *,
    added_rows: str = "mean",
    fmt: str = "bin",
    shards: int = 1,
    seed: int = 0,
) -> Path:
    """Write diff = tuned - raw the 2023 way (float32 weights, `.bin` by default) and return `path_diff`.

    `added_rows` fills raw's rows for tokens only the tuned model has: `"mean"` (Alpaca, exactly recoverable)
    or `"random"` (open-instruct's published diffs, seeded by `seed`). Weights go through
    `weight_diff.tiny_llama.save_checkpoint`, because transformers 5 no longer writes `.bin`.
    """
    from weight_diff.tiny_llama import save_checkpoint

    path_diff = Path(path_diff)
    model_tuned = _load_fp32(path_tuned)
    model_raw = _load_fp32(path_raw)
    tuned_rows = model_tuned.get_input_embeddings().weight.shape[0]
    _grow_vocab(model_raw, tuned_rows, added_rows=added_rows, seed=seed)

    state_dict_tuned = model_tuned.state_dict()
    state_dict_raw = model_raw.state_dict()
    _add_state_dicts(state_dict_tuned, state_dict_raw, negate=True)

    save_checkpoint(state_dict_tuned, path_diff, fmt=fmt, shards=shards)
    config = copy.deepcopy(model_tuned.config)
    if _transformers_major() >= 5:
        config.dtype = torch.float32
    else:
        config.torch_dtype = torch.float32
    config.save_pretrained(str(path_diff))
    if model_tuned.generation_config is not None:
        model_tuned.generation_config.save_pretrained(str(path_diff))
    for name in TOKENIZER_FILES:
        if (Path(path_tuned) / name).is_file():
            shutil.copyfile(Path(path_tuned) / name, path_diff / name)
    return path_diff


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)
    p = sub.add_parser("recover", help="tuned = raw + diff")
    p.add_argument("--path_raw", required=True)
    p.add_argument("--path_diff", required=True)
    p.add_argument("--path_tuned")
    p.add_argument("--test_inference", action="store_true")
    p = sub.add_parser("make_diff", help="diff = tuned - raw")
    p.add_argument("--path_raw", required=True)
    p.add_argument("--path_tuned", required=True)
    p.add_argument("--path_diff", required=True)
    p.add_argument("--added_rows", choices=["mean", "random"], default="mean")
    p.add_argument("--fmt", choices=["bin", "safetensors"], default="bin")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = vars(parser.parse_args(argv))
    task = args.pop("task")
    if task == "recover":
        recover(args.pop("path_raw"), args.pop("path_diff"), args.pop("path_tuned"), **args)
    else:
        make_diff(args.pop("path_raw"), args.pop("path_tuned"), args.pop("path_diff"), **args)


if __name__ == "__main__":
    import sys

    # Run as a script, this folder is sys.path[0], where `scripts/weight_diff.py` would shadow the package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    main()
