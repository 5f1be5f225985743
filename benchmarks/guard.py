"""The regression guard of `pytest benchmarks/`: each guarded case measures ratios in the run itself
(fae_fast against torch.compile of the same computation, and the fraction of a ceiling measured in the
same run: copy bandwidth or the bf16 matmul rate), compares them with the ratios stored for this GPU kind
in benchmarks/baselines/<gpu>.json, and fails when one falls more than the margin below it. Ratios, not
milliseconds: a machine that runs 5% slow today moves both sides of a ratio.

    pytest benchmarks/                   guarded cases only (about 3 minutes on one H100/H200)
    pytest benchmarks/ --bench-record    the same, then write the measured ratios as this GPU's baseline
    pytest benchmarks/ --bench-full      every benchmark (sweeps, every size and provider, long runs)
    pytest benchmarks/ --bench-margin=0.15

Without a stored baseline for the GPU the run says so and records one. The run ends with one table:
case, ms, vs compile, fraction of ceiling, baseline, verdict.
"""
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

BASELINES = Path(__file__).parent / "baselines"
MARGIN = 0.10
"""A guarded ratio may fall this far (relative) below its baseline before the case fails."""
RATIOS = ("vs_compile", "of_ceiling")


@dataclass
class Result:
    """One guarded case: fae_fast's time, torch.compile's time over it (None: no compiled baseline for this
    case) and the fraction of `ceiling` ('copy' bandwidth or 'bf16' matmul peak) it reaches."""

    case: str
    ms: float
    vs_compile: Optional[float]
    of_ceiling: float
    ceiling: str


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200', the baseline file's name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def baseline_file(gpu_name: str, folder: Path = BASELINES) -> Path:
    return folder / f"{gpu_slug(gpu_name)}.json"


def load_baseline(path: Path) -> Optional[dict]:
    """{case: {ratio: value}} stored for a GPU kind, or None when there is no file."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return data["cases"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"benchmark baseline {path} is unreadable ({e}); delete it and run "
                         f"`pytest benchmarks/ --bench-record` to measure a new one") from e


def save_baseline(path: Path, gpu_name: str, revision: str, results: list[Result]) -> None:
    """Write the ratios of `results` as the baseline of this GPU kind (cases not measured now are kept)."""
    cases = load_baseline(path) or {}
    for r in results:  # each case keeps the revision it was measured at (a run may add cases to an old file)
        cases[r.case] = {**{k: v for k, v in asdict(r).items() if k in RATIOS + ("ms",) and v is not None},
                         "git": revision}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gpu": gpu_name, "cases": dict(sorted(cases.items()))}, indent=1) + "\n")


def judge(result: Result, stored: Optional[dict], margin: float = MARGIN) -> tuple[str, str]:
    """(verdict, why): 'slower' when a ratio fell more than `margin` below its stored value (the case fails),
    'faster' when one rose more than `margin` above it (record a new baseline), 'ok' within the margin,
    'new' when this case has no stored ratios."""
    if not stored:
        return "new", "no stored baseline for this case"
    worse, better = [], []
    for name in RATIOS:
        now, then = getattr(result, name), stored.get(name)
        if now is None or then is None:
            continue
        if now < then * (1 - margin):
            worse.append(f"{name} {now:.3f} < {then:.3f} - {margin:.0%}")
        elif now > then * (1 + margin):
            better.append(f"{name} {now:.3f} > {then:.3f} + {margin:.0%}")
    if worse:
        return "slower", "; ".join(worse)
    if better:
        return "faster", "; ".join(better) + " (--bench-record keeps it)"
    return "ok", ""


def _fmt(value: Optional[float], pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def table(rows: list[tuple[Result, Optional[dict], str]]) -> str:
    """One line per case: case, ms, vs compile, fraction of ceiling, the stored ratios, verdict."""
    head = ("case", "ms", "vs compile", "of ceiling", "baseline (vs compile / of ceiling)", "verdict")
    lines = [head]
    for r, stored, verdict in rows:
        stored = stored or {}
        base = "-" if not stored else (f"{_fmt(stored.get('vs_compile'), '{:.2f}x')} / "
                                       f"{_fmt(stored.get('of_ceiling'), '{:.2f}')}")
        lines.append((r.case, f"{r.ms:.3f}", _fmt(r.vs_compile, "{:.2f}x"), f"{r.of_ceiling:.2f} {r.ceiling}",
                      base, verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
