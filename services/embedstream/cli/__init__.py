"""The ``embedstream`` command line: one module per role, each a few commands.

- :mod:`.app`: the parser, built from every module's ``COMMANDS``, and ``main``
- :mod:`.registry`: what a command is (name, arguments, run)
- :mod:`.flags`: the settings' flags, derived from :class:`~embedstream.settings.Settings`
- :mod:`.worker`, :mod:`.gateway` (and ``api-key``): the services
- :mod:`.produce`, :mod:`.search`, :mod:`.replay`: events in, vectors out, records again
- :mod:`.export` (and ``quantize``, ``finetune``), :mod:`.rollout` (and ``models``): models
- :mod:`.bench`, :mod:`.dev` (and ``demo``): measuring, the embedded stack

Each command's module imports what it runs inside ``run``: the worker never loads
export code (torch).
"""

from embedstream.cli.app import main

__all__ = ["main"]
