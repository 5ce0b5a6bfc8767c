"""The ``bcseg-wsi`` command line: one module per subcommand, dispatched from here.

Heavy packages (torch, openslide, zarr) are imported inside each subcommand so that ``--help``
returns at once. Exit codes: 0 success, 1 internal error, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from bcseg import __version__

SUBCOMMANDS = ("run", "batch", "info", "train", "evaluate")
EXIT_OK, EXIT_INTERNAL_ERROR, EXIT_BAD_INPUT = 0, 1, 2

log = logging.getLogger("bcseg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bcseg-wsi",
        description="Whole-slide segmentation of breast-cancer H&E slides into tumor, stroma, "
        "inflammatory, necrosis and other tissue.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"bcseg.cli.{name}")
        subparser = module.add_parser(subparsers)
        add_verbosity_options(subparser)
        subparser.set_defaults(execute=module.execute)
    return parser


def add_verbosity_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    group.add_argument("-q", "--quiet", action="store_true", help="log only errors; no progress bars")


def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Libraries that log at INFO by default drown ours; keep them at WARNING unless -vv.
    for noisy in ("distributed", "numcodecs", "PIL", "zarr", "asyncio", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    # tifffile logs ERROR for each damaged tag it skips; the slide readers turn what matters into
    # one BadInputError, so those lines show only with -v.
    tifffile_level = logging.CRITICAL
    if verbose:
        tifffile_level = logging.DEBUG if verbose >= 2 else logging.WARNING
    logging.getLogger("tifffile").setLevel(tifffile_level)


def main(argv: list[str] | None = None) -> int:
    from bcseg.errors import BadInputError

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    previous_handler = _raise_on_sigterm()
    try:
        return int(args.execute(args) or EXIT_OK)
    except BadInputError as error:
        print(f"bcseg-wsi {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"bcseg-wsi {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout closed it early (``bcseg-wsi info SLIDE | head``). As the Python
        # documentation advises, send what remains to devnull so the exit flush does not fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Terminated:
        print(f"bcseg-wsi {args.command}: terminated (SIGTERM); unfinished outputs removed", file=sys.stderr)
        return 143
    except Exception:
        log.exception("internal error in bcseg-wsi %s; please report it with the traceback below", args.command)
        return EXIT_INTERNAL_ERROR
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that cleanup code runs as on Ctrl-C.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` blocks do not swallow it.
    """


def _raise_on_sigterm():
    """Turn SIGTERM (sent by batch schedulers at time limits) into Terminated; return the old handler."""

    def handler(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread, e.g. when called from a worker
        return None


if __name__ == "__main__":
    sys.exit(main())
