"""Connected-component labelling benchmark: normlab.label against OpenCV, SciPy, scikit-image
and cc3d on noise, granular noise and a real document page, with 4- and 8-connectivity.

Every row is measured in one run with the candidates interleaved round by round (see
``normlab.bench.measure``); times are medians. ``normlab`` allocates its labels (and stats) on
every call, as every peer does; ``out=`` is normlab writing into a preallocated label array. OpenCV runs at normlab's thread count
(``cv2.setNumThreads``); SciPy, scikit-image and cc3d are single-threaded. In the rows with
stats, normlab and OpenCV (``connectedComponentsWithStats``) return area, bounding box and
centroid; cc3d adds ``cc3d.statistics``; SciPy and scikit-image time their labelling only
(they have no equivalent single call). Speed-ups are the peer's time over normlab's.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

import normlab
from normlab.bench import measure


def _optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def _granular(rng, shape, block, p):
    small = rng.random((shape[0] // block, shape[1] // block)) < p
    return np.kron(small, np.ones((block, block), bool)).astype(np.uint8)


def _page(shape):
    """skimage.data.page() thresholded (dark text is foreground), tiled to `shape`."""
    try:
        import skimage.data
    except ImportError:
        return None
    page = (skimage.data.page() < 128).astype(np.uint8)
    reps = (-(-shape[0] // page.shape[0]), -(-shape[1] // page.shape[1]))
    return np.ascontiguousarray(np.tile(page, reps)[: shape[0], : shape[1]])


def workloads(quick: bool):
    rng = np.random.default_rng(0)
    if quick:
        return [
            ("noise p=0.5", (rng.random((1024, 1024)) < 0.5).astype(np.uint8)),
            ("granular 4px p=0.4", _granular(rng, (1024, 1024), 4, 0.4)),
            ("page", _page((760, 1536))),
        ]
    return [
        ("noise p=0.5", (rng.random((2048, 2048)) < 0.5).astype(np.uint8)),
        ("granular 4px p=0.4", _granular(rng, (2048, 2048), 4, 0.4)),
        ("granular 16px p=0.6", _granular(rng, (4096, 4096), 16, 0.6)),
        ("page", _page((1528, 3072))),
    ]


def _candidates(img, conn, stats, cv2, scipy_ndimage, skimage_measure, cc3d):
    out = np.empty(img.shape, np.int32)
    c = {"normlab": lambda: normlab.label(img, conn, return_stats=stats),
         "out=": lambda: normlab.label(img, conn, out=out, return_stats=stats)}
    if cv2 is not None:
        if stats:
            c["opencv"] = lambda: cv2.connectedComponentsWithStats(img, connectivity=conn, ltype=cv2.CV_32S)
        else:
            c["opencv"] = lambda: cv2.connectedComponents(img, connectivity=conn, ltype=cv2.CV_32S)
    if scipy_ndimage is not None:
        structure = np.ones((3, 3), bool) if conn == 8 else None
        c["scipy"] = lambda: scipy_ndimage.label(img, structure=structure)
    if skimage_measure is not None:
        c["skimage"] = lambda: skimage_measure.label(img, connectivity=1 if conn == 4 else 2)
    if cc3d is not None:
        if stats:
            c["cc3d"] = lambda: cc3d.statistics(cc3d.connected_components(img, connectivity=conn))
        else:
            c["cc3d"] = lambda: cc3d.connected_components(img, connectivity=conn)
    return c


def _fmt_ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _fmt_x(ratio):
    return "-" if ratio is None else f"{ratio:.2f}x"


PEERS = ("opencv", "scipy", "skimage", "cc3d")


def run(quick: bool = False, rounds: int | None = None, stream=None) -> list[dict]:
    stream = stream or sys.stdout  # at call time: redirected or captured output goes there too
    cv2 = _optional("cv2")
    threads = normlab.get_num_threads()
    if cv2 is not None:
        cv2.setNumThreads(threads)
    scipy_ndimage = _optional("scipy.ndimage")
    if scipy_ndimage is not None:
        import scipy.ndimage as scipy_ndimage
    skimage_measure = _optional("skimage.measure")
    if skimage_measure is not None:
        import skimage.measure as skimage_measure
    cc3d = _optional("cc3d")
    rounds = rounds or (3 if quick else 7)
    budget = 0.05 if quick else 0.1
    print(f"normlab {normlab.__version__}  label  target={normlab.get_cpu_target()}  threads={threads}  "
          f"opencv={'-' if cv2 is None else cv2.__version__} (threads={threads})  "
          f"machine={platform.machine()} {os.cpu_count()} cpus", file=stream)
    print("times in ms (median); speed-up = peer time / normlab time; scipy and skimage: "
          "labels only, also in the stats rows", file=stream)
    header = f"{'image':<21}{'shape':>13}{'conn':>5}{'stats':>6}{'comps':>9}{'normlab':>9}{'out=':>8}"
    for p in PEERS:
        header += f"{p:>9}"
    for p in PEERS:
        header += f"{'vs ' + p:>11}"
    print(header, file=stream)
    rows_out = []
    for name, img in workloads(quick):
        if img is None:
            continue
        for conn in (4, 8):
            count = normlab.label(img, conn)[1]
            for stats in (False, True):
                cand = _candidates(img, conn, stats, cv2, scipy_ndimage, skimage_measure, cc3d)
                t = measure(cand, rounds, budget)
                row = dict(op="label", image=name, shape=list(img.shape), connectivity=conn,
                           stats=stats, components=count, threads=threads,
                           normlab_s=t["normlab"], normlab_out_s=t["out="])
                for p in PEERS:
                    row[f"{p}_s"] = t.get(p)
                    row[f"speedup_vs_{p}"] = t[p] / t["normlab"] if p in t else None
                rows_out.append(row)
                line = (f"{name:<21}{'x'.join(map(str, img.shape)):>13}{conn:>5}"
                        f"{'yes' if stats else 'no':>6}{count:>9}{_fmt_ms(t['normlab']):>9}"
                        f"{_fmt_ms(t['out=']):>8}")
                for p in PEERS:
                    line += f"{_fmt_ms(t.get(p)):>9}"
                for p in PEERS:
                    line += f"{_fmt_x(row[f'speedup_vs_{p}']):>11}"
                print(line, file=stream, flush=True)
    return rows_out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    if args.threads:
        normlab.set_num_threads(args.threads)
    run(quick=args.quick, rounds=args.rounds)
