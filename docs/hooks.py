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
import os
import re
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
    """Markdown: every command's ``--help`` text, at a fixed width of 100 columns."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
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
    head = [
        "| optimizer | ms/step | Mparams/s | bytes/param | GB/s | % triad | vs torch fused AdamW | state B/param "
        "| transient B/param |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [
        f"| {r['name']} | {_num(r.get('ms'))} | {_num(r.get('mparams_per_s'), 0)} | {r.get('bytes_per_param', '')} "
        f"| {_num(r.get('gb_per_s'))} | {_num(r.get('pct_stream'), 0)}% | {_num(r.get('vs_torch_fused_adamw'), 2)}x "
        f"| {_num(r.get('state_bytes_per_param'))} | {_num(r.get('transient_bytes_per_param'), 2)} |"
        for r in d["rows"]
    ]
    return "\n".join([caption, "", *head, *rows])


def optimizer_ratios(_: str | None = None) -> str:
    """Markdown: a few headline ratios (descend against torch fused AdamW) from every optimizer-step file."""
    picks = [
        "descend AdamW [default]",
        "descend SGD-momentum [default]",
        "descend Lion [default]",
        "descend Signum [default]",
        "descend AdamW [compiled, flat]",
        "descend AdamW [compiled]",
        "descend AdamW [foreach]",
        "descend Lion [compiled, flat]",
        "descend Lion bf16 state [compiled, flat]",
        "descend Signum [compiled, flat]",
    ]
    files = sorted(RESULTS.glob("optimizer_step*.json"), key=lambda p: (json.loads(p.read_text())["params"], p.name))
    header = "| optimizer | " + " | ".join(f"`{p.name}`" for p in files) + " |"
    lines = [
        "Step time as a multiple of `torch.optim.AdamW(fused=True)` measured in the same run "
        "(below 1 is faster); a blank cell: not in that run.",
        "",
        header,
        "|---|" + "---:|" * len(files),
    ]
    tables = {p.name: {r["name"]: r for r in json.loads(p.read_text())["rows"]} for p in files}
    for pick in picks:
        cells = [tables[p.name].get(pick, {}).get("vs_torch_fused_adamw") for p in files]
        if any(c is not None for c in cells):
            lines.append(f"| {pick} | " + " | ".join("" if c is None else f"{c:.2f}x" for c in cells) + " |")
    return "\n".join(lines)


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


GENERATORS: dict[str, Callable[[str | None], str]] = {
    "cli-reference": cli_reference,
    "default-lr": default_lr,
    "rule-equations": rule_equations,
    "explain": explain,
    "experiments": experiments,
    "optimizer-step": optimizer_step,
    "optimizer-ratios": optimizer_ratios,
    "optimizer-targets": optimizer_targets,
    "attention": attention,
    "trainer-overhead": trainer_overhead,
    "distributed": distributed,
    "distributed-equivalence": distributed_equivalence,
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


def tidy_docstrings(html: str) -> str:
    """Docstrings are written for Sphinx; show what they mean. A role shows the code it names
    (``:func:`x.f``` as ``x.f``, ``:class:`~x.Y``` as ``Y``, ``:meth:`title <x.Y.f>``` as ``title``),
    and a paragraph that ends in ``::`` before its code block ends in ``:``."""

    def shown(m: re.Match[str]) -> str:
        target = m.group("target").strip()
        titled = re.fullmatch(r"(?P<title>.+?)\s*&lt;.+&gt;", target)
        if titled:
            target = titled.group("title")
        elif target.startswith("~"):
            target = target[1:].rsplit(".", 1)[-1]
        return f"<code>{target}</code>"

    return ROLE.sub(shown, html).replace("::</p>", ":</p>")


def on_page_content(html: str, **_: Any) -> str:
    return tidy_docstrings(html)
