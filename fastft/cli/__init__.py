"""The `fastft` command: `train DIR` for your own photos, one command per recipe (hotdog, cifar, ...), and
run, compare, lr-find, predict, evaluate, export, augs and recipes (the command groups: training.py and models.py).

The CLI parses and hands a Recipe to the library. Every training option is a recipe key, with its help
text from fastft/recipe.py; a recipe command's --help shows that recipe's values. Only Typer and the recipe
reader are imported up front, so `--help` and argument errors stay fast; fastai and timm load inside the
commands that need them.
"""
from __future__ import annotations

import gc
import sys
import warnings

import typer

# each group registers its commands on `app`, in the order --help lists them: the training ones first
from fastft.cli import training  # isort: skip
from fastft.cli import models  # isort: skip
from fastft.cli.common import app
from fastft.cli.training import REFUSED
from fastft.errors import UsageError
from fastft.version import __version__

try:  # typer >= 0.22 carries its own click, whose errors derive from TyperException; older typer uses click's
    from typer import TyperException as CommandLineError
except ImportError:
    from click import ClickException as CommandLineError


def _show_version(value: bool):
    if value:
        typer.echo(f"fastft {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                             help="Print the version and exit.")):
    for line in REFUSED:
        typer.echo(f"warning: {line}", err=True)


def main():
    """The `fastft` command's process. Only here, where the process is fastft's own, are warnings filtered: noise from
    the libraries fastft drives, not something a user can act on. `import fastft` changes no warning filter."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    try:
        code = app(standalone_mode=False)
    except CommandLineError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `fastft` alone: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        # a bad argument or option: one line that names it and where the help is
        where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        print(f"error: {e.format_message()}{where}", file=sys.stderr)
        code = 2
    except typer.Abort:
        code = 130
    except UsageError as e:  # raised while building the commands, e.g. a broken recipe file
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        skip_exit_collection()
    sys.exit(code if isinstance(code, int) else 0)


def skip_exit_collection() -> None:
    """The command is done: spare the interpreter's shutdown a walk over every object torch, timm and fastai made.
    Its final garbage collections over that half a million objects take about 1.3 s of each command's wall time on
    a 2-core CPU (bench/gpu.py, commands table); frozen objects are skipped by them. Nothing fastft does at exit
    needs them collected: files are closed by `with`, background writers are threads that Python joins first,
    atexit handlers still run."""
    gc.freeze()
