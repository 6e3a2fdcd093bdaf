"""The demo's report: one self-contained HTML file (every image inline as base64 PNG or GIF).

    success before / after RL     simulator success with Wilson 95% intervals (bar chart + table)
    imagined vs real              the dynamics service's frames next to the real ones (animated GIF)
    value curves                  the value service's scores over real episodes, success vs failure
    advantages                    histogram of the run's imagined-chunk advantages (advantages.json)
    throughput, stage timings     the run's metrics.jsonl: loss, imagined samples/s, service time split
    gate                          the run's gate.json, when the run evaluated versions itself
    demo stages                   wall time of every stage of the demo and the total

The builder only reads what it is given and the run folder the trainer wrote
(`<run_dir>/status.json`, `metrics.jsonl`, `advantages.json`, `gate.json`); it computes nothing
about the models, so a report can be rebuilt from a finished run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rise.sim.stats import wilson_interval

BIN_EDGES = np.linspace(-1.0, 1.0, 11)  # the reference's 10 uniform advantage bins on [-1, 1]


# ---- inputs ------------------------------------------------------------------------------------
@dataclass
class SuccessRate:
    """One simulator evaluation of one policy version."""

    label: str  # "before RL", "after RL"
    version: str  # the version that answered
    successes: int
    episodes: int
    mean_steps: float | None = None
    wall_s: float | None = None

    @classmethod
    def from_eval(cls, label: str, report) -> "SuccessRate":
        """From a `rise.sim.evaluate.EvalReport`."""
        versions = ", ".join(sorted(report.versions)) or report.requested_version
        steps = [e.steps for e in report.episodes]
        return cls(label, versions, report.successes, len(report.episodes),
                   float(np.mean(steps)) if steps else None, report.wall_s)

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)


@dataclass
class ImaginedSamples:
    """Held-out windows: history frames, the real future and the dynamics model's imagined future."""

    views: list[str]
    history: np.ndarray  # uint8 [B, V, T, H, W, 3]
    real: np.ndarray  # uint8 [B, V, F, H, W, 3]
    imagined: np.ndarray  # uint8 [B, V, F, H, W, 3]
    captions: list[str]  # one per window
    dynamics_version: str = ""


@dataclass
class ValueCurve:
    label: str
    success: bool
    values: np.ndarray  # float32 [T]
    held_out: bool = False


@dataclass
class ReportInputs:
    task: str
    title: str = "RISE demo"
    before: SuccessRate | None = None
    after: SuccessRate | None = None
    run_dir: Path | None = None
    imagined: ImaginedSamples | None = None
    value_curves: list[ValueCurve] = field(default_factory=list)
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # (stage, seconds, note)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---- small helpers -------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png(fig) -> str:
    """A matplotlib Figure (no pyplot, no global backend) -> data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return _data_uri(buffer.getvalue(), "image/png")


def _figure(width: float = 6.4, height: float = 3.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _duration(seconds: float) -> str:
    minutes, s = divmod(seconds, 60)
    return f"{int(minutes)} min {s:04.1f} s" if minutes else f"{s:.1f} s"


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written when we read
                continue
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


# ---- sections ------------------------------------------------------------------------------------
def _success_section(before: SuccessRate | None, after: SuccessRate | None) -> str:
    rates = [r for r in (before, after) if r is not None]
    if not rates:
        return "<p>No simulator evaluation ran.</p>"
    rows = []
    for r in rates:
        lo, hi = r.interval
        rows.append([r.label, r.version, f"{r.successes}/{r.episodes}", f"{r.rate:.0%}", f"[{lo:.0%}, {hi:.0%}]",
                     _fmt(r.mean_steps, 1), _fmt(r.wall_s, 1)])
    out = _table(["policy", "version", "successes", "rate", "Wilson 95%", "mean steps", "eval s"], rows)
    fig = _figure(4.8, 2.8)
    ax = fig.add_subplot()
    x = np.arange(len(rates))
    values = [r.rate for r in rates]
    lower = [r.rate - r.interval[0] for r in rates]
    upper = [r.interval[1] - r.rate for r in rates]
    ax.bar(x, values, color=["#9aa5b1", "#2f7ed8"][:len(rates)], yerr=[lower, upper], capsize=8)
    ax.set_xticks(x, [f"{r.label}\n{r.version}" for r in rates])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title("simulator success (Wilson 95% interval)", fontsize=10)
    out += _img(_png(fig), "success before and after")
    if before is not None and after is not None:
        (b_lo, b_hi), (a_lo, a_hi) = before.interval, after.interval
        overlap = not (a_lo > b_hi or b_lo > a_hi)
        verdict = ("the intervals overlap: with this many episodes the difference is not significant"
                   if overlap else "the intervals do not overlap")
        out += (f"<p>Change: {after.rate - before.rate:+.0%} ({before.successes}/{before.episodes} &rarr; "
                f"{after.successes}/{after.episodes} on the same held-out layouts); {verdict}.</p>")
    return out


def _imagined_section(samples: ImaginedSamples | None, assets: Path) -> str:
    if samples is None:
        return "<p>No imagined rollouts were made.</p>"
    from services.dynamics.train import psnr, sample_grid, write_gif

    gif = write_gif(assets / "imagined_vs_real.gif", sample_grid(samples.history, samples.real,
                                                                  {"imagined": samples.imagined}), fps=2)
    last = np.repeat(samples.history[:, :, -1:], samples.real.shape[2], axis=2)
    rows = [[f"window {i}: {c}", _fmt(psnr(samples.imagined[i], samples.real[i])), _fmt(psnr(last[i], samples.real[i]))]
            for i, c in enumerate(samples.captions)]
    rows.append(["all", _fmt(psnr(samples.imagined, samples.real)), _fmt(psnr(last, samples.real))])
    return (f"<p>Dynamics {_e(samples.dynamics_version)} on held-out windows, views {_e(', '.join(samples.views))} "
            "left to right. Per window the top row is real, the bottom row imagined from the history frames (green "
            "border) and the recorded action chunk; imagined frames have a red border.</p>"
            + _img(_data_uri(gif.read_bytes(), "image/gif"), "real vs imagined futures")
            + "<p>PSNR (dB) of the future frames against the real ones; the floor is persistence (the last history "
              "frame repeated).</p>"
            + _table(["window", "imagined", "persistence"], rows))


def _value_section(curves: list[ValueCurve]) -> str:
    if not curves:
        return "<p>No value curves.</p>"
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    for c in curves:
        t = np.linspace(0.0, 1.0, len(c.values)) if len(c.values) > 1 else np.zeros(len(c.values))
        ax.plot(t, c.values, color="tab:green" if c.success else "tab:red", ls="-" if c.held_out else "--", lw=1.5,
                label=f"{c.label} ({'success' if c.success else 'failure'}, {len(c.values)} frames"
                      f"{', held out' if c.held_out else ''})")
    ax.set_xlabel("episode progress (frame / length)")
    ax.set_ylabel("V (value service)")
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7, loc="best")
    rows = [[c.label, "success" if c.success else "failure", "yes" if c.held_out else "no", len(c.values),
             _fmt(float(c.values[0])), _fmt(float(c.values[-1])), _fmt(float(np.mean(c.values)))] for c in curves]
    return (_img(_png(fig), "value curves")
            + _table(["episode", "outcome", "held out", "frames", "V first", "V last", "V mean"], rows))


def _advantage_section(run_dir: Path | None) -> str:
    values = _read_json(run_dir / "advantages.json") if run_dir is not None else None
    if not values:
        return "<p>The run wrote no advantages.</p>"
    a = np.asarray(values, np.float64)
    counts = np.bincount(np.digitize(a, BIN_EDGES[:-1]), minlength=11)[1:]
    fig = _figure(6.4, 2.8)
    ax = fig.add_subplot()
    ax.hist(a, bins=BIN_EDGES, color="#2f7ed8", edgecolor="white")
    ax.set_xlabel("advantage A = clamp(5 mean(V(imagined) - V(current)), -1, 1); one bar per bin", fontsize=8)
    ax.set_ylabel("imagined chunks")
    return (_img(_png(fig), "advantage histogram")
            + f"<p>{len(a)} most recent imagined chunks (the run keeps at most 2048): mean {a.mean():+.3f}, "
              f"std {a.std():.3f}; share in the best bin (10): {counts[-1] / len(a):.1%}.</p>"
            + _table(["bin"] + [str(i) for i in range(1, 11)], [["chunks"] + counts.tolist()]))


def _run_section(run_dir: Path | None) -> str:
    if run_dir is None:
        return "<p>No RL run.</p>"
    status = _read_json(run_dir / "status.json") or {}
    rows = read_jsonl(run_dir / "metrics.jsonl")
    out = _table(["run", "state", "learner steps", "imagined samples", "policy version", "message"],
                 [[status.get("run_id", run_dir.name), status.get("state", "?"), status.get("learner_step", "?"),
                   status.get("imagined_samples", "?"), status.get("policy_version", "?"), status.get("message", "")]])
    if not rows:
        return out + "<p>The run wrote no metrics.</p>"
    steps = np.array([r.get("step", i + 1) for i, r in enumerate(rows)])
    fig = _figure(8.0, 2.8)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(steps, [r.get("loss", np.nan) for r in rows], color="tab:blue")
    ax1.set_title("learner loss", fontsize=9)
    ax2.plot(steps, [r.get("imagined_per_s", np.nan) for r in rows], color="tab:green")
    ax2.set_title("imagined samples / s", fontsize=9)
    ax3.plot(steps, [r.get("replay_depth", np.nan) for r in rows], color="tab:orange", label="replay depth")
    ax3.plot(steps, [r.get("staleness", np.nan) for r in rows], color="tab:purple", label="staleness (versions)")
    ax3.legend(fontsize=7)
    ax3.set_title("replay", fontsize=9)
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("learner step", fontsize=8)
        ax.tick_params(labelsize=7)
    out += _img(_png(fig), "run metrics")

    last = rows[-1]
    service_s = {k: float(last.get(f"time_{k}_s", 0.0)) for k in ("policy", "dynamics", "value")}
    total_service = sum(service_s.values())
    wall = (rows[-1].get("unix_ms", 0) - rows[0].get("unix_ms", 0)) / 1000 if len(rows) > 1 else float("nan")
    step_s = [r["step_s"] for r in rows if "step_s" in r]
    table = [
        ["learner steps", last.get("step")],
        ["imagined samples", _fmt(last.get("imagined_samples"), 0)],
        ["imagined samples / s (rollout time)", _fmt(last.get("imagined_per_s"))],
        ["learner step s (median)", _fmt(float(np.median(step_s))) if step_s else "-"],
        ["learner steps / s (wall, first to last step)", _fmt((len(rows) - 1) / wall) if wall and wall > 0 else "-"],
        ["replay share of a batch (mean)", _fmt(float(np.mean([r.get("replay_fraction", np.nan) for r in rows])))],
        ["push share of rollout time", _fmt(last.get("push_share"))],
        ["replay depth (last)", _fmt(last.get("replay_depth"), 0)],
        ["staleness, versions (mean)", _fmt(float(np.nanmean([r.get("staleness", np.nan) for r in rows])))],
    ]
    for name, seconds in service_s.items():
        share = seconds / total_service if total_service else float("nan")
        table.append([f"time in {name} service calls", f"{seconds:.1f} s ({share:.0%})" if total_service else "-"])
    return out + _table(["throughput", "value"], table)


def _gate_section(run_dir: Path | None) -> str:
    history = _read_json(run_dir / "gate.json") if run_dir is not None else None
    if not history:
        return "<p>The run's own gate did not evaluate any version (the demo evaluates before and after itself).</p>"
    rows = []
    for h in history:
        lo, hi = h.get("wilson95", [float("nan")] * 2)
        rows.append([h.get("version"), h.get("role"), h.get("learner_step"), f"{h.get('successes')}/{h.get('episodes')}",
                     f"[{lo:.0%}, {hi:.0%}]", "yes" if h.get("promoted") else "no", _fmt(h.get("p_value"), 3),
                     h.get("compared_with", "")])
    return _table(["version", "role", "learner step", "successes", "Wilson 95%", "promoted", "p", "compared with"], rows)


def _stages_section(stages: list[tuple[str, float, str]]) -> str:
    if not stages:
        return ""
    total = sum(s for _, s, _ in stages)
    rows = [[name, _duration(seconds), f"{seconds / total:.0%}" if total else "-", note] for name, seconds, note in stages]
    rows.append(["total", _duration(total), "100%", ""])
    return _table(["stage", "wall time", "share", "note"], rows)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; } th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0; image-rendering: pixelated; }
.note { color: #555; font-size: 0.9em; }
"""


def build_report(inputs: ReportInputs, path: Path) -> Path:
    """Write the report to `path` (assets such as the GIF also go to `<path stem>_assets/`); returns path."""
    path = Path(path)
    assets = path.parent / f"{path.stem}_assets"
    assets.mkdir(parents=True, exist_ok=True)
    run_dir = Path(inputs.run_dir) if inputs.run_dir is not None else None
    settings = _table(["setting", "value"], [[k, v] for k, v in inputs.settings.items()]) if inputs.settings else ""
    notes = "".join(f"<li>{_e(n)}</li>" for n in inputs.notes)
    sections = [
        ("Success in the simulator, before and after RL in imagination", _success_section(inputs.before, inputs.after)),
        ("Imagined vs real rollouts", _imagined_section(inputs.imagined, assets)),
        ("Value curves on real episodes", _value_section(inputs.value_curves)),
        ("Advantages of imagined chunks", _advantage_section(run_dir)),
        ("RL run: throughput and timings", _run_section(run_dir)),
        ("Gate history", _gate_section(run_dir)),
        ("Demo stages", _stages_section(inputs.stages)),
        ("Settings", settings),
    ]
    body = "".join(f"<h2>{_e(title)}</h2>\n{content}\n" for title, content in sections if content)
    document = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(inputs.title)}: {_e(inputs.task)}</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>{_e(inputs.title)}: {_e(inputs.task)}</h1>\n"
        f"<p class=\"note\">Written {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}"
        + (f"; run folder <code>{_e(run_dir)}</code>" if run_dir is not None else "") + ".</p>\n"
        + (f"<ul class=\"note\">{notes}</ul>\n" if notes else "")
        + body + "</body></html>\n")
    path.write_text(document, encoding="utf-8")
    return path
