"""The distillation report: ``report/metrics.json``, ``report/report.md``, a self-contained
``report/report.html`` and PNG plots, under a run (or any output) directory.

The headline: ``N% fewer parameters, M× faster, Q% of the teacher's <metric>``: N from total
parameters, M the ratio of throughputs at the larger batch (examples/s for encoders, decode
tokens/s for causal LMs), Q = 100 · student / teacher for a higher-is-better metric; for a
lower-is-better one (perplexity) ``perplexity R× the teacher's`` with R = student / teacher.

``metrics`` (what :mod:`kdistill.eval.evaluate` builds) holds ``run`` (an id: a report directory
holding another run's report is never overwritten silently), ``task``, ``primary_metric``
(``{"name", "lower_is_better"}``) and ``models``: name → ``{"role": "teacher" | "student", "ref",
"size", "speed", "quality", "vs_teacher"}``. Plots need ``matplotlib`` (the ``report`` extra);
without it the report is written without them and says so. Every file is written atomically
(temporary file + ``os.replace``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

from kdistill.errors import ConfigError

log = logging.getLogger(__name__)

REPORT_DIR = "report"
PLOT_FILES = ("training_curves.png", "quality_vs_size.png", "quality_vs_speed.png", "reliability.png")
NOT_LOSS_TERMS = ("step", "lr", "tokens_per_s", "grad_norm")
EVAL_KEYS = ("eval_loss", "accuracy", "perplexity")
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "perplexity": "perplexity", "rouge_l": "ROUGE-L",
                "ece": "ECE", "nll": "NLL"}
NO_MATPLOTLIB = "plots left out: matplotlib is not installed (pip install 'kdistill[report]')"


# ---------------------------------------------------------------------------- headline


def primary_metric(metrics: dict) -> tuple[str, bool]:
    """``(name, lower_is_better)`` of the metric the headline compares."""
    given = metrics.get("primary_metric")
    if given:
        return given["name"], bool(given["lower_is_better"])
    return ("accuracy", False) if metrics.get("task") == "classification" else ("perplexity", True)


def teacher_and_students(metrics: dict) -> tuple[str, list[str]]:
    """The teacher's key in ``metrics["models"]`` and the students' keys, in order."""
    models = metrics["models"]
    teachers = [k for k, v in models.items() if v.get("role", k) == "teacher"]
    if len(teachers) != 1:
        raise ConfigError(f"a report needs exactly one teacher among the models, got {len(teachers)}")
    return teachers[0], [k for k in models if k != teachers[0]]


def _get(model: dict, section: str, key: str) -> float | None:
    value = (model.get(section) or {}).get(key)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _ratio_text(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


def headline(metrics: dict, student: str | None = None) -> dict:
    """The headline of one student (default: the first): text and the numbers behind it.

    ``parameter_reduction`` = 1 − P_S / P_T; ``speedup`` = throughput_S / throughput_T at the larger
    batch; ``quality_ratio`` = metric_S / metric_T.
    """
    teacher_key, students = teacher_and_students(metrics)
    key = student or (students[0] if students else None)
    if key is None:
        return {"text": "no student to compare", "student": None}
    teacher, model = metrics["models"][teacher_key], metrics["models"][key]
    name, lower = primary_metric(metrics)
    parts, out = [], {"student": key, "metric": name, "lower_is_better": lower}
    p_t = ((teacher.get("size") or {}).get("parameters") or {}).get("total")
    p_s = ((model.get("size") or {}).get("parameters") or {}).get("total")
    if p_t and p_s is not None:
        reduction = 1 - p_s / p_t
        out["parameter_reduction"] = reduction
        pct = abs(reduction) * 100
        digits = 1 if 0 < pct < 10 else 0
        parts.append(f"{pct:.{digits}f}% {'fewer' if reduction >= 0 else 'more'} parameters")
    s_t, s_s = _get(teacher, "speed", "throughput"), _get(model, "speed", "throughput")
    if s_t and s_s:
        speedup = s_s / s_t
        out["speedup"] = speedup
        out["speed_unit"] = (model.get("speed") or {}).get("throughput_unit")
        parts.append(f"{_ratio_text(speedup)}× faster" if speedup >= 1 else f"{_ratio_text(1 / speedup)}× slower")
    q_t, q_s = _get(teacher, "quality", name), _get(model, "quality", name)
    label = METRIC_NAMES.get(name, name)
    if q_t and q_s is not None:
        ratio = q_s / q_t
        out["quality_ratio"] = ratio
        if lower:
            parts.append(f"{label} {_ratio_text(ratio)}× the teacher's")
        elif ratio <= 1.5:
            parts.append(f"{100 * ratio:.1f}% of the teacher's {label}")
        else:  # the student beats the teacher by far (e.g. a base teacher on the student's own task format)
            parts.append(f"{label} {q_s:.3g} vs the teacher's {q_t:.3g}")
    out["text"] = ", ".join(parts) if parts else "nothing to compare"
    return out


# ---------------------------------------------------------------------------- curves


def load_curves(curves: str | Path | Iterable[dict] | None) -> list[dict]:
    """Records of ``metrics.jsonl`` (a path, records, or None); malformed lines are skipped with a warning."""
    if curves is None:
        return []
    if isinstance(curves, (str, Path)):
        path = Path(curves)
        if not path.is_file():
            return []
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d: not JSON, skipped", path, n)
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
        return records
    return [r for r in curves if isinstance(r, dict) and "step" in r]


def _split_curves(records: list[dict]) -> tuple[dict[str, list], dict[str, list]]:
    """(training terms, eval metrics): name → [(step, value)]."""
    train: dict[str, list] = {}
    evals: dict[str, list] = {}
    for r in records:
        target = evals if any(k in r for k in EVAL_KEYS) and "loss" not in r else train
        for k, v in r.items():
            if k in NOT_LOSS_TERMS or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            target.setdefault(k, []).append((r["step"], float(v)))
    return train, evals


# ---------------------------------------------------------------------------- plots


def _matplotlib():
    """``(Figure, FigureCanvasAgg)`` or None: the object API only, no pyplot and no global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _png(fig, canvas_cls) -> bytes:
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def render_plots(metrics: dict, records: list[dict]) -> dict[str, bytes] | None:
    """PNG bytes by file name, or None when matplotlib is missing."""
    mpl = _matplotlib()
    if mpl is None:
        return None
    Figure, Canvas = mpl
    plots: dict[str, bytes] = {}
    train, evals = _split_curves(records)
    if train or evals:
        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2) if evals else [fig.subplots(1, 1)]
        ax = axes[0]
        for name, points in train.items():
            ax.plot(*zip(*points), label=name)
        if train and all(v > 0 for points in train.values() for _, v in points):
            ax.set_yscale("log")
        ax.set(title="training loss terms", xlabel="step", ylabel="value")
        if train:
            ax.legend(fontsize=8)
        if evals:
            for name, points in evals.items():
                axes[1].plot(*zip(*points), marker="o", label=name)
            axes[1].set(title="evaluation", xlabel="step")
            axes[1].legend(fontsize=8)
        plots["training_curves.png"] = _png(fig, Canvas)

    name, lower = primary_metric(metrics)
    label = METRIC_NAMES.get(name, name)
    for file, section, key, xlabel in (
        ("quality_vs_size.png", "size", None, "parameters (millions)"),
        ("quality_vs_speed.png", "speed", "throughput", "throughput"),
    ):
        points = []
        for model_name, model in metrics["models"].items():
            y = _get(model, "quality", name)
            if key is None:
                total = ((model.get("size") or {}).get("parameters") or {}).get("total")
                x = total / 1e6 if total else None
            else:
                x = _get(model, section, key)
                unit = (model.get("speed") or {}).get("throughput_unit")
                xlabel = f"throughput ({unit})" if unit else xlabel
            if x is not None and y is not None:
                points.append((x, y, model_name, model.get("role", model_name)))
        if not points:
            continue
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        for x, y, model_name, role in points:
            ax.scatter([x], [y], s=60, marker="*" if role == "teacher" else "o",
                       color="tab:orange" if role == "teacher" else "tab:blue")
            ax.annotate(model_name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
        ax.set(xlabel=xlabel, ylabel=label + (" (lower is better)" if lower else ""),
               title=f"{label} vs {'size' if key is None else 'speed'}")
        ax.margins(0.2)
        ax.grid(alpha=0.3)
        plots[file] = _png(fig, Canvas)

    reliable = [(k, m["quality"]) for k, m in metrics["models"].items() if (m.get("quality") or {}).get("reliability")]
    if reliable:
        fig = Figure(figsize=(4.5 * len(reliable), 4.2))
        axes = fig.subplots(1, len(reliable), squeeze=False)[0]
        for ax, (model_name, quality) in zip(axes, reliable):
            bins = quality["reliability"]
            width = bins[0]["upper"] - bins[0]["lower"]
            filled = [b for b in bins if b["count"]]
            ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
                   edgecolor="black", color="tab:blue", alpha=0.7, label="accuracy")
            ax.bar([b["lower"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled], width=width,
                   bottom=[b["accuracy"] for b in filled], align="edge", color="tab:red", alpha=0.3, label="gap")
            ax.plot([0, 1], [0, 1], "k--", linewidth=1)
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
                   title=f"{model_name}: ECE {quality['ece']:.3f}")
            ax.legend(fontsize=8, loc="upper left")
        plots["reliability.png"] = _png(fig, Canvas)
    return plots


# ---------------------------------------------------------------------------- content


def _num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _quality_columns(metrics: dict) -> list[str]:
    keys: list[str] = []
    for model in metrics["models"].values():
        for k, v in (model.get("quality") or {}).items():
            if k in METRIC_NAMES and isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    return keys


def _sections(metrics: dict, plots: list[str], notes: list[str]) -> list[tuple]:
    """The report as blocks: ("h2", text), ("p", text), ("table", header, rows), ("img", file, alt)."""
    teacher_key, students = teacher_and_students(metrics)
    models = metrics["models"]
    out: list[tuple] = []
    head = metrics.get("headline") or headline(metrics)
    out.append(("headline", head["text"]))
    data = metrics.get("data") or {}
    out.append(("p", f"Task {metrics.get('task')}; run {metrics.get('run')}; held-out data "
                     f"{data.get('source', '?')} ({data.get('examples', '?')} examples)."))

    qcols = _quality_columns(metrics)
    rows = []
    for name, m in models.items():
        size = m.get("size") or {}
        params = size.get("parameters") or {}
        rows.append([name, m.get("ref", ""), _count(params.get("total")), _count(params.get("non_embedding")),
                     _bytes(size.get("file_bytes")), _bytes(size.get("fp32_bytes"))]
                    + [_num((m.get("quality") or {}).get(k)) for k in qcols])
    out += [("h2", "Models"), ("table", ["model", "reference", "parameters", "non-embedding", "weights on disk",
                                         "fp32 size"] + [METRIC_NAMES[k] for k in qcols], rows)]

    speeds = {k: m["speed"] for k, m in models.items() if m.get("speed")}
    if speeds:
        any_speed = next(iter(speeds.values()))
        causal = any_speed.get("kind") == "causal"
        header = ["model", "latency, batch 1 (ms)"]
        header += (["decode, batch 1 (ms/token)", f"prefill (tokens/s, batch {any_speed['batch_size']})",
                    f"decode (tokens/s, batch {any_speed['batch_size']})"] if causal
                   else [f"throughput (examples/s, batch {any_speed['batch_size']})"])
        header.append("peak memory")
        rows = []
        for k, s in speeds.items():
            row = [k, _num(s.get("latency_ms"))]
            row += ([_num(s.get("decode_ms_per_token")), _num(s.get("prefill_tokens_per_s")),
                     _num(s.get("decode_tokens_per_s"))] if causal else [_num(s.get("examples_per_s"))])
            rows.append(row + [_bytes(s.get("peak_memory_bytes"))])
        detail = (f"prompts of {any_speed.get('prompt_tokens')} tokens, {any_speed.get('new_tokens')} greedy decode "
                  "steps with the KV cache" if causal else
                  f"sequence length {any_speed.get('sequence_length')} at the larger batch")
        out += [("h2", "Speed"), ("table", header, rows),
                ("p", f"Device {any_speed.get('device')}"
                      + (f", {any_speed['threads']} threads" if any_speed.get("threads") else "")
                      + f"; {detail}; {any_speed.get('warmup')} warm-up pass(es), median of "
                      f"{any_speed.get('repeats')} repetitions. Peak memory: {any_speed.get('memory_method')}, "
                      "one pass at the larger batch.")]

    compared = {k: models[k]["vs_teacher"] for k in students if models[k].get("vs_teacher")}
    if compared:
        rows = [[k, _num(v.get("kl")), _num(v.get("agreement")),
                 _num(v.get("tokens", v.get("examples")))] for k, v in compared.items()]
        out += [("h2", "Student vs teacher"),
                ("table", ["student", "KL(p_T ‖ p_S), mean", "top-1 agreement", "positions"], rows),
                ("p", "Forward KL of the student from the teacher, per position (token or example), mean over "
                      "valid positions; agreement: fraction of positions where both argmaxes agree.")]

    if "reliability.png" in plots or any("ece" in (m.get("quality") or {}) for m in models.values()):
        out += [("h2", "Calibration"),
                ("p", "Expected calibration error over 15 equal-width confidence bins: "
                      "ECE = Σ_b |B_b|/n · |acc_b − conf_b|. "
                      + ", ".join(f"{k}: {_num((m.get('quality') or {}).get('ece'))}" for k, m in models.items()))]
        if "reliability.png" in plots:
            out.append(("img", "reliability.png", "reliability diagrams"))

    samples = {k: m["quality"].get("samples") for k, m in models.items() if (m.get("quality") or {}).get("samples")}
    if samples:
        out.append(("h2", "Generations (greedy, first examples)"))
        for k, texts in samples.items():
            out.append(("table", [k], [[t] for t in texts]))

    charts = [p for p in ("quality_vs_size.png", "quality_vs_speed.png") if p in plots]
    if charts:
        out.append(("h2", "Trade-offs"))
        out += [("img", p, p[:-4].replace("_", " ")) for p in charts]

    training = metrics.get("training") or {}
    if training or "training_curves.png" in plots:
        out.append(("h2", "Training"))
        facts = [f"{k.replace('_', ' ')} {_num(v)}" for k, v in training.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        final = training.get("final_eval") or {}
        facts += [f"final {k} {_num(v)}" for k, v in final.items()]
        if facts:
            out.append(("p", "; ".join(facts) + "."))
        if "training_curves.png" in plots:
            out.append(("img", "training_curves.png", "training curves"))

    if notes:
        out += [("h2", "Notes"), ("list", notes)]
    return out


def _markdown(title: str, blocks: list[tuple]) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        kind = block[0]
        if kind == "headline":
            lines += [f"**{block[1]}**", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            def cell(x: str) -> str:
                return str(x).replace("|", "\\|").replace("\n", " ")

            lines.append("| " + " | ".join(cell(h) for h in block[1]) + " |")
            lines.append("|" + "---|" * len(block[1]))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block[2]]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2330;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde2ea}
.headline{font-size:1.35rem;font-weight:600;background:#eef4ff;border-left:5px solid #3869d4;padding:.8rem 1rem;
border-radius:4px}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #d4d9e2;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f5f9}td{font-variant-numeric:tabular-nums}
img{max-width:100%;display:block;margin:.8rem 0;border:1px solid #e3e6ec}
footer{margin-top:2rem;color:#6b7385;font-size:.85rem}
"""


def _html(title: str, blocks: list[tuple], images: dict[str, bytes]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind == "headline":
            body.append(f'<p class="headline">{e(block[1])}</p>')
        elif kind == "h2":
            body.append(f"<h2>{e(block[1])}</h2>")
        elif kind == "p":
            body.append(f"<p>{e(block[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img" and block[1] in images:
            data = base64.b64encode(images[block[1]]).decode("ascii")
            body.append(f'<img alt="{e(block[2])}" src="data:image/png;base64,{data}">')
    body.append("<footer>Written by kdistill evaluate. Every number is in metrics.json.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finite(value):
    """JSON-safe copy: non-finite floats become None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def check_report_owner(report_dir: Path, run: str, force: bool) -> None:
    """Refuse to overwrite ``report_dir`` holding the report of another run (unless ``force``)."""
    existing = report_dir / "metrics.json"
    if force or not existing.exists():
        return
    try:
        old = json.loads(existing.read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        old = None
    if old != run:
        raise ConfigError(f"{existing} holds the report of another run ({old!r}, not {run!r}); "
                          "choose another output directory or pass --force to overwrite it")


def write_report(out_dir: str | Path, metrics: dict, curves: str | Path | Iterable[dict] | None = None, *,
                 force: bool = False, title: str | None = None) -> dict:
    """Write ``out_dir/report/{metrics.json, report.md, report.html, *.png}``.

    ``curves``: ``metrics.jsonl`` (path or records) for the training curves. Returns
    ``{"dir", "metrics", "markdown", "html", "plots": [paths], "headline": str}``.
    Raises :class:`ConfigError` when the directory holds the report of a different ``run`` id.
    """
    if not metrics.get("run"):
        raise ConfigError("metrics for a report need a 'run' id")
    target = Path(out_dir) / REPORT_DIR
    check_report_owner(target, metrics["run"], force)
    target.mkdir(parents=True, exist_ok=True)
    records = load_curves(curves)
    metrics = {**metrics, "headline": headline(metrics)}
    notes = list(metrics.get("notes") or [])
    plots = render_plots(metrics, records)
    if plots is None:
        log.warning(NO_MATPLOTLIB)
        notes.append(NO_MATPLOTLIB)
        plots = {}
    for name in PLOT_FILES:  # our own plots from an earlier write that this one does not have
        if name not in plots and (target / name).exists():
            (target / name).unlink()
    for name, data in plots.items():
        _atomic_write(target / name, data)
    metrics["notes"] = notes
    metrics["report"] = {"plots": sorted(plots), "files": ["metrics.json", "report.md", "report.html", *sorted(plots)]}
    blocks = _sections(metrics, list(plots), notes)
    title = title or f"Distillation report: {metrics.get('name') or metrics['run']}"
    _atomic_write(target / "report.md", _markdown(title, blocks))
    _atomic_write(target / "report.html", _html(title, blocks, plots))
    _atomic_write(target / "metrics.json", json.dumps(_finite(metrics), indent=2, allow_nan=False) + "\n")
    return {"dir": target, "metrics": target / "metrics.json", "markdown": target / "report.md",
            "html": target / "report.html", "plots": [target / p for p in sorted(plots)],
            "headline": metrics["headline"]["text"]}
