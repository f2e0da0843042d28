"""MkDocs hook: pages generated from the code and the data while the site builds.

A page asks for generated Markdown with a marker on a line of its own::

    <!-- generate: cli-reference -->
    <!-- generate: optimizer-step optimizer_step_20M.json -->

The CLI reference is rendered from ``descend.cli.build_parser()``; the performance tables from
``benchmarks/results/*.json``, each table captioned with the method and machine that the JSON itself
records. Nothing here is typed in, so the pages cannot drift from the parser or the measurements.
The functions are plain (no MkDocs import), so ``tests/test_docs.py`` calls them directly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- generate: (?P<name>[\w-]+)(?: (?P<arg>\S+))? -->$", re.MULTILINE)


# ---------------------------------------------------------------------------------------------- CLI


def cli_parser() -> argparse.ArgumentParser:
    """The ``descend`` command's parser, as the command itself builds it."""
    from descend.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of each subcommand, in the order ``--help`` lists them."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # aliases point at the same parser
                    continue
                seen.add(id(sub))
                out.append((name, helps.get(name, ""), sub))
    return out


def cli_reference(_: str | None = None) -> str:
    """Markdown: every command's ``--help`` text, at a fixed width of 84 columns (a code block's width on
    the site at 1280 px, less the copy button)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "84"
    try:
        parser = cli_parser()
        commands = _subcommands(parser)
        lines = ["| command | what it does |", "|---|---|"]
        lines += [f"| [`descend {name}`](#descend-{name}) | {text} |" for name, text, _ in commands]
        lines += ["", "## `descend`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, _, sub in commands:
            lines += [f"## `descend {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
        return "\n".join(lines)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


# -------------------------------------------------------------------------------------- optimizers

RULES = ("clip_by_global_norm", "l2", "heavy_ball", "ema", "sign", "softsign", "scale_by_adam", "lion",
         "scale_by_lr", "decoupled_decay", "project_box", "project_ball")


def rule_equations(_: str | None = None) -> str:
    """Markdown list: every public rule factory of ``descend.optim``, its signature and its equation."""
    import inspect

    from descend import optim

    missing = sorted(set(RULES) - set(optim.__all__))
    if missing:
        raise AttributeError(f"docs/hooks.py lists rules that descend.optim no longer exports: {missing}")
    lines = []
    for name in RULES:
        factory = getattr(optim, name)
        params = inspect.signature(factory).parameters.values()
        required = [p for p in params if p.default is inspect.Parameter.empty]
        rule = factory(*[0.1] * len(required))
        state = ", ".join(f"`{s}`" for s in rule.state_keys(dict(rule.hyper))) or "none"
        args = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params)
        lines.append(f"- **`{name}({args})`**: `{rule.equation()}`; state: {state}")
    return "\n".join(lines)


def explain(what: str | None) -> str:
    """Markdown: ``optim.explain`` of a named optimizer (``AdamW``) or of the guide's example chain (``chain``)."""
    import torch

    from descend import optim

    params = [torch.nn.Parameter(torch.zeros(2))]
    if what in (None, "chain"):
        opt = optim.chain(params, optim.ema(0.9), optim.sign(), optim.decoupled_decay(0.1), lr=1e-3)
    else:
        opt = getattr(optim, what)(params)
    return "```text\n" + optim.explain(opt).rstrip() + "\n```"


# ------------------------------------------------------------------------------------- experiments


def experiments(folder: str | None) -> str:
    """Markdown: ``descend.experiments.render_markdown`` of the JSON in ``docs/figures`` (or ``folder``),
    without its ``# Title`` line (the page has its own)."""
    from descend.experiments import render_markdown

    text = render_markdown(ROOT / (folder or "docs/figures"), figures="../figures/")
    lines = text.splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines)


# -------------------------------------------------------------------------------------- benchmarks


def load_result(name: str) -> dict[str, Any]:
    path = RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a docs page asks for it in a generate marker")
    return json.loads(path.read_text())


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def _num(x: Any, digits: int = 1) -> str:
    if x is None:
        return ""
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}f}"


def _machine(d: dict[str, Any]) -> str:
    """The machine as the JSON records it: its own ``machine``/``cpu`` field when present."""
    parts = [str(d.get(k)) for k in ("machine", "cpu", "device_name") if d.get(k)]
    if not parts:
        parts = [str(d["device"])] if d.get("device") else ["a machine the file does not describe"]
    if d.get("threads"):
        parts.append(f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}")
    if d.get("torch"):
        parts.append(f"torch {d['torch']}")
    return ", ".join(parts)


def _load(d: dict[str, Any]) -> str:
    """The machine's load average (1 minute) before and after the run, when the file records it."""
    before, after = d.get("load_average_before"), d.get("load_average_after")
    if not before or not after:
        return ""
    return f" Load average (1 min) {before[0]:.1f} before the run, {after[0]:.1f} after."


def _time_unit(ms: list[float]) -> tuple[str, Callable[[float], str]]:
    """The unit a table's step times read best in: µs (whole numbers) below 10 ms, else ms (two decimals)."""
    if max(ms, default=0.0) < 10:
        return "µs/step", lambda v: f"{v * 1e3:,.0f}"
    return "ms/step", lambda v: f"{v:,.2f}"


def optimizer_step(name: str | None) -> str:
    """Markdown table of one ``benchmarks/optimizer_step.py`` result file."""
    if not name:
        raise ValueError("optimizer-step needs a file name: <!-- generate: optimizer-step optimizer_step_20M.json -->")
    d = load_result(name)
    bw = d.get("stream_gb_per_s", {})
    rounds = ""
    if d.get("rounds"):
        rounds = f" over {d['rounds']} rounds, each building every optimizer anew in a rotated order"
    method = d.get("method") or (
        f"median of {d['steps']} steps per optimizer{rounds}"
        ", all optimizers stepped in turn (round-robin) with a streaming copy and triad over the same number of "
        "elements"
    )
    caption = (
        f"**{_count(d['params'])} {d.get('dtype', 'float32')} parameters in {d['tensors']} tensors** on "
        f"{_machine(d)}; {method}. Streaming bandwidth in the same run: copy {_num(bw.get('copy'))} GB/s, "
        f"triad {_num(bw.get('triad'))} GB/s.{_load(d)} Source: `benchmarks/results/{name}`."
    )
    unit, shown = _time_unit([r["ms"] for r in d["rows"] if r.get("ms") is not None])
    head = [
        f"| optimizer | {unit} | × fused AdamW | B/param moved | % triad | state B/param | transient B/param |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [
        f"| {r['name']} | {'' if r.get('ms') is None else shown(r['ms'])} "
        f"| {_num(r.get('vs_torch_fused_adamw'), 2)}x | {r.get('bytes_per_param', '')} "
        f"| {_num(r.get('pct_stream'), 0)}% | {_num(r.get('state_bytes_per_param'))} "
        f"| {_num(r.get('transient_bytes_per_param'), 2)} |"
        for r in d["rows"]
    ]
    return "\n".join([caption, "", *head, *rows])


def run_name(name: str, d: dict[str, Any]) -> str:
    """A short name for an ``optimizer_step`` run: its size, and what else its file name says
    (``optimizer_step_20M_compiled.json``: ``20M compiled``)."""
    rest = name.removesuffix(".json").removeprefix("optimizer_step_").split("_", 1)
    extra = rest[1].replace("_", " ") if len(rest) > 1 else ""
    return f"{_count(d['params'])} {extra}".strip()


def optimizer_ratios(_: str | None = None) -> str:
    """Markdown: a few headline ratios (descend against torch fused AdamW) from every optimizer-step file."""
    picks = [
        "descend AdamW [default]",
        "descend SGD-momentum [default]",
        "descend Lion [default]",
        "descend Signum [default]",
        "descend AdamW [compiled, flat]",
        "descend AdamW [compiled]",
        "descend Lion [compiled, flat]",
        "descend Lion bf16 state [compiled, flat]",
        "descend Signum [compiled, flat]",
        "descend AdamW [foreach]",
        "torch AdamW [foreach]",
    ]
    files = sorted(RESULTS.glob("optimizer_step*.json"), key=lambda p: (json.loads(p.read_text())["params"], p.name))
    data = {p.name: json.loads(p.read_text()) for p in files}
    header = "| optimizer | " + " | ".join(run_name(p.name, data[p.name]) for p in files) + " |"
    lines = [
        "Step time as a multiple of `torch.optim.AdamW(fused=True)` measured in the same run "
        "(below 1 is faster); a blank cell: not in that run. The columns are the runs below, by size:",
        "",
        header,
        "|---|" + "---:|" * len(files),
    ]
    tables = {name: {r["name"]: r for r in d["rows"]} for name, d in data.items()}
    for pick in picks:
        cells = [tables[p.name].get(pick, {}).get("vs_torch_fused_adamw") for p in files]
        if any(c is not None for c in cells):
            lines.append(f"| {pick} | " + " | ".join("" if c is None else f"{c:.2f}x" for c in cells) + " |")
    sources = "; ".join(f"{run_name(p.name, data[p.name])}: `{p.name}`" for p in files)
    return "\n".join([*lines, "", f"Runs: {sources}."])


def optimizer_targets(name: str | None) -> str:
    """Markdown table of the targets one ``benchmarks/optimizer_step.py`` run computed (its ``targets`` field)."""
    if not name:
        raise ValueError("optimizer-targets needs a result file name")
    d = load_result(name)
    lines = [
        f"{_count(d['params'])} parameters in {d['tensors']} tensors (`{name}`):",
        "",
        "| descend, as constructed | against | ratio (seconds for first steps) | target | met |",
        "|---|---|---:|---:|---|",
    ]
    for t in d.get("targets", []):
        value = f"{t['ratio']:.2f}" if "(s)" in t["against"] else f"{t['ratio']:.3f}"
        lines.append(f"| {t['row']} | {t['against']} | {value} | ≤ {t['limit']:g} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def trainer_overhead(name: str | None) -> str:
    """Markdown table of ``benchmarks/trainer_overhead.py``'s result: the Trainer against a hand-written loop."""
    name = name or "trainer_overhead.json"
    d = load_result(name)
    caption = (
        f"{d['model']} on digits, {d['optimizer']}, batch {d['batch_size']}, {d['steps']:,} steps, median of "
        f"{d['repeats']} alternating runs. Machine: {_machine(d)}.{_load(d)} Source: `benchmarks/results/{name}`."
    )
    lines = [caption, "", "| data | loop | steps/s | vs hand-written |", "|---|---|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {r['data']} | {r['loop']} | {r['steps_per_s']:,.0f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def attention(name: str | None) -> str:
    """Markdown table of ``benchmarks/attention.py``'s result: full against induced-point attention."""
    d = load_result(name or "attention.json")
    cfg = d.get("config", {})
    caption = (
        f"One forward+backward of an attention block on `x [1, N, {cfg.get('width')}]`, {cfg.get('heads')} heads, "
        f"{cfg.get('inducing')} inducing points, {cfg.get('threads')} threads, {cfg.get('repeats')} repeats, each "
        f"size in its own subprocess; {d.get('method', '')}. Machine: {_machine(d)}. "
        f"Source: `benchmarks/results/{name or 'attention.json'}`."
    )
    by_n: dict[int, dict[str, dict[str, Any]]] = {}
    for r in d["rows"]:
        by_n.setdefault(r["n"], {})[r["mode"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return " | "
        if "skipped" in r:
            return f"skipped: {r['skipped']} | "
        time = f"{r['seconds'] * 1e3:,.1f} ({r['cpu_seconds'] * 1e3:,.0f})"
        return f"{time} | {r['peak_rss_mb']:,.0f} ({r['working_mb']:,.0f})"

    lines = [
        caption,
        "",
        "| N | full: ms (CPU ms) | full: peak RSS MB (working) "
        "| induced: ms (CPU ms) | induced: peak RSS MB (working) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(by_n):
        lines.append(f"| {n:,} | {cell(by_n[n].get('full'))} | {cell(by_n[n].get('induced'))} |")
    return "\n".join(lines)


def generate(name: str | None) -> str:
    """Markdown table of ``benchmarks/generate.py``'s result: sampling with and without the KV cache."""
    name = name or "generate.json"
    d = load_result(name)
    caption = (
        f"`TransformerLM` of {d['parameters'] / 1e6:.1f}M parameters (width {d['width']}, depth {d['depth']}, context "
        f"{d['context']}), {d['new_tokens']} new tokens after a {d['prompt_tokens']}-token prompt, batch 1; "
        f"the same text with and without the cache: {'yes' if d['same_text'] else 'no'}. Machine: {_machine(d)}. "
        f"Source: `benchmarks/results/{name}`."
    )
    rate = d["tokens_per_second"]
    lines = [caption, "", "| sampling | tokens/s |", "|---|---:|"]
    lines += [f"| {'with the KV cache' if k == 'cache' else 'without it'} | {v:,.1f} |" for k, v in rate.items()]
    lines.append(f"| speed-up | {d['speedup']:.2f}x |")
    return "\n".join(lines)


def lm_hand_loop(name: str | None) -> str:
    """Markdown table of ``benchmarks/lm_hand_loop.py``'s result: ``descend train`` against a nanoGPT-style loop."""
    name = name or "lm_hand_loop.json"
    d = load_result(name)
    caption = (
        f"`TransformerLM` of {d['parameters'] / 1e6:.1f}M parameters (width {d['width']}, depth {d['depth']}, "
        f"{d['heads']} heads, context {d['context']}) on `stdlib-text`, AdamW lr {d['lr']:g}, {d['steps']} steps of "
        f"{d['batch_size']} x {d['context']} bytes ({d['tokens']:,} tokens), evaluated every {d['eval_every']} steps "
        f"on {d['eval_tokens']:,} validation bytes; {d['repeats']} runs of each loop in the order "
        f"{', '.join(d['order'])}. Machine: {_machine(d)}.{_load(d)} Source: `benchmarks/results/{name}`."
    )
    lines = [caption, "", f"| loop | wall time of each run (s) | final validation bits/byte | seconds to "
             f"{d['target_bits_per_byte']:.3f} bits/byte (mean) |", "|---|---:|---:|---:|"]
    for loop, runs in d["curves"].items():
        seconds = ", ".join(f"{r[-1]['seconds']:.1f}" for r in runs)
        bits = ", ".join(f"{r[-1]['val_loss'] / math.log(2):.3f}" for r in runs)
        lines.append(f"| {loop} | {seconds} | {bits} | {d['mean_seconds_to_target'][loop]:.1f} |")
    met = "met" if d["ratio"] <= 1.05 else "not met"
    lines += ["", f"descend train / hand loop, time to the same validation loss: **{d['ratio']:.3f}** "
              f"(target at most 1.05: {met})"]
    if d.get("wall_ratio"):
        lines[-1] += f"; wall time of the same steps and evaluations: **{d['wall_ratio']:.3f}**"
    if d.get("sample"):
        lines += ["", f"`{d['sample']['command']}` printed:", "", "```text", d["sample"]["text"], "```"]
    return "\n".join(lines)


def text_streaming(name: str | None) -> str:
    """Markdown table of ``benchmarks/text_streaming.py``'s result: peak memory against the corpus size."""
    name = name or "text_streaming.json"
    d = load_result(name)
    caption = (
        f"`descend train --model transformer` ({d['model']}), {d['steps']} steps of batch 16, on generated text "
        f"files of each size; peak resident set of the training process. Machine: {_machine(d)}. "
        f"Source: `benchmarks/results/{name}`."
    )
    lines = [caption, "", "| text file | training windows | peak RSS | wall time |", "|---:|---:|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {_count(r['bytes'])}B | {r['train_windows']:,} | {r['peak_rss_mib']:,.0f} MiB | "
                     f"{r['seconds']:,.0f} s |")
    return "\n".join(lines)


def state_codes(name: str | None) -> str:
    """Markdown table of ``benchmarks/state_codes.py``'s result: Adam trained with its state in each format."""
    name = name or "state_codes.json"
    d = load_result(name)
    seeds = d["seeds"]
    caption = (
        f"Adam on digits (MLP 64-128-128-10, lr 1e-3, {d['steps']} steps of 64 examples), its state stored in each "
        f"format after every step; seeds 0 to {seeds - 1}. The second moment `v` against its float32 running mean "
        f"over the same gradients. Machine: {_machine(d)}. Source: `benchmarks/results/{name}`."
    )
    lines = [caption, "", "| state format | train loss (mean, max) | test accuracy (mean, min) | v stored as 0 "
             "| v median rel. error |", "|---|---:|---:|---:|---:|"]
    for row in d["rows"]:
        runs = row["runs"]
        losses = [r["train_loss"] for r in runs]
        accuracy = [100 * r["test_accuracy"] for r in runs]
        if all(math.isfinite(x) for x in losses):
            loss = f"{statistics.mean(losses):.4f}, {max(losses):.4f}"
        else:
            loss = f"NaN on {sum(not math.isfinite(x) for x in losses)} of {seeds} seeds"
        zeroed = [r["v_zeroed"] for r in runs if "v_zeroed" in r]
        errors = [e for r in runs if math.isfinite(e := r.get("v_median_relative_error", math.nan))]
        lines.append(f"| {row['format']} | {loss} | {statistics.mean(accuracy):.2f}%, {min(accuracy):.2f}% | "
                     f"{f'{100 * statistics.mean(zeroed):.1f}%' if zeroed else '-'} | "
                     f"{f'{100 * statistics.mean(errors):.1f}%' if errors else '-'} |")
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _memory_machine(d: dict[str, Any]) -> str:
    m = d.get("machine", {})
    memory = f", {m['memory_bytes'] / 2**30:.1f} GiB" if m.get("memory_bytes") else ""
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores{memory}, torch {m.get('torch', '?')}, " \
           f"device {m.get('device', 'cpu')}"


def memory(name: str | None) -> str:
    """Markdown tables of ``benchmarks/memory.py``'s result: one per model size, every row's peak memory split
    into parameters, gradients, optimizer state and the rest, with bytes per parameter and step time."""
    name = name or "memory.json"
    d = load_result(name)
    t = d["table"]
    caps = sorted({r.get("address_space_cap_bytes") or t.get("memory_limit_bytes") or 0 for r in t["rows"]})
    capped = " to ".join(f"{c / 2**30:.1f}" for c in (caps[0], caps[-1])[:len(set((caps[0], caps[-1])))])
    cap = f"each row in its own process, its address space capped at {capped} GiB; " if caps[-1] else ""
    caption = (
        f"One training step of a `TransformerLM` (vocabulary 256) on {t['batch']} x {t['context']} bytes: a warm-up "
        f"step, then the peak over {t['steps']} timed steps ({cap}{t['threads']} thread(s)). Peak: resident set "
        f"(CPU) or `max_memory_allocated` (CUDA) minus the process's baseline (libraries loaded, one step of a tiny "
        f"model taken). Parameters, gradients alive at the peak and optimizer state are counted from tensor sizes; "
        f"*rest* is the peak less those three (activations, autograd's buffers, temporaries). Training state: "
        f"parameters + gradients + state. Time: median step, and as a multiple of `torch.optim.AdamW(fused=True)` "
        f"with float32 state: where the JSON has `paired_step_seconds`, the median of the row's steps alternated "
        f"with as many of torch's on a float32 model of the same shape in the same process (so that a shared "
        f"machine's changing load falls on both); where it has only `reference_step_seconds`, torch's steps timed "
        f"right after the row's; else the size's `torch AdamW` row of the same run (its own process: each row "
        f"records the load average); "
        f"*(first step)*: a row too slow to time further, "
        f"measured on its first step (state creation and, in its peak, construction included). "
        f"Machine: {_memory_machine(d)}. "
        f"Source: `benchmarks/results/{name}`."
    )
    lines = [caption]
    sizes = list(dict.fromkeys(r["size"] for r in t["rows"]))
    for size in sizes:
        rows = [r for r in t["rows"] if r["size"] == size]
        width, depth, heads = t["shapes"][size]
        lines += ["", f"**{size}**: {rows[0]['parameters']:,} parameters (width {width}, depth {depth}, "
                      f"{heads} heads)", "",
                  "| optimizer and mode | peak − baseline MiB | params MiB | grads MiB | state MiB | rest MiB "
                  "| training state B/param | peak B/param | s/step | × torch AdamW |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if not r.get("available", True):
                lines.append(f"| {r['row']}: {r['reason']} |" + "|" * 9)  # the text where it wraps
            elif not r.get("fits"):
                limit = r.get("address_space_cap_bytes")
                why = f"does not fit ({limit / 2**30:.0f} GiB cap)" if limit else f"does not fit: {r.get('error', '')}"
                ex = r.get("extrapolated")
                if ex:
                    why += f"; about {_gib(ex['peak_bytes'])} GiB at {ex['peak_bytes_per_parameter']:.1f} B/param"
                lines.append(f"| {r['row']}: {why} |" + "|" * 9)
            else:
                ratio = f"{r['vs_torch_adamw']:.2f}x" if r.get("vs_torch_adamw") is not None else ""
                first = r.get("timed_steps", 1) == 0  # too slow to time: the first step, construction in its peak
                ratio += " (first step)" if first else ""
                lines.append(
                    f"| {r['row']} | {_mib(r['peak_bytes'] - r['baseline_bytes'])} | {_mib(r['parameter_bytes'])} | "
                    f"{_mib(r['gradient_bytes'])} | {_mib(r['state_bytes'])} | {_mib(r['rest_bytes'])} | "
                    f"{r['state_bytes_per_parameter']:.2f} | {r['peak_bytes_per_parameter']:.2f} | "
                    f"{r['step_seconds']:.3f} | {ratio} |")
    return "\n".join(lines)


def memory_targets(name: str | None) -> str:
    """Markdown table of the targets ``benchmarks/memory.py`` measured (its ``table.targets`` field)."""
    name = name or "memory.json"
    d = load_result(name)
    ratio = {(r["row"], r["size"]): r.get("vs_torch_adamw") for r in d["table"]["rows"]}
    lines = ["| target | size | descend configuration | measured | target | met | the same with float32 state |",
             "|---|---|---|---:|---:|---|---:|"]
    for t in d["table"]["targets"]:
        value = "" if t["value"] is None else f"{t['value']:.2f}"
        if value and float(value) == t["limit"] and not t["met"]:  # just above the bound: the digit that says so
            value = f"{t['value']:.3f}"
        met = "yes" if t["met"] else ("**no**" if t["value"] is not None else f"not measured: {t.get('why', '')}")
        plain = re.sub(r"(int8|bfloat16) state", "float32 state", t["row"])  # the mode without its state store
        same = ratio.get((plain, t["size"])) if "step time" in t["target"] and plain != t["row"] else None
        lines.append(f"| {t['target']} | {t['size']} | {t['row']} | {value} | ≤ {t['limit']:g} | {met} | "
                     f"{'' if same is None else f'{same:.2f}'} |")
    return "\n".join(lines)


def _memory_part(name: str | None, part: str) -> tuple[str, dict[str, Any], Any]:
    """``benchmarks/memory.py``'s result file name, its contents and its ``part`` (None when not run yet)."""
    name = name or "memory.json"
    d = load_result(name)
    return name, d, d.get(part)


def _not_run(what: str, name: str, flag: str) -> str:
    return f"*No {what} in `benchmarks/results/{name}` yet: run `python benchmarks/memory.py {flag}`.*"


def memory_two_billion(name: str | None) -> str:
    """Markdown table of ``benchmarks/memory.py --two-billion``: the 2B-parameter runs and torch's AdamW."""
    name, d, tb = _memory_part(name, "two_billion")
    if not tb:
        return _not_run("2B run", name, "--two-billion")
    width, depth, heads = tb["shape"]
    lines = [f"`TransformerLM` of width {width}, depth {depth}, {heads} heads, {tb['batch']} x {tb['context']} bytes "
             f"a step (one repeated batch), {tb['threads']} thread(s); each run in its own process under an "
             f"address-space cap. Peak: the resident set over the process's whole life (construction, training and "
             f"one evaluation batch). Machine: {_memory_machine(d)}. Source: `benchmarks/results/{name}`.", "",
             "| configuration | parameters | steps | peak RSS GiB | bound GiB | training state B/param | s/step "
             "| wall s | loss first → last | met |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in tb["runs"]:
        if not r.get("fits"):
            lines.append(f"| {r['row']} | {r['parameters']:,} | | {r.get('reason') or r.get('error')} ||||||| ")
            continue
        losses = r["losses"]
        lines.append(f"| {r['row']} | {r['parameters']:,} | {len(losses)} | {_gib(r['run_peak_bytes'])} | "
                     f"{_gib(r['peak_bound_bytes'])} | {r['state_bytes_per_parameter']:.2f} | "
                     f"{r['step_seconds']:.1f} | {r['process_wall_seconds']:.0f} | "
                     f"{losses[0]:.3f} → {losses[-1]:.3f} | {'yes' if r['met'] else '**no**'}"
                     f"{'' if r.get('target', True) else ' (not a target configuration)'} |")
    ran = {r["row"] for r in tb["runs"]}
    n = tb["runs"][0]["parameters"] if tb["runs"] else None
    for target in ("descend AdamW, int8 state, step in backward",
                   "descend Lion, bfloat16 params, int8 state, step in backward"):
        measured = [r for r in d.get("table", {}).get("rows", []) if r["row"] == target and r.get("fits")]
        if target in ran or not measured or not n:
            continue
        src = max(measured, key=lambda r: r["parameters"])
        step = src["step_seconds"] * n / src["parameters"]
        lines += ["", f"*{target}* at {n:,} parameters: not run yet. Its step took {src['step_seconds']:.1f} s at "
                      f"{src['size']} in the table; at this size, in proportion, about {step / 60:.0f} minutes a "
                      f"step, {11 * step / 3600:.1f} hours for the run (8-bit state steps on the foreach engine on "
                      f"the CPU). Its training state, {src['state_bytes_per_parameter']:.2f} bytes per parameter "
                      f"at {src['size']}, would take {_gib(src['state_bytes_per_parameter'] * n)} GiB."]
    ta = tb.get("torch_adamw")
    if ta:
        fits = "fits" if ta["fits"] else "does not fit"
        per = ta["peak_bytes_per_parameter"]
        lines += ["", f"`torch.optim.AdamW` (float32) at this size, from its measured {per:.1f} bytes per parameter "
                      f"at {ta['from_size']}: a peak of about {_gib(ta['predicted_peak_bytes'])} GiB against the "
                      f"machine's {_gib(ta['machine_memory_bytes'] or 0)} GiB: it {fits}."]
    return "\n".join(lines)


def _minutes(q: dict[str, Any]) -> str:
    """How long a quality run's training took, from its modes' recorded seconds."""
    seconds = sum(r.get("seconds", 0.0) for r in q["modes"].values())
    threads = q.get("threads", 1)
    return f"{seconds / 60:.0f} minutes of training on {threads} thread{'s' if threads != 1 else ''}"


def memory_quality(name: str | None) -> str:
    """Markdown table of ``benchmarks/memory.py --quality``: final validation loss of each mode, per seed."""
    name, d, q = _memory_part(name, "quality")
    if not q:
        return _not_run("quality run", name, "--quality")
    seeds = q["seeds"]
    lines = [f"A `TransformerLM` of {q['parameters']:,} parameters (width {q['width']}, depth {q['depth']}, "
             f"{q['heads']} heads, context {q['context']}) trained on `stdlib-text` for {q['steps']} steps of "
             f"{q['batch']} windows at descend's default learning rate (AdamW 1e-3, Lion 3e-4), the data split "
             f"fixed, the seed drawing the initial weights and the batches; seeds {', '.join(map(str, seeds))}. "
             f"Final validation loss (nats per byte, 256 windows). A lean mode passes on a seed when its loss is "
             f"within 1% of its float32 mode's mean over the seeds or inside that mode's range. Machine: "
             f"{_memory_machine(d)}; {_minutes(q)}. Source: `benchmarks/results/{name}`.", "",
             "| mode | " + " | ".join(f"seed {s}" for s in seeds) + " | vs float32 mean | passes on |",
             "|---|" + "---:|" * len(seeds) + "---:|---|"]
    for mode, r in q["modes"].items():
        if "val_loss" not in r:
            lines.append(f"| {mode} | {r.get('reason', '')} |" + " |" * (len(seeds) + 1))
            continue
        losses = " | ".join(f"{v:.4f}" for v in r["val_loss"])
        if "relative_to_mean" in r:
            rel = ", ".join(f"{100 * v:+.2f}%" for v in r["relative_to_mean"])
            passes = f"{sum(r['met'])} of {len(r['met'])} seeds (against {r['against']})"
            misses = [v for ok, v in zip(r["met"], r["relative_to_mean"]) if not ok]
            below = sum(v < 0 for v in misses)
            if below:  # a miss can be a lower loss than float32's: say which way they went
                passes += f"; {below} of its {len(misses)} misses a lower loss"
        else:
            rel, passes = "", "the reference"
        lines.append(f"| {mode} | {losses} | {rel} | {passes} |")
    return "\n".join(lines)


def bf16_params(name: str | None) -> str:
    """Markdown table of ``benchmarks/bf16_params.py``'s result: step time of bfloat16 parameters per engine."""
    name = name or "bf16_params.json"
    d = load_result(name)
    caption = (f"Median step time over {d['steps']} steps, {d['tensors']} tensors; the ratio is to float32 "
               f"parameters and state on the same engine and size, measured in the same run. Machine: "
               f"{_machine(d)}.{_load(d)} Source: `benchmarks/results/{name}`.")
    lines = [caption, "", "| optimizer | engine | parameters | mode | ms | ratio |", "|---|---|---:|---|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {r['optimizer']} | {r['engine']} | {_count(r['params'])} | {r['mode']} | "
                     f"{r['median_ms']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def distributed(name: str | None) -> str:
    """Markdown table of ``benchmarks/distributed.py``'s result: steps per second by process count and strategy."""
    name = name or "distributed.json"
    d = load_result(name)
    rows = d["rows"]
    first = rows[0]
    caption = (
        f"{d.get('method') or 'Training steps per second of the same global batch on 1 and more processes'}; "
        f"model size `{d.get('model_size', '?')}` ({_num(first.get('parameters'))} parameters), global batch "
        f"{first.get('global_batch')}, {first.get('steps')} timed steps, {first.get('threads_per_process')} thread(s) "
        f"per process, on {_machine(first)}. Source: `benchmarks/results/{name}`."
    )
    base = next((r["steps_per_s"] for r in rows if r["processes"] == 1), None)
    lines = [caption, "", "| processes | strategy | steps/s | vs 1 process |", "|---:|---|---:|---:|"]
    for r in rows:
        ratio = f"{r['steps_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {r['processes']} | {r['strategy']} | {r['steps_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def distributed_equivalence(name: str | None) -> str:
    """Markdown table of ``benchmarks/distributed.py --equivalence``: multi-process runs against one process."""
    name = name or "distributed_equivalence.json"
    d = load_result(name)
    strategies = list(dict.fromkeys(r["strategy"] for r in d["rows"]))
    cases = list(dict.fromkeys(r["case"] for r in d["rows"]))
    diff = {(r["case"], r["strategy"]): r["max_abs_diff"] for r in d["rows"]}
    caption = f"{d.get('method', 'max abs difference against one process')}; on {_machine(d)}. " \
              f"Source: `benchmarks/results/{name}`."
    lines = [caption, "", "| case | " + " | ".join(strategies) + " |", "|---|" + "---:|" * len(strategies)]
    for case in cases:
        cells = ["" if (case, s) not in diff else f"{diff[case, s]:.2g}" for s in strategies]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_lr(_: str | None = None) -> str:
    """Markdown: each optimizer's default learning rate and weight decay, read from the code: the one
    table (``descend._options.DEFAULT_LR``) that the presets' signatures, ``descend train`` and
    ``descend optimizers`` all take their default from."""
    import inspect

    from descend._options import DEFAULT_LR, FULL_BATCH, OPTIMIZER_NAMES
    from descend.train import optimizer_class

    lines = ["| `--optimizer` | class | default `lr` | default `weight_decay` |", "|---|---|---:|---:|"]
    for name in OPTIMIZER_NAMES:
        cls = optimizer_class(name)
        decay = inspect.signature(cls).parameters["weight_decay"].default
        label = f"`optim.{cls.__name__}`" + (" on the full batch" if name in FULL_BATCH else "")
        lines.append(f"| `{name}` | {label} | {DEFAULT_LR[name]:g} | {decay:g} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ figures

#: Okabe-Ito colours (colour-blind safe), the palette of every descend figure.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
FIGURE_DPI = 100  # the page shows a figure at its size in inches x 100 px: fonts at their point size
_MARKERS = ("o", "s", "D", "^", "v")


def _figure_markdown(fig: Any, alt: str) -> str:
    """A matplotlib figure as a Markdown image: a PNG at twice the page's pixels (sharp on dense screens),
    embedded in the page, with its width in page pixels."""
    import base64
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=2 * FIGURE_DPI)
    width = round(fig.get_figwidth() * FIGURE_DPI)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'![{alt}](data:image/png;base64,{data}){{ width="{width}" }}'


def _new_figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")
    return fig


def _size_name(d: dict[str, Any]) -> str:
    return f"{_count(d['params'])} params"


def _short(name: str) -> str:
    """A row name for a figure's axis: descend's rows without the library's name."""
    return name.removeprefix("descend ").replace("->", "→")


def performance_figure(names: str | None) -> str:
    """Markdown: the figure the performance page leads with, from the ``optimizer_step`` files ``names``
    (comma-separated, smallest first): each optimizer's step time as a multiple of torch's fused AdamW
    in the same run, one marker per file, and its optimizer state in bytes per parameter."""
    if not names:
        raise ValueError("performance-figure needs result files: <!-- generate: performance-figure a.json,b.json -->")
    runs = [(name, load_result(name)) for name in names.split(",")]
    rows = [r["name"] for r in runs[-1][1]["rows"]]  # the largest run's rows, in its order
    state = {r["name"]: r.get("state_bytes_per_param") for _, d in runs for r in d["rows"]}
    height = 0.3 * len(rows) + 1.6
    fig = _new_figure(7.4, height)
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=(3.2, 1))
    y = list(range(len(rows)))
    for k, (_, d) in enumerate(runs):
        ratio = {r["name"]: r.get("vs_torch_fused_adamw") for r in d["rows"]}
        xs = [ratio.get(n) for n in rows]
        left.plot([x for x in xs if x is not None], [i for i, x in zip(y, xs) if x is not None], _MARKERS[k],
                  color=OKABE_ITO[k], markersize=6.5, label=_size_name(d), linestyle="none")  # fmt: skip
    left.axvline(1.0, color="#444444", linewidth=1, linestyle=":")
    left.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    ticks = [0.25, 0.5, 1, 2, 4, 10]
    left.xaxis.set_major_locator(FixedLocator(ticks))
    left.xaxis.set_major_formatter(FormatStrFormatter("%g×"))
    left.xaxis.set_minor_locator(NullLocator())
    left.set_xlabel("step time ÷ torch fused AdamW's\n← faster      slower →", fontsize=11.5)
    left.set_yticks(y, [_short(n) for n in rows], fontsize=10.5)
    left.invert_yaxis()
    left.grid(True, axis="x", alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="outside upper center", ncols=len(runs), fontsize=10.5,
               frameon=False, handletextpad=0.2)  # fmt: skip
    libraries = [n.split(" ", 1)[0] for n in rows]
    for i in range(1, len(rows)):  # a rule between the libraries (descend, torch, ...)
        if libraries[i] != libraries[i - 1]:
            for ax in (left, right):
                ax.axhline(i - 0.5, color="#999999", linewidth=0.8)
    values = [state.get(n) or 0.0 for n in rows]
    right.barh(y, values, color=OKABE_ITO[2], height=0.6)
    for i, v in zip(y, values):
        right.annotate(f"{v:g}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=10)
    right.set_xlim(0, max(values) * 1.35)
    right.set_xlabel("state\nB/param", fontsize=11.5)
    right.grid(True, axis="x", alpha=0.3)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=10.5)
    sources = ", ".join(f"`benchmarks/results/{n}`" for n, _ in runs)
    sizes = ", ".join(f"{_size_name(d)} in {d['tensors']} tensors" for _, d in runs)
    alt = "step time relative to torch fused AdamW and optimizer state bytes per parameter, per optimizer"
    caption = (
        f"Step time of each optimizer as a multiple of `torch.optim.AdamW(fused=True)`'s in the same run "
        f"(left; one marker per run: {sizes}) "
        f"and the optimizer state it keeps per parameter (right; float32 parameters). Sources: {sources}; "
        f"the tables below give every number."
    )
    return _figure_markdown(fig, alt) + "\n\n" + caption


def gd_vs_sgd_figure(name: str | None) -> str:
    """Markdown: the home page's figure from the gd-vs-sgd experiment's JSON (``docs/figures/``): CPU time
    per step and to the target against the data size, GD against SGD, median and range over seeds."""
    import statistics

    d = json.loads((ROOT / (name or "docs/figures/gd-vs-sgd.json")).read_text())
    fig = _new_figure(7.4, 3.5)
    axes = fig.subplots(1, 2)
    sizes = d["sizes"]
    labels = {"GD": "GD (full batch)", "SGD": f"SGD (batch {d['batch']})"}
    panels = (
        ("seconds_per_step", "CPU time per step (ms)", 1e3, "cost of one step"),
        ("seconds_to_target", "CPU time to the target (s)", 1.0, "time to reach the target"),
    )
    for ax, (key, ylabel, scale, title) in zip(axes, panels):
        for k, method in enumerate(("GD", "SGD")):
            per_n = [[v * scale for v in d[key][method][str(n)]] for n in sizes]
            mid = [statistics.median(v) for v in per_n]
            low = [m - min(v) for m, v in zip(mid, per_n)]
            high = [max(v) - m for m, v in zip(mid, per_n)]
            label = f"{labels[method]}, lr {d['tuning'][method]['best_lr']:g}"
            ax.errorbar(sizes, mid, yerr=[low, high], marker=_MARKERS[k], color=OKABE_ITO[k], capsize=3,
                        linewidth=1.8, linestyle=("-", "--")[k], label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training examples N", fontsize=11.5)
        ax.set_ylabel(ylabel, fontsize=11.5)
        ax.set_title(title, fontsize=12)
        ax.tick_params(labelsize=10.5)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=10.5, loc="upper left")
    seeds = len(d["seeds"])
    alt = "gd-vs-sgd: the cost of a full-batch step grows with N; SGD's time to the target does not"
    caption = (
        f"*{d['title']}* Logistic regression with {d['dimension']} features; the target is a held-out loss "
        f"within {d['excess_target']:g} of the true model's. Median and range over {seeds} seeds, from "
        f"`{name or 'docs/figures/gd-vs-sgd.json'}`; the full experiment, with the paths of both methods on a "
        f"two-parameter loss, is on the [experiments page](guide/experiments.md#gd-vs-sgd)."
    )
    return _figure_markdown(fig, alt) + "\n\n" + caption


GENERATORS: dict[str, Callable[[str | None], str]] = {
    "cli-reference": cli_reference,
    "default-lr": default_lr,
    "rule-equations": rule_equations,
    "explain": explain,
    "experiments": experiments,
    "optimizer-step": optimizer_step,
    "optimizer-ratios": optimizer_ratios,
    "performance-figure": performance_figure,
    "gd-vs-sgd-figure": gd_vs_sgd_figure,
    "optimizer-targets": optimizer_targets,
    "attention": attention,
    "trainer-overhead": trainer_overhead,
    "distributed": distributed,
    "generate": generate,
    "text-streaming": text_streaming,
    "state-codes": state_codes,
    "bf16-params": bf16_params,
    "lm-hand-loop": lm_hand_loop,
    "distributed-equivalence": distributed_equivalence,
    "memory": memory,
    "memory-targets": memory_targets,
    "memory-two-billion": memory_two_billion,
    "memory-quality": memory_quality,
}


def expand(markdown: str) -> str:
    """Replace every ``<!-- generate: NAME [ARG] -->`` line by the generator's Markdown."""

    def replace(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in GENERATORS:
            raise KeyError(f"unknown generator {name!r} in a docs page; known: {', '.join(sorted(GENERATORS))}")
        return GENERATORS[name](m.group("arg"))

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return expand(markdown)


# ----------------------------------------------------------------------------------- API reference

#: A Sphinx cross-reference role as the API pages render a docstring's ``:class:`~x.Y``` (the role
#: left as text before the code): ``:class:<code>~x.Y</code>``.
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|const):<code>(?P<target>[^<]*)</code>")
#: A docstring's ``docs/guide/engines.md``, as the API pages render it.
DOCS_PATH = re.compile(r"<code>docs/(?P<path>[\w/.-]+\.md)(?P<anchor>#[\w-]+)?</code>")
#: Private modules that docstrings name, and the page of the site that explains them instead.
PRIVATE_PAGES = {
    "descend.optim.engines": "guide/engines.md#engines-by-name",
    "descend.optim.engines.store": "guide/engines.md#low-precision-state",
    "descend.optim._flat": "guide/engines.md#why-not-flat-buffers-or-torchcompile-by-default",
    "descend.train._data": "guide/training.md#data-tensors-a-dataset-or-a-dataloader",
}


def page_title(path: str) -> str:
    """The ``# Title`` of ``docs/PATH`` (the file name where it has none)."""
    source = ROOT / "docs" / path.split("#")[0]
    first = source.read_text(encoding="utf-8").splitlines()[0] if source.is_file() else ""
    return first[2:].strip() if first.startswith("# ") else Path(path).stem


def _public(target: str) -> str:
    """A dotted name without its private parts: ``x._m.f`` as ``f``, the private module ``x._m`` as ``x``."""
    last = target.rsplit(".", 1)[-1]
    return last if not last.startswith("_") else target.split("._", 1)[0]


def tidy_docstrings(html: str, link: Callable[[str], str | None] = lambda _: None) -> str:
    """Docstrings are written for Sphinx; show what they mean. A role shows the code it names
    (``:func:`x.f``` as ``x.f``, ``:class:`~x.Y``` as ``Y``, ``:meth:`title <x.Y.f>``` as ``title``),
    a paragraph that ends in ``::`` before its code block ends in ``:``, a ``docs/PAGE.md`` path is a
    link to that page (titled as it is), and a private module is never shown: a reference to one links
    the page that explains it (:data:`PRIVATE_PAGES`) or names the public package around it.
    ``link(path)`` turns a path under ``docs/`` into a URL relative to the page (``None``: no such page).
    """

    def to_page(path: str, title: str | None = None) -> str | None:
        url = link(path)
        return None if url is None else f'<a href="{url}">{title or page_title(path)}</a>'

    def shown(m: re.Match[str]) -> str:
        target = m.group("target").strip()
        titled = re.fullmatch(r"(?P<title>.+?)\s*&lt;.+&gt;", target)
        if titled:
            return f"<code>{titled.group('title')}</code>"
        target = target.lstrip("~") if "._" in target else target
        if target in PRIVATE_PAGES:
            return to_page(PRIVATE_PAGES[target]) or (
                f"<code>{_public(target)}</code>"
            )
        if "._" in target:
            return f"<code>{_public(target)}</code>"
        if target.startswith("~"):
            target = target[1:].rsplit(".", 1)[-1]
        return f"<code>{target}</code>"

    def docs_link(m: re.Match[str]) -> str:
        return to_page(m.group("path") + (m.group("anchor") or "")) or m.group(0)

    html = ROLE.sub(shown, html).replace("::</p>", ":</p>")
    return DOCS_PATH.sub(docs_link, html)


def on_page_content(html: str, page: Any = None, files: Any = None, **_: Any) -> str:
    def link(path: str) -> str | None:
        name, _, anchor = path.partition("#")
        target = files.get_file_from_path(name) if files is not None else None
        if target is None or page is None:
            return None
        return target.url_relative_to(page.file) + (f"#{anchor}" if anchor else "")

    return tidy_docstrings(html, link)
