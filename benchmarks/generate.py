"""Sampling speed of :meth:`descend.nn.TransformerLM.generate`, with and without its KV cache.

    python benchmarks/generate.py [--device cpu|cuda|auto] [--width 384] [--depth 6] [--context 512]
        [--prompt 16] [--tokens 256] [--repeats 3] [--threads N] [--out results.json]

A randomly initialised model (the speed does not depend on what it has learnt) samples ``--tokens``
new tokens after a ``--prompt``-token prompt, batch 1, with the same seed with and without the cache;
the two texts must be equal, and the tokens per second of each (median of ``--repeats`` runs, after
one warm-up) and their ratio are printed. Without the cache every new token runs the whole text
through the model (cost growing with its length); with it, one position.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from descend._io import write_json
from descend.nn import TransformerLM, count_parameters
from descend.train._device import device_name, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = TransformerLM(256, args.context, width=args.width, depth=args.depth, heads=6).to(device).eval()
    prompt = torch.randint(0, 256, (1, args.prompt), device=device)

    def run(use_cache: bool) -> tuple[float, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(1)
        _sync(device)
        start = time.perf_counter()
        out = model.generate(prompt, args.tokens, generator=g, use_cache=use_cache)
        _sync(device)
        return time.perf_counter() - start, out

    seconds: dict[str, list[float]] = {"cache": [], "no cache": []}
    texts = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, use_cache in (("cache", True), ("no cache", False)):
            elapsed, texts[name] = run(use_cache)
            if repeat:
                seconds[name].append(elapsed)
    same = bool(torch.equal(texts["cache"], texts["no cache"]))
    rate = {name: args.tokens / statistics.median(s) for name, s in seconds.items()}
    record = {
        "device": device.type,
        "device_name": device_name(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "parameters": count_parameters(model),
        "width": args.width,
        "depth": args.depth,
        "context": args.context,
        "prompt_tokens": args.prompt,
        "new_tokens": args.tokens,
        "tokens_per_second": rate,
        "speedup": rate["cache"] / rate["no cache"],
        "same_text": same,
    }
    print(f"TransformerLM {record['parameters'] / 1e6:.1f}M parameters, {args.tokens} new tokens after "
          f"{args.prompt}, {device_name(device)} ({args.threads} threads)")
    for name, r in rate.items():
        print(f"  {name:>8}: {r:8.1f} tokens/s")
    print(f"  speed-up of the cache: {record['speedup']:.2f}x; same text with and without it: {same}")
    if args.out is not None:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
