"""``aidc``: the one command, with a subcommand per part.

    aidc demo            all-in-one: broker + AppStore + one edge node
    aidc store ...       the cloud AppStore (see ``aidc store -h``)
    aidc edge ...        the edge node (see ``aidc edge -h``)
    aidc doctor          every health check of this node now, a readable report
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aidc", description="Edge small-AI-DC appliance")
    ap.add_argument("--log-level", default=os.environ.get("AIDC_LOG_LEVEL"),
                    help="DEBUG, INFO, WARNING (default: WARNING for demo, INFO otherwise)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    from appstore.cli import register as register_store
    from edge_node.cli import register as register_edge

    from .demo import register as register_demo

    register_demo(sub)
    register_store(sub)
    register_edge(sub)
    from edge_node.cli import add_doctor

    add_doctor(sub)  # aidc doctor == aidc edge doctor: the first thing a technician types
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (args.log_level or ("WARNING" if args.cmd == "demo" else "INFO")).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # one line per HTTP request is noise outside debugging
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
