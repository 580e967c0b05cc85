"""``peft convert``: a saved adapter to another format, or back, through the formats plugins register.

The core knows one format, its own (Hugging Face PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``).
Every other is an :class:`~peft_core.plugins.AdapterFormat` from a plugin's ``peft_register_formats``: ``--to
NAME`` hands it the saved adapter, read and checked here as the loader reads and checks it, and ``--to peft``
lets it read its own file and save the adapter. The formats' names and their own options come from the
registry, so a third-party format is a first-class citizen of this command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_core.errors import PeftError, PluginError

if TYPE_CHECKING:
    from peft_core.plugins import AdapterFormat

PEFT = "peft"  # the core's own format
# Arguments of the parse that are not a format's options: the command's own, and the peft command's.
_NOT_OPTIONS = frozenset({"command", "debug", "run", "to", "from_format", "src", "dst"})


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    formats = _formats()
    listed = "; ".join(f"{f.name}, {f.description} (from {f.package or 'user code'})" for f in formats.values())
    parser = subparsers.add_parser(
        "convert", help="convert a saved adapter to or from another format",
        description="Convert an adapter between the Hugging Face PEFT format (adapter_config.json + "
        "adapter_model.safetensors) and a format an installed plugin provides. No base model is needed.",
        epilog=f"Installed formats: {listed}." if formats else "No installed plugin provides a format yet.",
    )
    parser.add_argument("--to", required=True, type=_format_name(formats, with_peft=True), metavar="FORMAT",
                        help=f"the format to write: {', '.join([PEFT, *formats])}")
    parser.add_argument("--from", dest="from_format", type=_format_name(formats, with_peft=False), metavar="FORMAT",
                        help="with --to peft, the format SRC is in (needed only when several are installed)")
    parser.add_argument("src", metavar="SRC", help="the adapter to convert: a saved adapter's directory or Hub "
                        "repo id, or with --to peft a file, directory or Hub repo of the format")
    parser.add_argument("dst", metavar="DST", help="where to write it (a directory; a format may also take a "
                        "file name)")
    parser.add_argument("--force", action="store_true", help="overwrite an adapter already at DST")
    for fmt in formats.values():
        if fmt.add_arguments is None:
            continue
        group = parser.add_argument_group(f"options of the {fmt.name} format")
        try:
            fmt.add_arguments(group)
        except argparse.ArgumentError as exc:
            raise PluginError(
                f"The {fmt.name} format of {fmt.package or 'user code'} adds a `peft convert` option another "
                f"format or the command already has ({exc}). Uninstall one of the two."
            ) from exc
    parser.set_defaults(run=run)
    return parser


def _formats() -> dict[str, AdapterFormat]:
    from peft_core.plugins import registry

    return dict(sorted(registry().formats.items()))


def _format_name(formats: dict[str, AdapterFormat], with_peft: bool) -> Any:
    """An argparse ``type`` that accepts the installed formats' names; another is a usage error naming them."""
    names = [PEFT, *formats] if with_peft else list(formats)

    def check(name: str) -> str:
        if name not in names:
            installed = ", ".join(names) or "none"
            raise argparse.ArgumentTypeError(
                f"no installed plugin provides the format {name!r} (installed: {installed}). Install the plugin "
                f"that provides it; `peft methods` lists the installed plugins."
            )
        return name

    return check


def export_adapter(fmt: AdapterFormat, src: str, dst: str, options: dict[str, Any]) -> str:
    """Write the saved adapter ``src`` in the format ``fmt``; return what the format wrote."""
    from peft_core.serialization import read_adapter, resolve_file
    from peft_core.stacking import MANIFEST_NAME

    if resolve_file(src, MANIFEST_NAME, required=False) is not None:
        raise PeftError(f"{src} is a stack of adapters; convert one member (its subfolder) at a time.")
    saved = read_adapter(src)  # read and checked as the loader reads and checks it
    saved.peft_config()  # and its config validated as the loader validates it: a format writes what loads
    return fmt.export(saved, dst, options)


def import_adapter(fmt: AdapterFormat, src: str, dst: str, options: dict[str, Any]) -> str:
    """Save ``src``, a file of the format ``fmt``, as an adapter in the PEFT format in ``dst``."""
    from peft_core.config import CONFIG_NAME
    from peft_core.serialization import WEIGHTS_NAME

    _refuse_peft_source(src)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        _check_free(Path(dst, name), bool(options.get("force")))
    return fmt.import_(src, dst, options)


def _refuse_peft_source(src: str) -> None:
    """A local adapter (or stack) already in the PEFT format has nothing to convert with ``--to peft``."""
    from peft_core.config import CONFIG_NAME
    from peft_core.serialization import resolve_file
    from peft_core.stacking import MANIFEST_NAME

    if not Path(src).is_dir():
        return
    for name in (CONFIG_NAME, MANIFEST_NAME):
        if resolve_file(src, name, required=False) is not None:
            others = ", ".join(_formats()) or "the one a plugin provides"
            raise PeftError(
                f"{src} is already in the PEFT format (it holds {name}); --to peft has nothing to convert. To "
                f"write it in another format, pass --to with one of: {others}."
            )


def _check_free(file: Path, force: bool) -> None:
    if file.exists() and not force:
        raise PeftError(f"{file} exists; pass --force to overwrite it.")
    if file.parent.exists() and not file.parent.is_dir():
        raise PeftError(f"{file.parent} is a file, not a directory.")


def _source_format(formats: dict[str, AdapterFormat], name: str | None) -> AdapterFormat:
    if name is not None:
        return formats[name]
    if len(formats) == 1:
        return next(iter(formats.values()))
    if not formats:
        raise PeftError("No installed plugin provides a format to convert from. Install one that registers a "
                        "format (peft_register_formats).")
    raise PeftError(f"Several formats are installed ({', '.join(formats)}); pass --from with the one SRC is in.")


def run(args: argparse.Namespace) -> int:
    formats = _formats()
    # Everything else on the command line is an option of the formats (theirs, and --force).
    options = {key: value for key, value in vars(args).items() if key not in _NOT_OPTIONS}
    if args.to == PEFT:
        written = import_adapter(_source_format(formats, args.from_format), args.src, args.dst, options)
    elif args.from_format is not None:
        raise PeftError(f"--from names the format SRC is in for --to {PEFT}; with --to {args.to}, SRC is a saved "
                        f"adapter in the PEFT format. Drop --from.")
    else:
        written = export_adapter(formats[args.to], args.src, args.dst, options)
    print(f"converted {args.src} to the {args.to} format: {written}")
    return 0
