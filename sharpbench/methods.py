"""``sharpbench methods``: list the registered methods (``--markdown``: as a Markdown table).

Every method comes from the registry (``sharpbench.optim.registry``), so a method added in its
own file, or registered by a user's package, is listed here with no other edit.
"""
from __future__ import annotations

import argparse
import sys

from .optim.registry import method_table, methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sharpbench methods", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the Markdown method table")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.markdown:
        print(method_table())
        return 0
    infos = methods()
    width = max(len(n) for n in infos)
    for name, info in infos.items():
        needs = f"  needs: {', '.join(info.needs)}" if info.needs else ""
        print(f"{name:<{width}}  {info.label:<12} {info.passes:g} pass(es)/step{needs}")
        print(f"{'':<{width}}  {info.paper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
