"""Scan an image folder once and list the files no loader can decode.

    python -m fae_fast.data.check /data/imagenet/train --out problems.txt [--workers 16]

Every file with an image extension under PATH is decoded fully with PIL (the reference decoder, strict
about truncation) by a pool of processes. The problem files are written as 'absolute path<TAB>reason'
lines; give that file to the loaders as `exclude_list` and they never read those files. The counts of
the odd-but-valid files (grayscale, CMYK, PNG named .JPEG) are printed too: every loader decodes them.
"""
import argparse
import collections
import multiprocessing
import os
import re
import sys

from fae_fast.data.decode import open_rgb, sniff
from fae_fast.data.images import is_image


def image_files(folder: str) -> list[str]:
    """Absolute paths of the image files under folder, sorted."""
    found = []
    for parent, _, names in os.walk(os.path.abspath(folder)):
        found += [os.path.join(parent, n) for n in names if is_image(n)]
    return sorted(found)


def _kind(data) -> str:
    s = sniff(data)
    if s.kind == "jpeg":
        return {1: "jpeg gray", 3: "jpeg colour", 4: "jpeg cmyk"}.get(s.channels, "jpeg other")
    return "png" if s.kind == "png" else "other format"


def _reason(e: Exception) -> str:
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", str(e))  # PIL names its buffer
    return " ".join(f"{type(e).__name__}: {text}".split())  # one line, no tabs


def check_file(path: str) -> tuple[str, str, str | None]:
    """(path, kind, None) for a file PIL decodes completely, else (path, kind, reason)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return path, "unreadable", _reason(e)
    kind = _kind(data)
    try:
        open_rgb(data)
    except Exception as e:  # noqa: BLE001 - every failure is a finding, named by its reason
        return path, kind, _reason(e)
    return path, kind, None


def scan(folder: str, workers: int) -> tuple[list[tuple[str, str]], collections.Counter]:
    """Problem files [(path, reason)] (sorted) and the count of files per kind."""
    files = image_files(folder)
    kinds, problems = collections.Counter(), []
    with multiprocessing.Pool(max(1, workers)) as pool:
        for path, kind, reason in pool.imap_unordered(check_file, files, chunksize=64):
            kinds[kind] += 1
            if reason is not None:
                problems.append((path, reason))
    return sorted(problems), kinds


def write_problems(path: str, folder: str, problems: list[tuple[str, str]]) -> None:
    with open(path, "w") as f:
        f.write(f"# files under {os.path.abspath(folder)} that cannot be decoded: path<TAB>reason\n")
        f.writelines(f"{p}\t{r}\n" for p, r in problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fae_fast.data.check", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="folder to scan (recursively), e.g. /data/imagenet/train")
    parser.add_argument("--out", default="problems.txt", help="where to write the problem list (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.path):
        parser.error(f"{args.path} is not a folder; give the folder holding the images")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out}: its folder does not exist; create it or write the list elsewhere")
    problems, kinds = scan(args.path, args.workers)
    write_problems(args.out, args.path, problems)
    total = sum(kinds.values())
    print(f"scanned {total} files under {args.path}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    print(f"{len(problems)} cannot be decoded; listed in {args.out} (pass it as exclude_list)")
    for p, r in problems[:10]:
        print(f"  {p}: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
