"""The `fastft` Typer app and what every command group uses to register its commands: one-line user errors."""
from __future__ import annotations

import errno
import functools
import inspect

import typer
from typer.core import TyperCommand

from fastft.errors import Interrupted, UsageError


# Plain click help (rich_markup_mode=None): it wraps long help at word boundaries at any width.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Transfer learning for images: `fastft train DIR` on your own photos, and the textbook "
                       "recipes, one command each (fastai + timm).")

COMMANDS = frozenset({"train", "run", "compare", "lr-find", "recipes", "predict", "evaluate", "export", "augs", "resume",
                      "inspect", "explain", "serve", "runs"})
TYPES = {"str": str, "int": int, "float": float, "bool": bool}  # a recipe key's type on the command line (lr: str)


def user_errors(command):
    """Mistakes a user can fix print as one line and exit 2; bugs keep their traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UsageError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as e:  # Ctrl-C, after what could be kept was: one line saying what
            typer.echo(str(e), err=True)
            raise typer.Exit(130) from None
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            typer.echo(f"error: no space left on the disk while writing {e.filename or 'a file'}; free some space and run "
                       "the command again (every file written before is whole; a stopped training run continues with "
                       "`fastft resume RUN`)", err=True)
            raise typer.Exit(2) from None
    return wrapper


class PanelCommand(TyperCommand):
    """Plain click help with the options in panels, in the order PANEL_ORDER gives (an option's panel is its
    typer.Option(rich_help_panel=...)): the options most runs need come first, the rest after."""

    def format_options(self, ctx, formatter) -> None:
        arguments, panels = [], {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Other options", []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        for panel in sorted(panels, key=lambda p: PANEL_ORDER.index(p) if p in PANEL_ORDER else len(PANEL_ORDER)):
            with formatter.section(panel):
                formatter.write_dl(panels[panel])


PANEL_ORDER = ("Data", "Model", "Training", "Automatic choice", "Validation", "Output", "Advanced", "Other options")


def argument(name: str, help: str, annotation=str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                             default=typer.Argument(..., help=help, show_default=False, metavar=name.upper()))


def command(name: str, help: str, function, parameters: list[inspect.Parameter]) -> None:
    """Register `function(**parameters)` as `fastft NAME`, with user errors as one line."""
    function.__signature__ = inspect.Signature(parameters)
    function.__name__ = name.replace("-", "_")
    app.command(name=name, help=help, cls=PanelCommand)(user_errors(function))
