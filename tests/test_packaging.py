"""The declared dependency ranges start at the versions that were tested together."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_lower_bound_is_the_tested_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(line.split("==") for line in (ROOT / "requirements" / "constraints.txt").read_text()
                .splitlines() if "==" in line and not line.startswith("#"))
    pins = {k.lower(): v for k, v in pins.items()}
    specs = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    for spec in specs:
        name, lower = re.match(r"([A-Za-z0-9_.-]+)>=([^,]+),", spec).groups()
        assert pins[name.lower()] == lower, f"{spec}: tested with {name}=={pins[name.lower()]}"
