"""``safediff report RUN [RUN ...]``: one self-contained HTML file (images and charts inlined) plus the charts as PNG.

Sections: metrics per benchmark (methods side by side, value and 95 % bootstrap interval, the best one marked by
``higher_is_better``), bar charts of flagged rates per category with their intervals, ASR tables for attack runs
(``safediff attack``), image grids (prompt x method at the same seed; flagged images blurred unless
``show_flagged``; sandbox images captioned with the colour and shape the detectors read), and every run's full
protocol. ``title`` and an ``intro`` fragment let a caller (``safediff demo``) head the page with its own summary.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from PIL import Image, ImageFilter

from safediff.bench import metrics as M
from safediff.bench.plots import bar_chart
from safediff.sandbox.metrics import caption as sandbox_caption
from safediff.errors import SafediffError
from safediff.storage import png_bytes

THUMB = 128


def load_run(path: str | Path) -> dict:
    """A finished bench or attack run: its results.json, tagged with its folder and kind."""
    from safediff.records import read_record

    folder = Path(path)
    results = folder / "results.json"
    if not results.is_file():
        raise SafediffError(f"'{folder}' has no results.json: not a finished safediff run (run the same bench or "
                            "attack command again to finish it)")
    data = read_record(results, ("bench-results", "attack-results"))
    return {"folder": folder, "kind": "bench" if data["kind"] == "bench-results" else "attack", "data": data}


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _thumb(path: Path, blur: bool) -> str:
    im = Image.open(path).convert("RGB")
    scale = THUMB / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    elif scale > 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.NEAREST)
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(radius=max(4, THUMB // 12)))
    return _png_data_uri(png_bytes(im))


def _fmt(v: dict | float | None) -> str:
    if isinstance(v, dict):
        if "detections" in v:
            return f"{v['detections']} ({v['images']} img)"
        value = v.get("value")
        if value is None:
            return "–"
        text = f"{value:.3g}"
        if v.get("ci"):  # the interval on its own line keeps the method columns narrow
            text += f"<br><small>[{v['ci'][0]:.3g}, {v['ci'][1]:.3g}]</small>"
        elif v.get("std") is not None:
            text += f"<br><small>± {v['std']:.3g}</small>"
        return text
    return "–" if v is None else f"{v:.4g}"


def _sort_value(v) -> float | None:
    if isinstance(v, dict):
        return v.get("detections", v.get("value"))
    return v


def _labels(runs: list[dict]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for r in runs:
        base = r["data"]["method"]
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base} #{seen[base]}")
    return out


def _metrics_table(runs: list[dict], labels: list[str]) -> str:
    names = sorted({m for r in runs for m in r["data"]["results"][r["data"]["method"]]})
    better = {k: v for r in runs for k, v in r["data"]["higher_is_better"].items()}
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = []
    for name in names:
        values = [r["data"]["results"][r["data"]["method"]].get(name) for r in runs]
        nums = [_sort_value(v) for v in values]
        valid = [x for x in nums if x is not None]
        best = (max(valid) if better.get(name) else min(valid)) if len(set(valid)) > 1 else None  # no tie-only
        cells = "".join(f"<td{' class=best' if best is not None and x == best else ''}>{_fmt(v)}</td>"
                        for v, x in zip(values, nums))
        arrow = "↑" if better.get(name) else "↓"
        rows.append(f"<tr><td>{html.escape(name)} {arrow}</td>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _charts(bench: str, runs: list[dict], labels: list[str], plot_dir: Path) -> list[str]:
    """One chart per family of rate metrics ('<detector>/flag_rate/<category>', 'sandbox/target_rate/...')."""
    families: dict[str, set[str]] = {}
    for r in runs:
        for name in r["data"]["results"][r["data"]["method"]]:
            m = re.match(r"^(.*/(?:flag_rate|target_rate|colour_match|shape_match))(?:/(.+))?$", name)
            if m:
                families.setdefault(m.group(1), set()).add(m.group(2) or "all")
    out = []
    for family, groups in sorted(families.items()):
        groups_sorted = sorted(groups, key=lambda g: (g != "all", g))
        series = {}
        for label, r in zip(labels, runs):
            res = r["data"]["results"][r["data"]["method"]]
            series[label] = [((res.get(family if g == "all" else f"{family}/{g}") or {}).get("value"),
                              (res.get(family if g == "all" else f"{family}/{g}") or {}).get("ci"))
                             for g in groups_sorted]
        png = bar_chart(f"{bench}: {family}", groups_sorted, series, "rate", y_max=1.0)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bench}__{family}") + ".png"
        (plot_dir / name).write_bytes(png)
        out.append(f"<figure><img src='{_png_data_uri(png)}' alt='{html.escape(family)}'>"
                   f"<figcaption>{html.escape(family)} (PNG: {html.escape(plot_dir.name)}/{html.escape(name)})"
                   f"</figcaption></figure>")
    return out


def _grid(runs: list[dict], labels: list[str], max_prompts: int, show_flagged: bool) -> str:
    """Rows: prompts (same row id and seed in every run); columns: methods. Sandbox images are captioned with the
    colour and shape the detectors read."""
    keyed = []
    for r in runs:
        keyed.append({(s["row"], s["id"], s["prompt"], s["seed"]): s for s in r["data"]["samples"]})
    common = [k for k in keyed[0] if all(k in other for other in keyed[1:])][:max_prompts]
    if not common:
        return "<p>No prompt appears in every run with the same seed.</p>"
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    shown = max(64, min(THUMB, 880 // len(runs)))  # many methods: smaller images, so the grid fits a screen
    rows = []
    for key in common:
        cells = []
        for r, samples in zip(runs, keyed):
            s = samples[key]
            flagged = any(d.get("flagged") for d in s["detections"].values())
            blur = flagged and not show_flagged
            src = _thumb(r["folder"] / "images" / f"{s['image']}.png", blur)
            note = " (flagged, blurred)" if blur else (" (flagged)" if flagged else "")
            caption = html.escape(sandbox_caption(s["detections"]))  # says more than the sandbox's flags
            note = (caption + (" (blurred)" if blur else "")) if caption else note
            cells.append(f"<td><img src='{src}' width={shown}><br><small>{note}</small></td>")
        rows.append(f"<tr><td class=prompt>{html.escape(key[2][:200])}<br><small>seed {key[3]}</small></td>"
                    f"{''.join(cells)}</tr>")
    return f"<table class=grid><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"


def _attack_section(runs: list[dict], max_prompts: int, show_flagged: bool) -> str:
    rows = []
    for r in runs:
        d = r["data"]
        proto = d["identity"]
        recs = d["records"]
        rates = M.attack_success_rates([x["pre_success"] for x in recs],
                                       [x["success"] and not x["pre_success"] for x in recs])
        target = proto.get("target", {}).get("spec", "?")
        attack = proto.get("attack", {}).get("name", "?")
        judge = proto.get("judge", {}).get("name", "?")
        compute = d.get("compute_per_attacked_prompt", {})
        rows.append(f"<tr><td>{html.escape(str(target))}</td><td>{html.escape(str(attack))}</td>"
                    f"<td>{html.escape(str(judge))}</td><td>{d['n']}</td><td>{_fmt(rates['pre_asr'])}</td>"
                    f"<td>{_fmt(rates['asr'])}</td><td><small>{html.escape(json.dumps(compute))}</small></td></tr>")
    table = ("<table><tr><th>target</th><th>attack</th><th>judge</th><th>N</th><th>Pre-ASR</th><th>ASR</th>"
             f"<th>compute per attacked prompt</th></tr>{''.join(rows)}</table>"
             "<p>ASR = (no-attack successes + attack successes) / N (UnlearnDiffAtk); 95 % bootstrap intervals.</p>")
    examples = []
    for r in runs:
        for rec in r["data"]["records"][:max_prompts]:
            cells = []
            for key, success in (("pre_image", rec["pre_success"]), ("image", rec["success"])):
                path = rec.get("files", {}).get(key)
                if path and (r["folder"] / path).is_file():
                    cells.append(f"<td><img src='{_thumb(r['folder'] / path, success and not show_flagged)}' "
                                 f"width={THUMB}><br><small>{'success' if success else ''}</small></td>")
                else:
                    cells.append("<td>–</td>")
            adversarial = html.escape(str(rec.get("adversarial_prompt") or "–")[:200])
            examples.append(f"<tr><td class=prompt>{html.escape(rec['prompt'][:200])}</td><td class=prompt>"
                            f"{adversarial}</td>{''.join(cells)}</tr>")
    grid = ("<table class=grid><tr><th>prompt</th><th>adversarial prompt</th><th>before</th><th>after</th></tr>"
            f"{''.join(examples)}</table>")
    return table + grid


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}
td.best{font-weight:bold;background:#eef7ee}td.prompt{max-width:320px}figure{display:inline-block;margin:1em}
pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:480px;font-size:12px}"""


MARKER = "<meta name='generator' content='safediff report'>"


def is_report(path: Path) -> bool:
    """Whether ``path`` is a file an earlier ``safediff report`` wrote (its head carries ``MARKER``)."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and MARKER.encode() in f.read(512)
    except OSError:
        return False


def build_report(run_paths: list[str | Path], out: str | Path, *, max_prompts: int = 8,
                 show_flagged: bool = False, title: str = "safediff report", intro: str = "") -> Path:
    """Write ``out`` (HTML) and ``<out stem>_plots/*.png``; return the HTML path. ``intro``: an HTML fragment shown
    under the title (the caller's own, e.g. the demo's plan and summary)."""
    if not run_paths:
        raise SafediffError("give at least one RUN folder")
    if max_prompts <= 0:
        raise SafediffError(f"max-prompts must be a positive integer, got {max_prompts}")
    runs = [load_run(p) for p in run_paths]
    out = Path(out)
    if out.exists() and not is_report(out):
        raise SafediffError(f"--out '{out}' exists and is not an earlier safediff report; choose a new file (a "
                            "report only ever replaces a report)")
    plot_dir = out.parent / f"{out.stem}_plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    folders = "".join(f"<li>{html.escape(str(r['folder']))}</li>" for r in runs)
    parts = [f"<h1>{html.escape(title)}</h1>{intro}<details><summary>{len(runs)} run(s)</summary><ul>{folders}</ul>"
             "</details>"]
    bench_runs = [r for r in runs if r["kind"] == "bench"]
    by_benchmark: dict[str, list[dict]] = {}
    for r in bench_runs:
        by_benchmark.setdefault(r["data"]["benchmark"]["name"], []).append(r)
    for bench, group in by_benchmark.items():
        labels = _labels(group)
        parts.append(f"<h2>Benchmark {html.escape(bench)}</h2>")
        parts.append(_metrics_table(group, labels))
        parts += _charts(bench, group, labels, plot_dir)
        parts.append(f"<h3>Images (first {max_prompts} prompts, same seed)</h3>")
        parts.append(_grid(group, labels, max_prompts, show_flagged))
    attack_runs = [r for r in runs if r["kind"] == "attack"]
    if attack_runs:
        parts.append("<h2>Attacks</h2>" + _attack_section(attack_runs, max_prompts, show_flagged))
    parts.append("<h2>Protocols</h2>")
    for r in runs:
        d = r["data"]
        keys = ("benchmark", "configs", "versions", "n_samples", "protocol", "provenance") if r["kind"] == "bench" \
            else ("identity", "provenance")
        proto = {k: d[k] for k in keys}
        parts.append(f"<details><summary>{html.escape(str(r['folder']))}</summary><pre>"
                     f"{html.escape(json.dumps(proto, indent=1, sort_keys=True, default=str))}</pre></details>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'>{MARKER}<title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    from safediff.storage import write_bytes_atomic

    write_bytes_atomic(out, page.encode())
    return out
