"""Print the dependencies declared in pyproject.toml (one source of truth for `make install`).

Usage: python scripts/deps.py [extra ...]   e.g. `python scripts/deps.py test`
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
deps = [d for d in project["dependencies"] if not d.startswith("torch")]  # torch is pinned by the Makefile
for extra in sys.argv[1:]:
    deps += project["optional-dependencies"][extra]
print(" ".join(f"'{d}'" for d in deps))
