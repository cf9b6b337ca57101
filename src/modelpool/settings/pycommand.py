"""Python model commands, read the way the interpreter reads them, for --preload.

A preloaded model runs under modelpool's launcher, in the model's own interpreter with
the model's own interpreter flags (`process/launch.py` builds that command from what is
read here). Only a command that names a Python interpreter and then a script or
`-m module` can be run that way; anything else is refused here, with the reason, when
the configuration is checked, before a model starts.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

PYTHON_NAME = re.compile(r"python(3(\.\d+)?)?")
FLAGS_WITH_VALUE = "WX"  # -W arg, -X opt: the value is the rest of the word, or the next word
LONG_FLAGS_WITH_VALUE = ("--check-hash-based-pycs",)


class NotPythonCommand(ValueError):
    """The command cannot be preloaded; the message says why, for the user."""


@dataclass(frozen=True)
class PythonCommand:
    interpreter: str
    flags: list[str]  # the interpreter's own options, kept as they were
    kind: str  # "script" or "module"
    target: str  # the script's path or the module's name
    args: list[str]  # what the model's sys.argv[1:] holds


def is_python(program: str) -> bool:
    """Whether `program` names a Python interpreter: python, python3, python3.X, or this one."""
    if PYTHON_NAME.fullmatch(os.path.basename(program)):
        return True
    try:
        return os.path.realpath(program) == os.path.realpath(sys.executable)
    except OSError:
        return False


def parse_python_command(command: list[str]) -> PythonCommand:
    """Split a model command into interpreter, flags and script (or module); or say why not."""
    program = command[0]
    if not is_python(program):
        raise NotPythonCommand(
            f"{program!r} is not a Python interpreter (python, python3, python3.X or "
            f"{sys.executable}): --preload forks a Python model from one loaded copy, so the "
            "command must be `python [flags] script.py ...` or `python [flags] -m module ...`; "
            "run other models without --preload"
        )
    flags: list[str] = []
    words = command[1:]
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-" or not word.startswith("-"):
            break
        if word == "--":
            index += 1
            break
        if word.startswith("--"):
            flags.append(word)
            if word in LONG_FLAGS_WITH_VALUE and index + 1 < len(words):
                flags.append(words[index + 1])
                index += 1
            index += 1
            continue
        letters = word[1:]
        for position, letter in enumerate(letters):
            rest = letters[position + 1 :]
            if letter == "c":
                raise NotPythonCommand(
                    "a `python -c CODE` model cannot be preloaded: put the code in a file "
                    "and run the file, or run it without --preload"
                )
            if letter == "m":
                if position:
                    flags.append("-" + letters[:position])
                if rest:
                    return PythonCommand(program, flags, "module", rest, words[index + 1 :])
                if index + 1 >= len(words):
                    raise NotPythonCommand("`-m` names no module")
                return PythonCommand(program, flags, "module", words[index + 1], words[index + 2 :])
            if letter in FLAGS_WITH_VALUE:
                if rest:
                    flags.append(word)
                else:
                    flags.extend(words[index : index + 2])
                    index += 1
                break
        else:
            flags.append(word)
        index += 1
    if index >= len(words):
        raise NotPythonCommand(
            "the command names no script: --preload needs `python [flags] script.py ...` "
            "or `python [flags] -m module ...`"
        )
    if words[index] == "-":
        raise NotPythonCommand(
            "a model read from stdin (`python -`) cannot be preloaded: stdin is for requests"
        )
    return PythonCommand(program, flags, "script", words[index], words[index + 1 :])
