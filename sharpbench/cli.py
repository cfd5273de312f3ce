"""The ``sharpbench`` command: ``sharpbench <command> [arguments]``.

Each command is a module of the package with a ``main()``; ``sharpbench train …`` is exactly
``python -m sharpbench.train …`` (Hydra overrides, ``-m`` for sweeps, ``--help``), and so on.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

# command -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sharpbench.train", "train one model, or a sweep with -m (Hydra overrides: optimizer=sam dataset=cifar10 ...)"),
    "eval": ("sharpbench.eval", "evaluate a trained run on its test (and validation) set: eval <run dir, sweep job dir or .ckpt>"),
    "report": ("sharpbench.report", "tables and curves of a sweep: report <sweep dir>"),
    "analyze": ("sharpbench.analyze", "sharpness diagnostics and loss landscapes of a trained run: analyze <run dir>"),
    "bench": ("sharpbench.bench", "step-time benchmark of every optimizer"),
    "methods": ("sharpbench.methods", "the registered methods: name, passes per step, class, paper (--markdown)"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: sharpbench <command> [arguments]", "",
             "Sharpness-aware optimizers (SAM and its family) on CIFAR: train, evaluate, compare.",
             "", "commands:"]
    for name, (module, text) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {text}")
    lines += ["", "`sharpbench <command> --help` describes a command's arguments; "
              "`sharpbench <command> ...` is the same as `python -m sharpbench.<command> ...`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sharpbench: unknown command {command!r}; choose one of {', '.join(COMMANDS)}\n",
              file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    if importlib.util.find_spec(module_name) is None:
        print(f"sharpbench {command}: this installation of sharpbench has no {module_name} module; "
              "update sharpbench to a version that provides it", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    sys.argv = [f"sharpbench {command}", *rest]  # Hydra and argparse read the remaining arguments
    result = module.main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
