"""fsseg-bench: throughput and overhead benchmarks that print figures and ratios.

    fsseg-bench pfenet       # PFENet training-step / evaluation-episode throughput (embedded size, 473 / ResNet-50)
    fsseg-bench encoders     # frozen encoder throughput grid
    fsseg-bench kmeans       # batched cosine k-means vs a per-image scikit-learn loop
    fsseg-bench apanet       # APANet training-step time relative to PFENet
    fsseg-bench celp         # PFENet+CELP training-step time relative to PFENet
    fsseg-bench cache        # PFENet training step: full vs truncated encoder vs cached features (data.feature_cache)
    fsseg-bench bam          # BAM evaluation cost relative to PFENet
    fsseg-bench i2r          # I2R evaluation cost relative to BAM; DICM mask share of a decoder step
    fsseg-bench affinity     # SCCAN / HDMNet / Aff training-step and evaluation cost vs PFENet; 473 px peak memory

Each name is a module fsseg.bench.<name> with a main(argv) function.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import fsseg.bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(fsseg.bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(__doc__)
        print("available:", ", ".join(names))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"fsseg-bench: unknown benchmark {argv[0]!r}")
        return
    importlib.import_module(f"fsseg.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
