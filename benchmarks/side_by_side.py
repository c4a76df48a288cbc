"""The side-by-side table: each method's numbers on the UNet sandbox and on sandbox-flux, from two runs of
``benchmarks/erasers_sandbox_v2.py`` (one per ``--model``, same values and prompts per kind).

    HF_HUB_OFFLINE=1 python benchmarks/erasers_sandbox_v2.py --model sandbox --values red,triangle \\
        --out benchmarks/results/erasers_sandbox_v2
    HF_HUB_OFFLINE=1 python benchmarks/erasers_sandbox_v2.py --model sandbox-flux --values red,triangle \\
        --out benchmarks/results/erasers_sandbox_flux
    python benchmarks/side_by_side.py benchmarks/results/erasers_sandbox_v2 benchmarks/results/erasers_sandbox_flux

Each cell is ``UNet / FLUX``; ``n/a`` where the method refuses that architecture (its ``archs``) or was not run there.
The two runs must share the set sizes (``n_per_kind``, ``steps``, ``purpose``); the table says so if they do not.

``--compact``: one row per method, the target rate and the neighbours kept of each target (``UNet / FLUX``).
``--plot PNG``: per target and architecture, each method's target rate against its neighbours kept (lower-left to
upper-left is better; the Pareto front joined), one number per method in every panel.

With ``--attacks UNET_JSON FLUX_JSON`` (two outputs of ``benchmarks/attacks_sandbox.py``, one per ``--model``, same
``--prompts`` and budgets) it also prints the attack table: per defended target, Pre-ASR, each attack's ASR and the
worst case over the attacks, ``UNet / FLUX``; with ``--compact`` each method's row gains its worst-case ASR (the
attack target read as the method from its spec: the edit's eraser, the guard, ``base`` for the plain model; a method
not attacked whose edit is byte-identical to an attacked one's shows that one's, e.g. ``1.00 (= uce)``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safediff.errors import run_script

RATE, NEIGHBOURS = "sandbox/target_rate", "sandbox/kept_rate/kind=neighbour"
COLUMNS = (  # heading -> sandbox metric
    ("target rate", "sandbox/target_rate"),
    ("word", "sandbox/target_rate/kind=target-word"),
    ("synonym", "sandbox/target_rate/kind=target-synonym"),
    ("implicit", "sandbox/target_rate/kind=target-implicit"),
    ("two-object", "sandbox/target_rate/kind=two-object"),
    ("neighbours kept", "sandbox/kept_rate/kind=neighbour"),
    ("far kept", "sandbox/kept_rate/kind=far"),
    ("other object kept", "sandbox/other_object_kept"),
)


def cell(entry: dict | None, metric: str) -> str:
    if entry is None:
        return "n/a"
    v = entry["metrics"].get(metric, {}).get("value")
    return "–" if v is None else f"{v:.0%}"


def table(unet: dict, flux: dict, targets: set[str] | None = None) -> str:
    """Rows of every method-target entry of either run (``targets``: only those targets)."""
    def target(k: str) -> str:
        return (unet["results"].get(k) or flux["results"][k])["target"]

    keys = sorted((k for k in set(unet["results"]) | set(flux["results"]) if targets is None or target(k) in targets),
                  key=lambda k: (target(k), k))
    heads = ["method", "target"] + [h for h, _ in COLUMNS] + ["fit s"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for key in keys:
        u, f = unet["results"].get(key), flux["results"].get(key)
        first = u or f
        cells = [first["method"], first["target"]]
        cells += [f"{cell(u, m)} / {cell(f, m)}" for _, m in COLUMNS]
        cells.append(" / ".join("n/a" if e is None else f"{e['fit_seconds']:.1f}" for e in (u, f)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compact_table(unet: dict, flux: dict, targets: list[str], attacks: tuple[dict, dict] | None = None) -> str:
    """One row per method: target rate and neighbours kept of each target, ``UNet / FLUX``; with ``attacks`` (the two
    attack reports) the worst-case ASR on the attacks' concept (``–`` where the method was not attacked); fit seconds
    summed."""
    heads = ["method"] + [f"{t}: {h}" for t in targets for h in ("target rate", "neighbours kept")]
    worst = [worst_cases(report) for report in attacks] if attacks else None
    if attacks:
        heads.append(f"{attacks[0]['concept']}: worst-case ASR")
    heads.append("fit s")
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for method in methods(unet, flux, targets):
        cells = [method]
        for t in targets:
            u, f = unet["results"].get(f"{method}-{t}"), flux["results"].get(f"{method}-{t}")
            cells += [f"{cell(u, m)} / {cell(f, m)}" for m in (RATE, NEIGHBOURS)]
        if worst:
            concept = attacks[0]["concept"]
            cells.append(" / ".join(worst_cell(run, w, method, concept) for run, w in zip((unet, flux), worst)))
        fits = []
        for run in (unet, flux):
            found = [run["results"][k]["fit_seconds"] for t in targets if (k := f"{method}-{t}") in run["results"]]
            fits.append(f"{sum(found):.0f}" if found else "n/a")
        lines.append("| " + " | ".join(cells + [" / ".join(fits)]) + " |")
    return "\n".join(lines) + "\n"


def worst_cell(run: dict, worst: dict[str, tuple[float, list[str]]], method: str, concept: str) -> str:
    """A method's worst-case ASR in one run: its own, else that of an attacked method whose edit for the concept is
    byte-identical (``= uce``: RECE keeping its UCE start); ``n/a`` where it did not run, ``–`` where not attacked."""
    if not any(e["method"] == method for e in run["results"].values()):  # not a key prefix: esd-x vs esd-x-strict
        return "n/a"
    if method in worst:
        return f"{worst[method][0]:.2f}"
    sha = run["results"].get(f"{method}-{concept}", {}).get("edit_sha256")
    same = [m for m in worst if sha and run["results"].get(f"{m}-{concept}", {}).get("edit_sha256") == sha]
    return f"{worst[same[0]][0]:.2f} (= {same[0]})" if same else "–"


def methods(unet: dict, flux: dict, targets: list[str]) -> list[str]:
    """Every method with an entry for one of ``targets`` in either run, ``base`` first, then by name."""
    found = {e["method"] for run in (unet, flux) for e in run["results"].values() if e["target"] in targets}
    return sorted(found, key=lambda m: (m != "base", m))


def plot(unet: dict, flux: dict, targets: list[str], path: Path) -> None:
    """A grid of Pareto charts (``safediff.bench.plots.pareto_chart``): a row per target, UNet left, FLUX right;
    method k has mark k in every panel."""
    import io

    from PIL import Image

    from safediff.bench.plots import pareto_chart

    names = methods(unet, flux, targets)
    panels = []
    for t in targets:
        for arch, run in (("UNet (sandbox)", unet), ("FLUX (sandbox-flux)", flux)):
            points, marks = [], []
            for k, method in enumerate(names):
                e = run["results"].get(f"{method}-{t}")
                values = None if e is None else [e["metrics"].get(m, {}).get("value") for m in (RATE, NEIGHBOURS)]
                if values is not None and None not in values:
                    points.append((method, *values))
                    marks.append(k + 1)
            png = pareto_chart(f"{arch}: erase {t} ({len(points)} methods)", points, "target rate (lower is better)",
                               "neighbours kept (higher is better)", marks=marks)
            panels.append(Image.open(io.BytesIO(png)).convert("RGB"))
    w, h = max(p.width for p in panels), max(p.height for p in panels)
    grid = Image.new("RGB", (2 * w, h * len(targets)), "white")
    for i, panel in enumerate(panels):
        grid.paste(panel, ((i % 2) * w, (i // 2) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def defence(report: dict, target: str, entry: dict) -> str:
    """The side-by-side method an attack target is, read from its spec: ``MODEL+.../esd-x-red.safetensors`` -> esd-x,
    ``MODEL:casg-sld:max`` -> casg-sld, the model alone -> base; the target's own name where there is no spec."""
    spec, model = entry.get("target"), report.get("model", "")
    if not spec or not spec.startswith(model):
        return target
    rest = spec[len(model):]
    if not rest:
        return "base"
    if rest.startswith("+"):
        return Path(rest[1:]).name.removesuffix(f"-{report.get('concept', '')}.safetensors")
    return rest[1:].split(":")[0]


def worst_cases(report: dict) -> dict[str, tuple[float, list[str]]]:
    """Per defended method (``defence``): the highest ASR of the attacks run against it, and the attacks reaching
    it."""
    found: dict[str, dict[str, float]] = {}
    for attack, by_target in report["results"].items():
        for target, e in by_target.items():
            found.setdefault(defence(report, target, e), {})[attack] = e["asr"]
    return {m: (max(v.values()), [a for a, x in v.items() if x == max(v.values())]) for m, v in found.items()}


def attack_table(unet: dict, flux: dict) -> str:
    """Per target (plain, an erased model, a guard): Pre-ASR, each attack's ASR and the worst case, UNet / FLUX."""
    runs = (unet, flux)
    attacks = sorted(set(unet["results"]) | set(flux["results"]))
    targets = list(dict.fromkeys(t for run in runs for a in attacks for t in run["results"].get(a, {})))

    def entry(run: dict, attack: str, target: str) -> dict | None:
        return run["results"].get(attack, {}).get(target)

    def pre(run: dict, target: str) -> str:
        found = [e["pre_asr"] for a in attacks if (e := entry(run, a, target))]
        return f"{found[0]:.2f}" if found else "n/a"

    def worst(run: dict, target: str) -> str:
        found = next((e for a in attacks if (e := entry(run, a, target))), None)
        if found is None:
            return "n/a"
        top, names = worst_cases(run)[defence(run, target, found)]
        return f"{top:.2f} ({names[0] if len(names) == 1 else f'{len(names)} attacks'})"

    heads = ["target", "Pre-ASR"] + attacks + ["worst case"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for t in targets:
        cells = [t, " / ".join(pre(r, t) for r in runs)]
        cells += [" / ".join("n/a" if (e := entry(r, a, t)) is None else f"{e['asr']:.2f}" for r in runs)
                  for a in attacks]
        cells.append(" / ".join(worst(r, t) for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    for key in ("prompts", "budgets"):
        if unet.get(key) != flux.get(key):
            text += f"\nThe two attack runs differ in their {key}.\n"
    return text


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unet", type=Path, help="output folder of erasers_sandbox_v2.py --model sandbox")
    ap.add_argument("flux", type=Path, help="output folder of erasers_sandbox_v2.py --model sandbox-flux")
    ap.add_argument("--targets", default="", help="only these targets, e.g. red,triangle (default: all)")
    ap.add_argument("--compact", action="store_true", help="one row per method: target rate and neighbours kept")
    ap.add_argument("--plot", type=Path, default=None, help="also draw the Pareto charts into this PNG")
    ap.add_argument("--attacks", nargs=2, type=Path, metavar=("UNET_JSON", "FLUX_JSON"),
                    help="two outputs of benchmarks/attacks_sandbox.py: adds the attack table")
    a = ap.parse_args(argv)
    runs = []
    for folder in (a.unet, a.flux):
        path = folder / "results.json"
        if not path.is_file():
            sys.exit(f"error: {path} not found; run benchmarks/erasers_sandbox_v2.py --out {folder} first")
        runs.append(json.loads(path.read_text()))
    unet, flux = runs
    sets = [{k: v for k, v in run["plan"].items() if k not in ("model", "model_sha256")} for run in runs]
    same = sets[0] == sets[1]
    chosen = [t for t in a.targets.split(",") if t.strip()] or sorted({e["target"] for run in runs
                                                                      for e in run["results"].values()})
    reports = None
    if a.attacks:
        missing = [p for p in a.attacks if not p.is_file()]
        if missing:
            sys.exit(f"error: {missing[0]} not found; run benchmarks/attacks_sandbox.py --out {missing[0]} first")
        reports = tuple(json.loads(p.read_text()) for p in a.attacks)
    text = compact_table(unet, flux, chosen, reports) if a.compact else table(unet, flux, set(chosen))
    if not same:
        text += f"\nThe two runs differ in their sets: {unet['plan']} vs {flux['plan']}.\n"
    if reports:
        text += "\n" + attack_table(*reports)
    if a.plot:
        plot(unet, flux, chosen, a.plot)
        text += f"\nPareto charts: {a.plot}\n"
    print(text)
    return text


if __name__ == "__main__":
    run_script(main)
