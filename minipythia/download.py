"""Puts a checkpoint under weights/NAME/ for offline use later:

    python -m minipythia.download pythia-70m-deduped [--revision step3000]
"""

from __future__ import annotations

import argparse
import sys

from .cli import run_cli
from .config import MODEL_NAMES, hub_id
from .weights import download, local_weights_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minipythia.download", description=__doc__.split("\n")[0])
    p.add_argument("name", help=f"a registry name ({MODEL_NAMES[4]}, ...) or a hub id (org/name)")
    p.add_argument("--revision", default=None, help="a training checkpoint such as step3000 (default: main)")
    p.add_argument("--dir", default=None, help="target directory (default weights/NAME[-REVISION])")
    args = p.parse_args(argv)
    repo = hub_id(args.name)
    if repo.count("/") != 1:
        raise ValueError(f"{args.name!r} is not a Pythia name ({', '.join(MODEL_NAMES[:4])}, ...) nor a hub id")
    target = args.dir or local_weights_dir(repo, args.revision)
    path = download(repo, args.revision, local_dir=target)
    print(f"{repo} ({args.revision or 'main'}) is in {path}; use --model {path}")
    return 0


def cli():
    """The console script (pyproject.toml's [project.scripts])."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
