"""The `flowers` command: parses, picks the backend, calls one library function, prints.

Keras is imported only inside commands, after flowers.backend.select() has set KERAS_BACKEND.
Every FlowersError (and click usage error) becomes one line on stderr and a non-zero exit.
The commands live in one module per family (info, training, reports, exports, bench, serving);
this module builds the group from them and turns errors into lines.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from flowers import files, interrupt
from flowers.cli import bench, exports, info, reports, serving, training
from flowers.errors import FlowersError, PeerLost


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowers")
def cli() -> None:
    """Train, evaluate, compare and export one Keras image classifier under every backend."""


COMMANDS = (info.info, training.train, training.evaluate, reports.compare, reports.parity,
            exports.export_command, exports.exports_group, exports.predict, bench.bench,
            serving.serve, serving.loadtest, serving.bench_serve)
for _command in COMMANDS:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, non-zero exits, no tracebacks for user mistakes."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("flowers").addHandler(handler)
    # tensorflow-datasets and TF warn through absl about internals a user cannot act on.
    logging.getLogger("absl").setLevel(logging.ERROR)
    interrupt.install()
    try:
        cli.main(args=argv, prog_name="flowers", standalone_mode=False)
    except interrupt.Interrupted as stop:
        click.echo(f"error: interrupted by {stop}" + (f"; {stop.hint}" if stop.hint else ""),
                   err=True)
        sys.exit(stop.exit_code)
    except PeerLost as exc:
        click.echo(f"error: {exc}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except FlowersError as exc:
        click.echo(f"error: {files.write_error(exc) or exc}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see flowers --help)", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("error: interrupted; an unfinished training run continues with --resume",
                   err=True)
        sys.exit(130)
    except Exception as exc:  # a full disk reaches here from whichever library was writing
        line = files.write_error(exc)
        if line is None:
            raise
        click.echo(f"error: {line}", err=True)
        sys.exit(1)

