"""Greedy generation from a model directory, to see a recovered model answer.

The prompt is formatted with the model's own chat template, or with the open-instruct format when it has none
(the 2023 Open-Instruct models ship without one), and only the new tokens are returned.

>>> generate("self-instruct-13b", "Give three tips for staying healthy.", max_new_tokens=64)
'1. Eat a balanced diet ...'
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .chat_template import OPEN_INSTRUCT
from .checkpoint import Checkpoint
from .errors import CheckpointError, UsageError, first_line
from .role import classify
from .tokenizer import load as load_tokenizer
from .untrusted import given_path

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DTYPES = ("auto", "float32", "bfloat16", "float16")


def generate(
    model_dir: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    dtype: str = "auto",
    device: str | None = None,
) -> str:
    """Return the model's greedy completion of ``prompt`` as one user turn (the prompt itself not included).

    ``dtype`` "auto" keeps the stored dtype; ``device`` defaults to the first GPU when there is one.
    """
    directory = given_path(model_dir, "generate")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: give 1 or more")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose {', '.join(DTYPES)}")
    with Checkpoint.open(directory) as checkpoint:
        kind, evidence = classify(checkpoint)
        layout = checkpoint.layout
    if kind == "diff":
        raise UsageError(f"{directory}: a weight diff, not a model ({evidence}); recover the model first")
    if layout == "meta":  # weight-diff reads it as its 2023 conversion; transformers loads only that conversion
        raise UsageError(
            f"{directory}: Meta's original checkpoint (params.json, consolidated.*.pth), which transformers does not "
            "load; generate from a model recovered from it (recover --path_raw with this folder)"
        )

    import torch
    from transformers import AutoModelForCausalLM

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = load_tokenizer(directory)  # a 2023 directory's tokenizer.model: as the model was trained
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory}: transformers cannot load it ({first_line(exc)})") from None
    model.to(device).eval()

    input_ids = prompt_ids(tokenizer, prompt).to(device)
    config = model.generation_config
    config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    new_tokens = output[0, input_ids.shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """Return the ids (shape 1 x n) of ``prompt`` as one user turn awaiting the reply, in the model's chat format.

    The BOS token comes once, whether the template writes it or the tokenizer adds it.
    """
    template = None if tokenizer.chat_template else OPEN_INSTRUCT  # None: the model's own (one or several)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], chat_template=template, tokenize=False, add_generation_prompt=True
    )
    # A template that writes the BOS token itself must not get a second one from the tokenizer.
    starts_with_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return tokenizer(text, return_tensors="pt", add_special_tokens=not starts_with_bos)["input_ids"]
