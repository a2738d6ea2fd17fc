"""``jalign train|generate|convert|pipeline|plot`` (also ``python -m jalign``)."""
from __future__ import annotations

import sys
from typing import Optional

USAGE = """usage:
  jalign train CONFIG.yaml [key=value ...]     train with the algorithm named in the config
  jalign generate --model DIR --prompt TEXT    sample from a checkpoint / Hugging Face directory
  jalign convert --hf DIR --out CKPT           Hugging Face <-> jalign checkpoints
  jalign pipeline [--out DIR] [--fast]         the tiny SFT -> RM -> PPO / DPO pipeline end to end
  jalign plot RUN_DIR                          plot metrics.jsonl curves to RUN_DIR/curves.png
"""


def _train(argv: list[str]) -> int:
    from jalign.config import ConfigError, load_config

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from jalign.config import ConfigError as _CE
    from jalign.data.formats import DataError
    from jalign.trainer import TrainingDiverged, train

    try:
        train(cfg)
    except (_CE, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _train(rest)
    if cmd == "generate":
        from jalign.generate import generate_main

        return generate_main(rest)
    if cmd == "convert":
        from jalign.models.hf_io import convert_main

        return convert_main(rest)
    if cmd == "pipeline":
        from jalign.pipeline import pipeline_main

        return pipeline_main(rest)
    if cmd == "plot":
        from jalign.plot import plot_main

        return plot_main(rest)
    print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
