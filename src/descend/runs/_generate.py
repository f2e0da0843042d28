"""Sample text from a trained language model: ``descend generate RUN_DIR --prompt TEXT``.

A run of ``descend train --model transformer`` on text (``stdlib-text``, a ``.txt`` file or a
directory) models bytes: the prompt is encoded as UTF-8 and its bytes are the token ids, and the
sampled bytes are decoded as UTF-8 as they arrive (an incomplete character waits for its next byte;
bytes that are not UTF-8 print as U+FFFD). Sampling is :meth:`descend.nn.TransformerLM.generate`.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from descend.nn import TransformerLM
from descend.runs._predict import PredictError, load_run_model
from descend.train._device import autocast

__all__ = ["Generation", "generate_text"]


@dataclass
class Generation:
    """What :func:`generate_text` will do: the model's ``context``, the prompt's bytes and how many it reads."""

    context: int
    prompt_bytes: int
    pieces: Iterator[str]

    @property
    def prompt_truncated(self) -> bool:
        return self.prompt_bytes > self.context


def generate_text(run_dir: str | Path, prompt: str, tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, device: str = "auto",
                  bf16: bool | None = None) -> Generation:
    """Sample ``tokens`` bytes after ``prompt`` from the language model of ``run_dir``.

    Returns a :class:`Generation` whose ``pieces`` yield the decoded text as it is sampled. A run that
    is not a language model, an empty prompt, or a bad sampling setting is a :class:`PredictError`
    (one line). A prompt longer than the model's context is conditioned on its last ``context`` bytes.
    ``bf16`` runs the forward passes under bfloat16 autocast (default: as the run was trained, on CUDA;
    never on the CPU, where it is slower).
    """
    model, dev = load_run_model(run_dir, device)
    if bf16 is None:
        bf16 = dev.type == "cuda" and _trained_in_bf16(Path(run_dir))
    if not isinstance(model, TransformerLM):
        raise PredictError(f"{run_dir}: its model is not a language model (train one with --model transformer on text)")
    data = prompt.encode("utf-8")
    if not data:
        raise PredictError("--prompt is empty: give at least one character for the model to continue")
    if tokens < 1:
        raise PredictError(f"--tokens must be >= 1, got {tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise PredictError(
            f"sampling settings out of range: --temperature {temperature} (>= 0), --top-k {top_k} (>= 1), "
            f"--top-p {top_p} (in (0, 1])"
        )
    idx = torch.tensor([list(data)], dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)

    def pieces() -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with autocast(dev, bool(bf16)):
            stream = model.stream(idx, tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            for token in stream:
                text = decoder.decode(bytes([int(token[0, 0])]))
                if text:
                    yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    return Generation(model.context, len(data), pieces())


def _trained_in_bf16(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("bf16", False))
    except (OSError, ValueError):
        return False
