"""What a command is: a name, its arguments, and the function that runs it.

Each module of :mod:`embedstream.cli` defines the commands of one role in a
``COMMANDS`` tuple; :mod:`embedstream.cli.app` puts them together. A command's
module imports only argparse-level things at the top: what it runs is imported
inside ``run``, so ``embedstream worker`` never loads export code (torch).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from embedstream.settings import Settings


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Settings, argparse.Namespace], int]
