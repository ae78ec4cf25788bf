"""Compute the TorchJD reference values stored in ``torchjd_reference.npz`` (run once; not part of the suite).

    python -m venv /tmp/tj && /tmp/tj/bin/pip install torch "torchjd[full]==0.18.0" numpy
    /tmp/tj/bin/python tests/data/make_torchjd_reference.py

The matrices are float64; each aggregator's output is stored under ``<case>/<aggregator>``. PCGrad is stored for
m = 2 only (its order is random for m > 2).
"""

from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torchjd.aggregation import IMTLG, MGDA, AlignedMTL, CAGrad, DualProj, Mean, PCGrad, UPGrad


def matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261127)
    found = {}
    for m in range(2, 7):
        for n in (5, 100, 1000):
            found[f"random_{m}x{n}"] = rng.normal(size=(m, n))
            base = rng.normal(size=n)  # rows that conflict: opposite pulls around a common direction
            found[f"conflict_{m}x{n}"] = rng.normal(size=(m, n)) * 2.0 + np.outer(rng.choice([-1, 1], m), base)
    scaled = rng.normal(size=(3, 50))
    scaled[0] *= 1000.0
    found["scale_1000x"] = scaled
    deficient = rng.normal(size=(4, 50))
    deficient[3] = deficient[0] - 2.0 * deficient[1]
    found["rank_deficient"] = deficient
    duplicated = rng.normal(size=(4, 50))
    duplicated[2] = duplicated[0]
    found["duplicated_row"] = duplicated
    zero = rng.normal(size=(3, 50))
    zero[1] = 0.0
    found["zero_row"] = zero
    return found


def main() -> None:
    aggregators = {
        "mean": Mean(),
        "upgrad": UPGrad(),
        "dualproj": DualProj(),
        "mgda": MGDA(),
        "imtlg": IMTLG(),
        "alignedmtl": AlignedMTL(),
        "cagrad": CAGrad(c=0.5),
        "pcgrad": PCGrad(),
    }
    stored = {"torchjd_version": np.array(version("torchjd"))}
    for case, matrix in matrices().items():
        stored[f"{case}/matrix"] = matrix
        for name, aggregate in aggregators.items():
            if name == "pcgrad" and matrix.shape[0] != 2:
                continue
            stored[f"{case}/{name}"] = aggregate(torch.from_numpy(matrix)).numpy()
    path = Path(__file__).with_name("torchjd_reference.npz")
    np.savez_compressed(path, **stored)
    print(f"wrote {len(stored)} arrays to {path}")


if __name__ == "__main__":
    main()
