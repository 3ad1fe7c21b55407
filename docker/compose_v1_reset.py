"""Apply Compose v2's ``!reset`` tags by hand, so that Compose v1 can validate an override.

    python docker/compose_v1_reset.py BASE OVERRIDE OUT_DIR

``docker-compose.cpu.yml`` removes the GPU reservation with ``deploy: !reset {}`` (Compose
v2.24+). The Debian ``docker-compose`` (v1.29) that ``docker/check.sh`` can install without a
Docker engine does not know the tag. This writes ``OUT_DIR/base.yml`` (the base file with every
reset key removed) and ``OUT_DIR/override.yml`` (the override without those keys), which is
what Compose v2 merges, for ``docker-compose -f base.yml -f override.yml config`` to check.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml


class Reset:
    """The value of a ``!reset`` node: remove this key from the files before."""


class ResetLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


ResetLoader.add_constructor("!reset", _reset)


def split_resets(base: Any, override: Any) -> None:
    """Delete, in place, each key whose override value is ``Reset`` from both mappings."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return
    for key in list(override):
        value = override[key]
        if isinstance(value, Reset):
            base.pop(key, None)
            del override[key]
        else:
            split_resets(base.get(key), value)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    base_path, override_path, out_dir = (Path(a) for a in argv)
    base = yaml.load(base_path.read_text(), Loader=ResetLoader)
    override = yaml.load(override_path.read_text(), Loader=ResetLoader)
    split_resets(base, override)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "base.yml").write_text(yaml.safe_dump(base, sort_keys=False))
    (out_dir / "override.yml").write_text(yaml.safe_dump(override, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
