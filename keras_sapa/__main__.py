"""Command line: ``python -m keras_sapa {demo,bench} [options]`` (also ``keras-sapa``).

- ``demo``: SAPA against nearest, bilinear and bicubic upsampling on real photographs
  (``--train`` adds a small segmentation training comparison).
- ``bench``: speed and memory of every implementation against bilinear resize.

Each subcommand has its own ``--help``. TensorFlow's start-up log lines are hidden
(see :mod:`keras_sapa._startup`) unless ``--verbose`` is given, anywhere on the line.
"""

import importlib
import sys

COMMANDS = {
    "demo": (
        "keras_sapa.demo.cli",
        "guided upsampling on sample photos; --train for segmentation",
    ),
    "bench": ("keras_sapa.bench", "benchmark the implementations against bilinear resize"),
}


def _usage():
    lines = ["usage: python -m keras_sapa {demo,bench} [--verbose] [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "Run `python -m keras_sapa COMMAND --help` for the options of a command.",
        "--verbose keeps TensorFlow's start-up log lines on stderr (hidden by default).",
    ]
    return "\n".join(lines)


def main(argv=None):
    """Runs the command line for ``argv`` (default ``sys.argv[1:]``); returns the exit
    code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    if module_name != "keras_sapa.demo.cli":
        # --verbose is a global option (it acted when the package was imported); only
        # the demo's own parser knows it.
        rest = [arg for arg in rest if arg != "--verbose"]
    module = importlib.import_module(module_name)
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
