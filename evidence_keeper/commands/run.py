"""``evidence-keeper run``: the agent on this node, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any, Final

from evidence_keeper.commands.base import CliError, subcommand
from evidence_keeper.commands.common import add_config, settings
from evidence_keeper.logs import configure_logging
from evidence_keeper.supervisor import Agent, StartupError

NAME: Final = "run"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subcommand(subparsers, NAME, help="run the agent on this node",
                   exit_codes="exit codes:\n  0  stopped by SIGTERM/SIGINT after the ordered"
                              " drain\n  2  bad configuration, or start-up failed (one line)")
    add_config(p)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = settings(args)
    configure_logging(cfg.log_level)

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            agent = Agent(cfg)  # takes the spool lock: a second agent stops here
        except StartupError as exc:
            raise CliError(str(exc)) from exc
        try:
            await agent.run(stop)
        except StartupError as exc:
            raise CliError(str(exc)) from exc
        finally:
            agent.close()
        return 0

    return asyncio.run(_main())
