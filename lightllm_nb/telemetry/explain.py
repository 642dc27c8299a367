"""Why was my request slow? `explain(completion)`: its timeline told in plain words, and in a
notebook a Gantt bar of its phases (queued, prefill, decode, waiting after a preemption).

Only the completion is read (its metrics and timeline, see scheduling/timeline.py), so this works
the same for a completion from an embedded engine, a LocalClient or an engine host over HTTP.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

# Gantt colours per phase; "preempted" is waiting again after a preemption.
PHASE_COLOURS = {"queued": "#b0b0b0", "prefill": "#4c78a8", "decode": "#54a24b", "preempted": "#e45756"}
_NEXT_PHASE = {"queued": "queued", "admitted": "prefill", "first_token": "decode", "preempted": "preempted"}


@dataclass
class Explanation:
    request_id: str
    lines: list[str]
    segments: list[tuple[float, float, str]]   # (start, end, phase), seconds since arrival
    steps: tuple[int, int] | None               # first and last engine step in the timeline

    def __str__(self) -> str:
        return "\n".join(self.lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        total = max((end for _, end, _ in self.segments), default=0.0) or 1.0
        bars = "".join(
            f'<div title="{phase} {end - start:.3f} s" style="position:absolute;left:{100 * start / total:.2f}%;'
            f'width:{max(100 * (end - start) / total, 0.3):.2f}%;height:100%;background:{PHASE_COLOURS[phase]}"></div>'
            for start, end, phase in self.segments)
        legend = " ".join(f'<span style="color:{c}">&#9632;</span> {p}' for p, c in PHASE_COLOURS.items())
        steps = f", steps {self.steps[0]}–{self.steps[1]}" if self.steps else ""
        items = "".join(f"<li>{html.escape(line)}</li>" for line in self.lines[1:])
        return (f'<div><b>{html.escape(self.lines[0])}</b>'
                f'<div style="position:relative;height:14px;background:#eee;margin:4px 0">{bars}</div>'
                f'<small>{legend} (0–{total:.2f} s{steps})</small><ul>{items}</ul></div>')


def phase_segments(timeline: list[dict]) -> list[tuple[float, float, str]]:
    """The timeline as consecutive (start, end, phase) intervals from arrival to finish. After a
    resume a request is in prefill until its first token, else decoding (recomputation included)."""
    segments, phase, since, seen_first = [], None, 0.0, False
    for entry in timeline:
        event, t = entry["event"], entry["t"]
        seen_first = seen_first or event == "first_token"
        if event == "resumed":
            nxt = "decode" if seen_first else "prefill"
        else:
            nxt = _NEXT_PHASE.get(event, "finished" if event == "finished" else phase)
        if nxt == phase:
            continue
        if phase is not None and t > since:
            segments.append((since, t, phase))
        phase, since = nxt, t
    return segments


def phase_totals(timeline: list[dict]) -> dict[str, float]:
    totals = dict.fromkeys(PHASE_COLOURS, 0.0)
    for start, end, phase in phase_segments(timeline):
        totals[phase] += end - start
    return totals


def explain(completion) -> Explanation:
    """A short account of where `completion`'s time went and why, in plain words."""
    m, timeline = completion.metrics or {}, completion.timeline or []
    lines = [_summary(completion, m)]
    lines += _waiting(m, timeline)
    lines += _prompt(completion, m, timeline)
    lines += _preemptions(timeline)
    lines.append(_ending(completion))
    steps = (timeline[0]["step"], timeline[-1]["step"]) if timeline else None
    return Explanation(completion.request_id, lines, phase_segments(timeline), steps)


def _seconds(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _tokens(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 10_000 else str(n)


def _summary(c, m: dict) -> str:
    parts = [f"{c.request_id}: {_seconds(m.get('e2e_latency'))} end to end"]
    phases = [f"{name} {_seconds(m[key])}" for name, key in
              (("queued", "queue_time"), ("prefill", "prefill_time"), ("decode", "decode_time")) if m.get(key) is not None]
    if phases:
        parts.append(": " + ", ".join(phases))
    if m.get("time_per_output_token") is not None:
        parts.append(f" ({c.completion_tokens} tokens, {_seconds(m['time_per_output_token'])} each after the first)")
    return "".join(parts)


def _waiting(m: dict, timeline: list[dict]) -> list[str]:
    """The wait before the first admission, with the scheduler's reasons; deferrals after a
    preemption are told on their own lines."""
    admitted = next((i for i, e in enumerate(timeline) if e["event"] == "admitted"), None)
    before = timeline[:admitted] if admitted is not None else timeline
    deferred = [e for e in before if e["event"] == "deferred"]
    lines = []
    if timeline and (deferred or (admitted is not None and timeline[admitted]["step"] > timeline[0]["step"])):
        end = timeline[admitted] if admitted is not None else timeline[-1]
        why = "; ".join(f"{_defer_reason(e)} ({_times(e)})" for e in deferred)
        if not deferred or deferred[0]["step"] > timeline[0]["step"]:
            behind = ("at first others came first (the step's token budget or the running-request limit was used "
                      "up, or requests ahead of it in fair order were held back for memory and none may overtake)")
            why = behind + (f"; then {why}" if why else "")
        lines.append(f"waited {_seconds(end['t'] - timeline[0]['t'])} before its first step (step {end['step']}): {why}")
    for e in timeline[admitted + 1:] if admitted is not None else ():
        if e["event"] == "deferred":
            lines.append(f"deferred again after its preemption: {_defer_reason(e)} ({_times(e)})")
    return lines


def _times(e: dict) -> str:
    if e["count"] == 1:
        return f"deferred at step {e['step']}"
    return f"deferred {e['count']} times, steps {e['step']}–{e['last_step']}"


def _defer_reason(e: dict) -> str:
    code = e["code"]
    if code == "policy" and "peak" in e:
        return (f"the scheduler kept room for the running requests' expected growth: with this one their predicted "
                f"peak is {_tokens(e['peak'])} tokens, over the limit of {_tokens(e['limit'])} "
                f"(KV capacity {_tokens(e['capacity'])})")
    if code == "policy" and "reserved" in e:
        return (f"the running requests' worst cases reserve {_tokens(e['reserved'])} of {_tokens(e['capacity'])} "
                f"KV tokens; this one needs {_tokens(e['need'])} more")
    if code == "policy" and "free" in e:
        return f"its {_tokens(e['need'])} prompt tokens did not fit in the {_tokens(e['free'])} free KV slots"
    if code == "no_room":
        return f"{_tokens(e['need'])} tokens did not fit in {_tokens(e['free'])} free KV slots"
    if code == "user_cap":
        return f"its user already ran {e['running']} requests, the per-user cap (max_running_per_user={e['cap']})"
    if code == "shared_prefill":
        return ("another request was computing the same prompt prefix: this one waited to take it from the "
                "prefix cache instead of computing it twice")
    return e.get("reason") or code


def _prompt(c, m: dict, timeline: list[dict]) -> list[str]:
    cached = m.get("cached_tokens") or 0
    admitted = next((e for e in timeline if e["event"] == "admitted"), None)
    if cached:
        sources = ", ".join(f"{admitted[k]} {k}" for k in ("own", "declared", "shared") if admitted and admitted.get(k))
        return [f"{cached} of {c.prompt_tokens} prompt tokens came from the prefix cache"
                + (f" ({sources})" if sources else "") + ": their prefill was skipped"]
    if admitted is None:
        return []
    chunks = 0
    for e in timeline:  # the first admission's chunks, up to the first token or a preemption
        if e["event"] in ("first_token", "preempted"):
            break
        chunks += e["event"] == "prefill"
    split = f" in {chunks} chunks" if chunks > 1 else ""
    return [f"no prompt tokens came from the prefix cache: all {c.prompt_tokens} were computed{split}"]


def _preemptions(timeline: list[dict]) -> list[str]:
    lines = []
    for i, e in enumerate(timeline):
        if e["event"] != "preempted":
            continue
        if e["code"] == "pool_full":
            why = "the KV pool was full and no request it outranks was left to preempt"
        elif e["by_priority"] > e["priority"]:
            why = "to make room for a higher-priority request"
        else:
            why = "to make room for an older request of the same priority (the newest goes first)"
        if e.get("by"):
            why += f" ({e['by']})"
        line = (f"preempted at step {e['step']} {why}; {e['kept']} of its {e['computed']} computed tokens "
                "stayed in the prefix cache")
        resumed = next((r for r in timeline[i + 1:] if r["event"] == "resumed"), None)
        if resumed is not None:
            line += (f"; resumed at step {resumed['step']} after {_seconds(resumed['t'] - e['t'])}, "
                     f"{resumed['recomputed']} tokens recomputed")
        lines.append(line)
    return lines


def _ending(c) -> str:
    return {"stop": "finished at a stop token or string",
            "length": f"finished at max_tokens ({c.completion_tokens} tokens)",
            "abort": "aborted (by its caller, or the engine shutting down)",
            "error": f"failed: {c.error or 'the engine step running it raised'}"}.get(c.finish_reason,
                                                                                     f"finished: {c.finish_reason}")
