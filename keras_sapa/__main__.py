"""Command line: ``python -m keras_sapa {demo,bench} [options]`` (also ``keras-sapa``).

- ``demo``: SAPA against nearest and bilinear upsampling on real photographs
  (``--train`` adds a small segmentation training comparison).
- ``bench``: speed and memory of every implementation against bilinear resize.

Each subcommand has its own ``--help``.
"""

import sys

COMMANDS = {
    "demo": ("keras_sapa.demo", "guided upsampling on sample photos; --train for segmentation"),
    "bench": ("keras_sapa.bench", "benchmark the implementations against bilinear resize"),
}


def _usage():
    lines = ["usage: python -m keras_sapa {demo,bench} [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `python -m keras_sapa COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
