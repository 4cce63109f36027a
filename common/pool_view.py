"""Text views of the admin socket's replies: the block pool map, pool, seqs and stats.

The map has one cell per block, or, for pools larger than the map, one cell per run of
``k`` consecutive blocks showing the state most of them are in.
"""
from __future__ import annotations

import math
from collections import Counter

import click

# State letter (as the scheduler sends it) -> (name, glyph, colour on a terminal).
STATES = {".": ("free", ".", "bright_black"), "c": ("cached", "o", "blue"),
          "u": ("used", "#", "green"), "s": ("shared", "@", "yellow"),
          "w": ("swapped", "~", "magenta")}
# On a tie, the state shown is the one listed later: busier states win.
PRIORITY = {state: i for i, state in enumerate(STATES)}
MAP_ROWS = {"device": 8, "cpu": 2}


def aggregate(states: str, max_cells: int) -> tuple[str, int]:
    """Fold the per-block ``states`` into at most ``max_cells`` cells of ``k`` consecutive
    blocks each, every cell the state most of its blocks are in; returns (cells, k)."""
    if max_cells < 1:
        raise ValueError(f"the map needs at least one cell, got max_cells={max_cells}")
    per_cell = max(1, math.ceil(len(states) / max_cells))
    if per_cell == 1:
        return states, 1
    cells = [_dominant(states[i:i + per_cell]) for i in range(0, len(states), per_cell)]
    return "".join(cells), per_cell


def _dominant(chunk: str) -> str:
    counts = Counter(chunk)
    return max(counts, key=lambda state: (counts[state], PRIORITY.get(state, -1)))


def render_map(states: str, width: int, rows: int, color: bool) -> list[str]:
    """The map as lines of at most ``width`` cells, ``rows`` lines at most, then its scale."""
    cells, per_cell = aggregate(states, width * rows)
    width = min(width, max(len(cells), 1))
    lines = ["".join(_glyph(state, color) for state in cells[i:i + width])
             for i in range(0, len(cells), width)]
    scale = ("1 cell = 1 block" if per_cell == 1 else
             f"1 cell = {per_cell} blocks (the state most of them are in)")
    return lines + [scale]


def _glyph(state: str, color: bool) -> str:
    _, glyph, colour = STATES.get(state, ("?", "?", None))
    return click.style(glyph, fg=colour) if color and colour else glyph


def legend(color: bool) -> str:
    return "  ".join(f"{_glyph(state, color)} {name}" for state, (name, _, _) in STATES.items())


def render_pool(data: dict, width: int, color: bool) -> str:
    """The ``pagedserve pool`` view of an admin ``pool`` reply."""
    if not data["ready"]:
        return "no executor registered yet: the pools are sized by its handshake"
    lines = []
    for name in ("device", "cpu"):
        c = data[name]
        lines.append(f"{name:>6} {c['total']:>7} blocks: {c['used']:>7} used  {c['free']:>7} free"
                     f"  {c['cached']:>7} cached  {c['shared']:>7} shared   refcounts "
                     f"{_histogram(c['refcounts'])}")
    slots = data["slots"]
    allocated = slots["allocated"]
    utilisation = slots["used"] / allocated if allocated else 1.0
    lines.append(f" slots {slots['used']} of {allocated} allocated hold tokens: utilisation "
                 f"{100 * utilisation:.1f}%, internal fragmentation {100 * (1 - utilisation):.1f}%"
                 f" (block size {data['block_size']})")
    prefix = data["prefix_cache"]
    rate = f"{100 * prefix['hits'] / prefix['queries']:.1f}%" if prefix["queries"] else "-"
    preemptions = ", ".join(f"{k} {v}" for k, v in data["preemptions"].items())
    lines.append(f"prefix cache {prefix['hits']} of {prefix['queries']} prompt tokens hit "
                 f"({rate})   preemptions: {preemptions}")
    lines.append(f"requests: {data['running']} running  {data['waiting']} waiting  "
                 f"{data['swapped']} swapped")
    for name in ("device", "cpu"):
        lines.append(f"{name} map:")
        lines += ["  " + line for line in render_map(data["map"][name], width,
                                                     MAP_ROWS[name], color)]
    lines.append("  " + legend(color))
    return "\n".join(lines)


def _histogram(refcounts: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in refcounts.items()) or "-"


def render_seqs(data: dict) -> str:
    """The ``pagedserve seqs`` table."""
    rows = [f"{'seq':>10}  {'request':<20} {'status':<8} {'tokens':>7} {'computed':>8} "
            + f"{'blocks':>6}"]
    rows += [f"{s['seq_id']:>10}  {s['request_id'][:20]:<20} {s['status']:<8} "
             f"{s['num_tokens']:>7} {s['num_computed_tokens']:>8} {s['num_blocks']:>6}"
             for s in data["seqs"]]
    return "\n".join(rows) if data["seqs"] else "no live sequences"


def render_seq(data: dict) -> str:
    """The ``pagedserve seq ID`` view: the block table, one block a line."""
    head = (f"seq {data['seq_id']} of request {data['request_id']}: {data['status']}, "
            f"{data['num_tokens']} tokens ({data['num_computed_tokens']} computed), "
            f"{len(data['blocks'])} {data['pool']} blocks")
    rows = [f"{'#':>5} {'block':>7} {'refcount':>8} {'fill':>5}"]
    rows += [f"{i:>5} {b['block_id']:>7} {b['refcount']:>8} {b['fill']:>5}"
             for i, b in enumerate(data["blocks"])]
    return "\n".join([head, *rows])


def render_stats(data: dict) -> str:
    """The ``pagedserve stats`` view."""
    rates, queues = data["throughput"], data["queues"]
    tokens = data["tokens"]
    lines = [f"throughput (last {rates['window_s']:g} s): "
             + f"{rates['prompt_tokens_per_s']:.1f} prompt tok/s, "
             + f"{rates['generation_tokens_per_s']:.1f} generated tok/s",
             f"queues: {queues['running']} running  {queues['waiting']} waiting  "
             + f"{queues['swapped']} swapped   finished {data['requests_finished']}, tokens "
             + f"{tokens['prompt']} prompt + {tokens['generation']} generated"]
    for key, name in (("ttft_s", "time to first token"), ("itl_s", "inter-token latency"),
                      ("e2e_s", "end to end")):
        s = data[key]
        lines.append(f"{name:>20}: " + "  ".join(
            f"{q} {_ms(s[q])}" for q in ("p50", "p90", "p99")) + f"  ({s['count']} samples)")
    cost = data.get("step_cost", {})
    if cost.get("steps"):
        lines.append(f"{'step':>20}: p50 {cost['wall_ms_p50']:.1f} ms at {cost['seqs_p50']:g} "
                     f"seqs, {cost['outside_forward_perc']:.2f}% outside the forward pass "
                     f"({cost['steps']} steps, {cost['ahead_perc']:.0f}% sent ahead)")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"
