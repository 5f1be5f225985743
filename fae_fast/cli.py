"""One command-line style for every program in training/: named choices first (`--recipe NAME`, and
`--stage NAME` for train_fae.py), then `--section.field=value` overrides of the program's config dataclass.

`--help` (or `-h`) prints the choices with their one-line descriptions and every field with its current
value (the chosen recipe's) and its docstring. A mistake (an unknown recipe or field, a value of the wrong
type) is a UsageError: `run_program` prints it as one line naming the field and the fix, once (on rank 0
under torchrun), and exits with status 2; a missing file or a config that does not fit is one line and
status 1. `--debug` shows the traceback instead.

Why not tyro: tyro 1.0.17 was tried against these configs (jsonargparse was not). It gives the same nested
`--section.field=value` and field docstrings in --help, but a named recipe becomes a subcommand (breaking
`--recipe NAME` and every script that uses it), list-valued fields change syntax (`--sampler.cfg 0.3 1 1.5`
instead of a Python literal), and its errors are multi-line boxes. This module is about 200 lines with no
dependency.
"""
import ast
import dataclasses
import difflib
import inspect
import os
import sys
import textwrap
import time
import typing
from collections.abc import Callable


class UsageError(ValueError):
    """A command line that cannot be run as written; the message names the option and the fix."""


# ----------------------------------------------------------------------------------------------------
# Values and overrides
# ----------------------------------------------------------------------------------------------------
_TRUE_WORDS, _FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_BOOL_WORDS = _TRUE_WORDS + _FALSE_WORDS


def _parse_value(text: str, annotation):
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if text.lower() not in _BOOL_WORDS:
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in _TRUE_WORDS
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"expected {'an int' if annotation is int else 'a number'}, got {text!r}") from None
    if annotation is str:
        return text
    if origin in (tuple, list):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"expected a Python literal such as [(0.3, 1.0, 1.5)] or (0.9, 0.999), got {text!r}") from None
        return origin(value) if origin is tuple else list(value)
    if type(None) in typing.get_args(annotation):  # Optional[X]: 'none' or an X
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
        return None if text.lower() in ("none", "") else _parse_value(text, inner)
    raise ValueError(f"cannot parse a value of type {annotation}")


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _resolve(cfg, path: str):
    """(dataclass holding the field, field name, its type) of a dotted option path, or a UsageError."""
    *parents, leaf = path.split(".")
    target = cfg
    for name in parents:
        sections = [f.name for f in dataclasses.fields(target)] if dataclasses.is_dataclass(target) else []
        if name not in sections or not dataclasses.is_dataclass(getattr(target, name)):
            raise UsageError(f"--{path}: {type(target).__name__} has no section {name!r}; "
                             f"{_did_you_mean(name, sections)}see --help for the options")
        target = getattr(target, name)
    hints = typing.get_type_hints(type(target))
    if leaf not in hints or dataclasses.is_dataclass(getattr(target, leaf, None)):
        known = [f.name for f in dataclasses.fields(target)]
        raise UsageError(f"--{path}: {type(target).__name__} has no field {leaf!r}; "
                         f"{_did_you_mean(leaf, known)}see --help for the options")
    return target, leaf, hints[leaf]


def apply_overrides(cfg, overrides: list[str]):
    """Apply ['--model.depth=4', '--run.steps', '100', '--run.compile=false', '--random_weights', ...] to a
    nested dataclass config, in place: `--path=value`, `--path value`, or a bare `--path` for a true bool.
    Raises one UsageError naming the option and the fix."""
    items = list(overrides)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or item == "--":
            raise UsageError(f"{item!r} is not an option (options look like --section.field=value; see --help)")
        path, eq, text = item[2:].partition("=")
        path = path.replace("-", "_")  # --shard-size and --shard_size are one option
        target, leaf, annotation = _resolve(cfg, path)
        if not eq:
            if annotation is bool:
                text = items.pop(0) if items and items[0].lower() in _BOOL_WORDS else "true"
            elif items and not items[0].startswith("--"):
                text = items.pop(0)
            else:
                raise UsageError(f"--{path} needs a value: --{path}=VALUE (now {getattr(target, leaf)!r})")
        try:
            setattr(target, leaf, _parse_value(text, annotation))
        except ValueError as err:
            raise UsageError(f"--{path}={text}: {err}") from None
    return cfg


def split_named_options(argv: list[str], defaults: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Take the options named in `defaults` (`--name VALUE` or `--name=VALUE`, e.g. --recipe, --stage) out
    of argv: returns their values (defaults where absent) and the remaining arguments (the overrides)."""
    picked, rest = dict(defaults), []
    it = iter(argv)
    for arg in it:
        key = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else ""
        if key in picked:
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if value is None:
                raise UsageError(f"--{key} needs a value: --{key} NAME (see --help)")
            picked[key] = value
        else:
            rest.append(arg)
    return picked, rest


# ----------------------------------------------------------------------------------------------------
# Help
# ----------------------------------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """The docstrings written under each field of a dataclass (the string right after `name: type = ...`)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_fields(cfg, prefix: str = "") -> list[str]:
    """`--section.field=value  doc` lines of every field of a nested dataclass config, sections in order."""
    lines, docs = [], field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines += ["", f"  {prefix}{f.name}: {docs.get(f.name, '')}".rstrip()]
            lines += describe_fields(value, f"{prefix}{f.name}.")
            continue
        shown = f"--{prefix}{f.name}={value}"
        doc = textwrap.wrap(docs.get(f.name, ""), 110 - 8)
        lines.append(f"    {shown}")
        lines += [f"        {line}" for line in doc]
    return lines


def help_text(prog: str, summary: str, cfg, choices: dict[str, tuple[str, dict[str, str]]]) -> str:
    """choices: option -> (its value now, {name: one-line description})."""
    usage = " ".join(f"[--{opt} NAME]" for opt in choices)
    lines = [f"usage: {prog} {usage} [--section.field=value ...] [--debug]".replace("  ", " "), "", summary]
    for opt, (now, names) in choices.items():
        lines += ["", f"--{opt} (now {now!r}):"]
        lines += [f"    {name:<26} {desc}" for name, desc in names.items()]
    lines += ["", "options (values shown are the current ones):"] + describe_fields(cfg)
    return "\n".join(lines)


def first_line(obj) -> str:
    return (inspect.getdoc(obj) or "").split("\n")[0]


def parse_command_line(argv: list[str], *, prog: str, summary: str, choices: dict[str, tuple[str, dict]],
                       build: Callable[[dict[str, str]], object]):
    """The program's config: named choices (option -> (default, {name: maker or description})) picked out
    of argv, `build(picked)` makes the config, then the overrides are applied. --help prints and exits 0."""
    wants_help = any(a in ("-h", "--help") for a in argv)
    argv = [a for a in argv if a not in ("-h", "--help")]
    picked, rest = split_named_options(argv, {opt: default for opt, (default, _) in choices.items()})
    for opt, value in picked.items():
        names = list(choices[opt][1])
        if value not in names:
            raise UsageError(f"--{opt} {value!r} is unknown; {_did_you_mean(value, names)}choose one of: "
                             f"{', '.join(names)}")
    cfg = apply_overrides(build(picked), rest)
    if wants_help:
        described = {opt: (picked[opt], {n: d if isinstance(d, str) else first_line(d) for n, d in names.items()})
                     for opt, (_, names) in choices.items()}
        print(help_text(prog, summary, cfg, described))
        raise SystemExit(0)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Running a program
# ----------------------------------------------------------------------------------------------------
REPORTED_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError, KeyError, FloatingPointError)
"""What a bad input or a failed run raises in fae_fast (a missing file, a config that does not fit, a damaged
file, a loss that became NaN): each with one sentence naming the thing and the fix."""


def run_program(main: Callable[[list[str]], object], argv: list[str] | None = None):
    """Run a program's main(argv) as its `__main__`: a UsageError is one line on stderr and exit status 2, an
    input error (or a NaN stop) one line and status 1, printed once (rank 0 under torchrun). `--debug` shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except (UsageError, *REPORTED_ERRORS) as err:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            hint = "" if isinstance(err, UsageError) else " [--debug shows the traceback]"
            print(f"error: {message}{hint}", file=sys.stderr, flush=True)
        else:  # torchrun stops every process once one exits: give rank 0 the time to say why
            time.sleep(3)
        raise SystemExit(2 if isinstance(err, UsageError) else 1) from None
