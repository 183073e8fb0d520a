"""The command line: parse options, then call one library function per command.

Heavy libraries (torch, timm, PyAV, MTCNN) are imported inside the commands so
that ``aucli --help`` answers at once.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import AucliError

app = typer.Typer(
    name="aucli",
    help="Find facial Action Units (FACS) in video with MDHR (Wang et al., CVPR 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aucli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Find facial Action Units (FACS) in video with MDHR (Wang et al., CVPR 2024)."""


class DatasetName(str, Enum):
    bp4d = "bp4d"
    disfa = "disfa"


class ReferenceBackbone(str, Enum):
    resnet50 = "resnet50"
    swin_base = "swin_base"


@app.command("convert-official")
def convert_official(
    source: Path = typer.Argument(
        ..., help="Checkpoint written by the reference implementation (CVI-SZU/MDHR), e.g. best_model.pth."
    ),
    dataset: DatasetName = typer.Option(..., "--dataset", "-d", help="AU set the checkpoint was trained on."),
    backbone: ReferenceBackbone = typer.Option(
        ReferenceBackbone.resnet50, "--backbone", "-b", help="Backbone of the reference model."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the aucli checkpoint (.pt)."),
    clip_length: int = typer.Option(16, "--clip-length", "-T", help="Clip length T the model was trained with."),
    k: int = typer.Option(5, "--k", help="Temporal pooling half-window k the model was trained with."),
    threshold: float = typer.Option(0.5, "--threshold", help="Decision threshold stored for every AU."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Turn a reference MDHR checkpoint (.pth) into a self-describing aucli checkpoint.

    Accepts a bare state dict or one wrapped in {"state_dict": ...}, with or without
    DataParallel "module." prefixes. Every source key must be used and every model
    tensor filled, or nothing is written and the offending keys are named.
    """
    from .convert import convert_official_checkpoint

    meta = convert_official_checkpoint(
        source, output, dataset.value, backbone.value, clip_length=clip_length, k=k,
        threshold=threshold, overwrite=force,
    )
    typer.echo(
        f"wrote {output}: {meta.au_set} ({len(meta.aus)} AUs), {meta.backbone}, T={meta.clip_length}, k={meta.k}",
        err=True,
    )


def main() -> None:
    """Entry point: run the app, turning aucli errors into one line and an exit status."""
    try:
        app(standalone_mode=False)
    except AucliError as exc:
        typer.echo(f"aucli: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("aucli: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aucli: aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


# Commands added by other modules of the CLI go below this line.
