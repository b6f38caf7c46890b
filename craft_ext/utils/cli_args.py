"""Command-line mistakes of craft_ext's CLIs (train, eval, build_anchor_cache), said in two lines.

lerobot's parser (`lerobot.configs.parser.wrap` -> draccus -> argparse) takes a flag given twice
inconsistently (a `--policy.path` given twice: the first wins, because lerobot reads it from the raw
arguments; `--steps` twice: the last wins), and on an unknown flag prints the whole usage (hundreds of
lines for the train config) before the one line that matters. `cli_usage_errors` wraps a CLI's run:
  - a flag given twice is refused before anything is parsed;
  - an argparse error (unknown flag, bad choice, missing value) raised by draccus's parser anywhere in
    the run (the first parse, or lerobot's second parse of `--policy.*` flags against the policy's own
    config) comes out as the error, then a hint: the closest known option and `--help`.
Both exit with status 2, as argparse does.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
from collections.abc import Sequence

#: options that are not config fields (lerobot reads them itself, or the CLI does)
_NOT_CHECKED = {"help", "help-all", "h"}


class UsageError(Exception):
    """A command-line mistake: the error line, then hint lines (printed by `cli_usage_errors`)."""

    def __init__(self, error: str, hints: Sequence[str] = ()) -> None:
        super().__init__(error)
        self.error, self.hints = error, list(hints)


def option_name(arg: str) -> str | None:
    """`--a.b=1` / `--a.b` -> `a.b`; None for a value or a lone `--`."""
    if not arg.startswith("--") or arg == "--":
        return None
    return arg[2:].split("=", 1)[0]


def check_no_duplicates(args: Sequence[str]) -> None:
    """Refuse an option given more than once (`--steps=3 --steps=2`, or `--steps 3 --steps 2`)."""
    seen: dict[str, list[str]] = {}
    for i, arg in enumerate(args):
        name = option_name(arg)
        if name is None or name in _NOT_CHECKED:
            continue
        shown = arg if "=" in arg or i + 1 >= len(args) or args[i + 1].startswith("--") else f"{arg} {args[i + 1]}"
        seen.setdefault(name, []).append(shown)
    repeated = {name: given for name, given in seen.items() if len(given) > 1}
    if repeated:
        times = {2: "twice", 3: "three times"}
        parts = [f"--{name} is given {times.get(len(given), f'{len(given)} times')} ({', '.join(given)})"
                 for name, given in repeated.items()]
        raise UsageError(f"{'; '.join(parts)}: give each option once")


def closest_option(name: str, known: Sequence[str]) -> str | None:
    """The known option closest to `name` (both without the leading `--`), if any is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close and "." in name:  # compare the last part within the same section: craft.taus -> craft.tau
        section, _, leaf = name.rpartition(".")
        leaves = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.5)]
    return close[0] if close else None


def usage_error(message: str, known: Sequence[str], args: Sequence[str], program: str) -> UsageError:
    """The `UsageError` for argparse's `message`, with hints from the parser's `known` options.

    lerobot parses `--policy.*` flags a second time against the policy's own config, stripped of their
    `policy.` prefix: an unknown name there is mapped back to the flag the user typed."""
    help_hint = f"`{program} --help` lists the options"
    match = re.fullmatch(r"unrecognized arguments: (.*)", message.strip(), re.S)
    if match is None:
        return UsageError(message.strip(), [help_hint])
    shown, hints = [], []
    for token in match[1].split():
        if not token.startswith("--"):  # a stray value
            shown.append(token)
            continue
        prefix = _prefix_typed(token, args)
        typed = f"--{prefix}{token[2:]}"
        shown.append(typed)
        name = option_name(typed)
        candidates = [f"{prefix}{k}" for k in known]
        close = closest_option(name, candidates)
        if close is not None:
            hints.append(f"--{name}: did you mean --{close}?")
    noun = "option" if len(shown) == 1 else "options"
    return UsageError(f"unknown {noun} {' '.join(shown)}", [*hints, help_hint])


def _prefix_typed(token: str, args: Sequence[str]) -> str:
    """The section prefix (`policy.`) lerobot stripped from `token` before its second parse, if any."""
    if token in args:
        return ""
    rest = "." + token[2:]  # `--foo=1` was typed as `--SECTION.foo=1`
    for arg in args:
        if arg.startswith("--") and arg.endswith(rest):
            return arg[2 : len(arg) - len(rest)] + "."
    return ""


@contextlib.contextmanager
def cli_usage_errors(program: str, args: Sequence[str] | None = None):
    """Around a CLI's parse and run: refuse duplicate flags, and turn draccus's argparse errors into
    an error line and hints instead of the whole usage; both exit with status 2."""
    args = list(sys.argv[1:] if args is None else args)
    from draccus.utils import ParsingError
    from draccus.wrappers.suppressing_argparse import SuppressingArgumentParser

    def error(parser, message: str):
        known = [s[2:] for s in parser._option_string_actions if s.startswith("--") and s != "--help"]
        # `--craft` (a config file for the whole section) is an option too, but never the one meant
        sections = {".".join(k.split(".")[:i]) for k in known for i in range(1, k.count(".") + 1)}
        raise usage_error(message, [k for k in known if k not in sections], args, program)

    original = SuppressingArgumentParser.__dict__.get("error")
    SuppressingArgumentParser.error = error
    try:
        check_no_duplicates(args)
        yield
    except UsageError as exc:
        print(f"error: {exc.error}", file=sys.stderr)
        for hint in exc.hints:
            print(f"hint: {hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except ParsingError as exc:  # a config's own check refused a value (draccus wraps it: say the check's words)
        print(f"error: {_root_cause(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if original is None:
            del SuppressingArgumentParser.error
        else:
            SuppressingArgumentParser.error = original


def _root_cause(exc: BaseException) -> BaseException:
    """What draccus's ParsingError `exc` wraps: a value it could not decode (its DecodingError names the
    field), or the exception a config's own check raised."""
    from draccus.utils import DecodingError, ParsingError

    while isinstance(exc, ParsingError) and not isinstance(exc, DecodingError):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def split_section(args: Sequence[str], section: str) -> tuple[list[str], list[str]]:
    """(the other arguments, those of `--SECTION.*`): `--env.task=x` or `--env.task x` go to the second."""
    rest, taken = [], []
    i = 0
    while i < len(args):
        name = option_name(args[i])
        mine = name is not None and name.startswith(f"{section}.")
        (taken if mine else rest).append(args[i])
        if "=" not in args[i] and i + 1 < len(args) and option_name(args[i + 1]) is None and name is not None:
            (taken if mine else rest).append(args[i + 1])  # the value of `--flag value`
            i += 1
        i += 1
    return rest, taken


def help_requested(args: Sequence[str]) -> bool:
    return "-h" in args or "--help" in args


def help_page(config_class: type, usage: str) -> str:
    """`usage` followed by every option of `config_class` with its description and default, rendered by
    draccus from the field comments (without importing lerobot)."""
    from draccus.argparsing import ArgumentParser

    rendered = ArgumentParser(config_class=config_class).parser.format_help()
    options = rendered.split("\n\n", 1)[1] if "\n\n" in rendered else rendered  # drop draccus's own usage line
    return f"{usage.rstrip()}\n\n{options.rstrip()}"
