"""How a preloaded Python model is run: under modelpool's launcher, by the launcher's path.

The launcher (`_launcher.py`) is a file of this package that the model's own interpreter
runs by path, so its path is known here, beside it, and nowhere else: settings reads a
model's command the way the interpreter reads it (`settings/pycommand.py`) and refuses
one that cannot be preloaded, but does not know where, or what, the launcher is.
`python3 -u model.py --x` becomes `python3 -u <launcher> <control fd> script model.py --x`.
"""

from __future__ import annotations

from pathlib import Path

from modelpool.settings.pycommand import PythonCommand

LAUNCHER_PATH = Path(__file__).with_name("_launcher.py")


def launcher_command(command: PythonCommand, control_fd: int) -> list[str]:
    """The command that runs this model under the launcher, with the model's own
    interpreter and interpreter flags; the launcher speaks to the pool on `control_fd`."""
    launcher = [str(LAUNCHER_PATH), str(control_fd), command.kind, command.target]
    return [command.interpreter, *command.flags, *launcher, *command.args]
