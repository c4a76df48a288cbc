"""How far results of different routes drift apart on this machine's CPU kernels: the evidence behind every float
bound in the test suite (``tests/float_bounds.py``).

Runs the test suite (or the given test files) once per setting, ``ATEN_CPU_CAPABILITY`` in default / avx2 / avx512
(avx512 only where the CPU has it) x ``OMP_NUM_THREADS`` in 1 / 2, with ``SAFEDIFF_FLOAT_MEASURE`` set so every
``assert_close`` records its difference instead of asserting. Prints, per comparison site, its bound, the largest
difference under each setting, and the margin (bound / largest difference); a setting is green when pytest passed
and no site exceeded its bound. One-thread runs go two at a time (this machine has 2 cores), two-thread runs alone.

    python benchmarks/float_noise.py --json benchmarks/results/float_noise.json
    python benchmarks/float_noise.py tests/test_guard_sld.py tests/test_guard_safree.py   # a few files
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safediff.errors import run_script

ROOT = Path(__file__).resolve().parents[1]


def capabilities() -> list[str]:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return ["default", "avx2"] + (["avx512"] if "avx512f" in flags else [])


def run_setting(cap: str, threads: int, tests: list[str], folder: Path) -> dict:
    log = folder / f"{cap}-{threads}.jsonl"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "SAFEDIFF_FLOAT_MEASURE": str(log)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    failed = [x.split(" ")[1] for x in proc.stdout.splitlines() if x.startswith("FAILED ")]
    return {"setting": f"{cap}/{threads}t", "pytest_rc": proc.returncode, "pytest": tail, "failed": failed,
            "seconds": round(time.monotonic() - start, 1), "comparisons": rows}


def summarise(results: list[dict]) -> dict:
    sites: dict[str, dict] = defaultdict(lambda: {"bound": None, "relative": False, "by_setting": {}, "tests": set()})
    for r in results:
        for c in r["comparisons"]:
            s = sites[c["site"]]
            s["bound"], s["relative"] = c["bound"], c["relative"]
            s["tests"].add(c["test"])
            prev = s["by_setting"].get(r["setting"], 0.0)
            s["by_setting"][r["setting"]] = max(prev, c["error"])
    out = {}
    for site, s in sorted(sites.items()):
        worst = max(s["by_setting"].values())
        out[site] = {"bound": s["bound"], "relative": s["relative"], "max_difference": worst,
                     "margin": (s["bound"] / worst) if worst > 0 else None, "by_setting": s["by_setting"],
                     "tests": sorted(s["tests"])}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tests", nargs="*", help="test files or node ids (default: the whole suite)")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    args = ap.parse_args(argv)
    settings = [(cap, t) for t in (1, 2) for cap in capabilities()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        one = [s for s in settings if s[1] == 1]
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda s: run_setting(*s, args.tests, folder), one))
        results += [run_setting(*s, args.tests, folder) for s in settings if s[1] == 2]
    sites = summarise(results)
    names = [r["setting"] for r in results]
    print("| site | bound | " + " | ".join(names) + " | margin |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for site, s in sites.items():
        cells = [f"{s['by_setting'].get(n, float('nan')):.1e}" for n in names]
        margin = "exact" if s["margin"] is None else f"{s['margin']:.0f}x"
        kind = " (rel)" if s["relative"] else ""
        print(f"| {site} | {s['bound']:.0e}{kind} | " + " | ".join(cells) + f" | {margin} |")
    print()
    for r in results:
        over = [site for site, s in sites.items() if s["by_setting"].get(r["setting"], 0) > s["bound"]]
        green = r["pytest_rc"] == 0 and not over
        print(f"{r['setting']}: {'green' if green else 'RED'} ({r['pytest']}; {r['seconds']} s)"
              + (f"; failed: {', '.join(r['failed'])}" if r["failed"] else "")
              + (f"; over bound: {', '.join(over)}" if over else ""))
    record = {"settings": [{k: v for k, v in r.items() if k != "comparisons"} for r in results], "sites": sites}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


if __name__ == "__main__":
    run_script(main)
