"""Turn pytest-benchmark JSON into the README's performance table: per op and mode, ms of each provider,
the fused version's GB/s and fraction of the copy bandwidth measured in the same run, and its speed-up
over torch.compile and eager torch.

    python benchmarks/summarize.py results.json
"""
import argparse
import json
import re
from pathlib import Path
from collections import defaultdict

PROVIDERS = ("torch", "torch.compile", "fae_fast")


def _case_without_provider(name: str) -> tuple[str, str]:
    """'test_x[layer-fae_fast-full-1152]' -> ('test_x[layer-full-1152]', 'fae_fast')."""
    match = re.match(r"(.*)\[(.*)\]", name)
    if not match:
        return name, ""
    base, params = match.groups()
    parts = params.split("-")
    provider = next((p for p in ("torch.compile", "fae_fast", "torch") if p in parts), "")
    if provider == "torch" and "compile" in params:  # 'torch.compile' never splits, kept for clarity
        provider = "torch.compile"
    rest = [p for p in parts if p != provider]
    return f"{base}[{'-'.join(rest)}]", provider


def table(results: dict) -> str:
    cases = defaultdict(dict)
    gpu = ""
    for bench in results["benchmarks"]:
        case, provider = _case_without_provider(bench["name"])
        extra = bench.get("extra_info", {})
        gpu = extra.get("gpu", gpu)
        cases[case][provider] = {"ms": bench["stats"]["median"] * 1e3} | extra  # extra's ms is per launch
    lines = [f"GPU: {gpu}", "",
             "| case | torch ms | torch.compile ms | fae_fast ms | fae_fast GB/s | of copy BW | x compile | x torch |",
             "|---|---|---|---|---|---|---|---|"]
    for case, by in sorted(cases.items()):
        ms = {p: by[p]["ms"] for p in PROVIDERS if p in by}
        fused = by.get("fae_fast", {})
        row = [case] + [f"{ms[p]:.3f}" if p in ms else "" for p in PROVIDERS]
        row.append(f"{fused['GB/s']:.0f}" if "GB/s" in fused else "")
        row.append(f"{fused['fraction_of_copy_bw']:.2f}" if "fraction_of_copy_bw" in fused else "")
        for base in ("torch.compile", "torch"):
            row.append(f"{ms[base] / ms['fae_fast']:.2f}" if base in ms and "fae_fast" in ms else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files (pytest --benchmark-json=FILE)")
    for path in parser.parse_args(argv).results:
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            parser.error(f"{path}: not a readable pytest-benchmark JSON file ({type(err).__name__}: {err})")
        print(table(results))


if __name__ == "__main__":
    main()
