"""The command line, one module per command.

Each command module has the same three members, and nothing else registers it:

* ``NAME`` — the subcommand name;
* ``add_parser(subparsers) -> argparse.ArgumentParser`` — its flags (help text, exit codes);
* ``run(args) -> int`` — the work; returns the exit code, raises :class:`~evidence_keeper.
  commands.base.CliError` (one line, exit 2) or :class:`~evidence_keeper.commands.base.
  NoEvidence` (one line, exit 1).

``evidence_keeper/cli.py`` lists the modules of ``evidence-keeper`` and
``evidence_keeper/kubectl_evidence.py`` those of ``kubectl evidence``; a new command is one
module here plus two lines there (its import and its place in the tuple). :mod:`.base` turns
a tuple of modules into a parser and dispatches; :mod:`.common` holds what several commands
share (settings, store, time flags, output format, progress); :mod:`.render` the text
renderings the demo prints too. This package's ``__init__`` imports nothing, so the demo can
use single commands without importing the command that runs the demo.
"""
