"""Connected-component labelling: normlab.label and friends against scipy.ndimage.label
(numbering) and cv2.connectedComponentsWithStats (statistics)."""

import numpy as np
import pytest
import scipy.ndimage as ndi

import normlab

cv2 = pytest.importorskip("cv2")

CONNS = (4, 8)


def scipy_label(image, connectivity, background=0):
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    return ndi.label(image != background, structure=structure)


def assert_same_as_scipy(image, connectivity, background=0, **kw):
    ref, n = scipy_label(image, connectivity, background)
    labels, count = normlab.label(image, connectivity, background=background, **kw)
    assert count == n
    assert labels.shape == image.shape
    np.testing.assert_array_equal(labels, ref)
    return labels, count


def random_images(rng):
    """Random binary images of many shapes and densities (word-boundary widths included)."""
    shapes = [(1, 1), (1, 7), (7, 1), (1, 300), (300, 1), (0, 5), (5, 0), (0, 0), (2, 2),
              (3, 63), (5, 64), (4, 65), (9, 127), (6, 128), (8, 129), (33, 200), (64, 64),
              (100, 100), (57, 191)]
    for shape in shapes:
        for p in (0.05, 0.3, 0.5, 0.7, 0.95):
            yield shape, p, rng.random(shape) < p


def checkerboard(h, w):
    return ((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2).astype(np.uint8)


def lattice(h, w):
    """Isolated pixels at even (row, col): the 8-connectivity worst case, pixels/4 components."""
    img = np.zeros((h, w), np.uint8)
    img[::2, ::2] = 1
    return img


def spiral(n):
    """A one-pixel-wide square spiral with one-pixel gaps: one long winding component."""
    img = np.zeros((n, n), np.uint8)
    if n == 0:
        return img
    r, c, dr, dc = 0, 0, 0, 1
    img[0, 0] = 1

    def free(i, j):
        return not (0 <= i < n and 0 <= j < n) or img[i, j] == 0

    def inside(i, j):
        return 0 <= i < n and 0 <= j < n

    while True:
        for _ in range(2):
            nr, nc = r + dr, c + dc
            if inside(nr, nc) and img[nr, nc] == 0 and free(nr + dr, nc + dc):
                r, c = nr, nc
                img[r, c] = 1
                break
            dr, dc = dc, -dr  # turn clockwise
        else:
            return img


def real_images():
    data = pytest.importorskip("skimage.data")
    camera, coins, page, text = data.camera(), data.coins(), data.page(), data.text()
    return {
        "camera>128": camera > 128,
        "camera<64": camera < 64,
        "coins>100": coins > 100,
        "page<128": page < 128,
        "page>160": page > 160,
        "text<100": text < 100,
        "horse": data.horse(),
        "blobs": data.binary_blobs(length=256, rng=1),
    }


# ---- numbering: identical to scipy ---------------------------------------------------------


def test_random_images_match_scipy(cpu_target, rng):
    for shape, p, img in random_images(rng):
        for conn in CONNS:
            assert_same_as_scipy(img, conn)


@pytest.mark.parametrize("conn", CONNS)
def test_special_images_match_scipy(cpu_target, conn):
    for h, w in [(1, 1), (5, 9), (64, 64), (101, 67)]:
        assert_same_as_scipy(np.zeros((h, w), np.uint8), conn)
        labels, count = assert_same_as_scipy(np.ones((h, w), np.uint8), conn)
        assert count == 1
        assert_same_as_scipy(checkerboard(h, w), conn)
        assert_same_as_scipy(lattice(h, w), conn)
    for n in (1, 2, 5, 16, 63, 130):
        _, count = assert_same_as_scipy(spiral(n), conn)
        assert count == 1
    # stripes of full rows and columns, a single pixel at each corner
    stripes = np.zeros((40, 70), bool)
    stripes[::3] = True
    assert_same_as_scipy(stripes, conn)
    assert_same_as_scipy(stripes.T.copy(), conn)
    for r, c in [(0, 0), (0, 69), (39, 0), (39, 69)]:
        one = np.zeros((40, 70), bool)
        one[r, c] = True
        assert_same_as_scipy(one, conn)


def test_worst_cases_fit():
    # 4-connectivity: a checkerboard has pixels/2 components; 8: the lattice pixels/4.
    board = checkerboard(600, 601)
    labels, count = assert_same_as_scipy(board, 4)
    assert count == (600 * 601 + 1) // 2
    labels, count = assert_same_as_scipy(lattice(601, 600), 8)
    assert count == 301 * 300
    _, count = normlab.label(board, 8)
    assert count == 1


def test_real_images_match_scipy(cpu_target):
    for name, img in real_images().items():
        for conn in CONNS:
            assert_same_as_scipy(img, conn)


def test_layouts_and_dtypes(cpu_target, rng):
    base = (rng.random((70, 90)) < 0.45).astype(np.uint8)
    variants = {
        "fortran": np.asfortranarray(base),
        "strided": np.zeros((140, 270), np.uint8)[::2, ::3],
        "negative strides": base[::-1, ::-1],
        "transposed": base.T,
        "bool": base.astype(bool),
        "uint16": base.astype(np.uint16) * 513,
        "int8": base.astype(np.int8) * -3,
        "int32": base.astype(np.int32) * 100000,
        "uint64": base.astype(np.uint64) << np.uint64(40),
        "big-endian": base.astype(">u2") * 7,
        "big-endian int64": base.astype(">i8") * -9,
    }
    variants["strided"][...] = base[:, :90]
    for name, img in variants.items():
        for conn in CONNS:
            assert_same_as_scipy(img, conn)
    # Fortran order of every width, read 64 rows at a time down the columns (partial blocks)
    tall = rng.random((200, 150)) < 0.45
    for dtype in (bool, np.int8, np.uint16, np.int32, np.uint64, ">u2"):
        for img in (np.asfortranarray(tall.astype(dtype)), np.asfortranarray(tall.astype(dtype))[5:, 3:]):
            for conn in CONNS:
                assert_same_as_scipy(img, conn)
    # fortran 16-bit strided, and a column view of a wide image
    wide = (rng.random((50, 300)) < 0.5).astype(np.uint16)
    for img in (np.asfortranarray(wide)[:, 5:250:2], wide[:, 7:8], wide[3:4, :]):
        for conn in CONNS:
            assert_same_as_scipy(img, conn)


def test_values_and_background(rng):
    img = rng.integers(0, 4, (60, 75)).astype(np.uint16)
    for bg in (0, 1, 3, 65535):
        for conn in CONNS:
            assert_same_as_scipy(img, conn, background=bg)
    signed = rng.integers(-2, 2, (60, 75)).astype(np.int16)
    assert_same_as_scipy(signed, 8, background=-1)
    flags = rng.random((30, 40)) < 0.5
    assert_same_as_scipy(flags, 4, background=True)
    assert_same_as_scipy(flags, 8, background=1)


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "int64", "uint64"])
def test_label_dtypes_and_out(dtype, rng):
    img = rng.random((50, 61)) < 0.5
    ref, n = scipy_label(img, 8)
    labels, count = normlab.label(img, dtype=dtype)
    assert labels.dtype == np.dtype(dtype) and count == n
    np.testing.assert_array_equal(labels, ref)
    out = np.full(img.shape, 77, dtype)
    labels, count = normlab.label(img, out=out)  # dtype taken from out
    assert labels is out
    np.testing.assert_array_equal(out, ref)
    labels, count = normlab.label(img, dtype=dtype, out=out)
    assert labels is out


def test_uint16_boundary():
    labels, count = normlab.label(lattice(509, 513), 8, dtype=np.uint16)  # 255 * 257 = 65535
    assert count == 65535 and labels.max() == 65535
    with pytest.raises(OverflowError, match="65536"):
        normlab.label(lattice(511, 511), 8, dtype=np.uint16)  # 256 * 256


def test_read_only_image(rng):
    img = rng.random((40, 50)) < 0.5
    img.flags.writeable = False
    assert_same_as_scipy(img, 8)
    assert normlab.remove_small_components(img, 3).flags.writeable


def test_default_dtype():
    labels, count = normlab.label(np.ones((3, 3), bool))
    assert labels.dtype == np.int32 and isinstance(count, int) and count == 1


def test_empty_images():
    for shape in [(0, 0), (0, 7), (7, 0)]:
        labels, count, stats = normlab.label(np.zeros(shape, np.uint8), return_stats=True)
        assert labels.shape == shape and count == 0
        assert stats["area"].tolist() == [0]
        assert stats["bbox"].tolist() == [[0, 0, 0, 0]]
        assert np.isnan(stats["centroid"]).all()


def test_overflow_never_wraps():
    board = checkerboard(400, 400)  # 80000 components with 4-connectivity
    with pytest.raises(OverflowError, match="uint16"):
        normlab.label(board, 4, dtype=np.uint16)
    out = np.full(board.shape, 9, np.uint16)
    with pytest.raises(OverflowError):
        normlab.label(board, 4, out=out)
    assert (out == 9).all()  # untouched
    labels, count = normlab.label(board, 4, dtype=np.uint32)
    assert count == 80000 and labels.max() == 80000
    labels, count = normlab.label(board, 8, dtype=np.uint16)  # one component: fits
    assert count == 1


def test_wide_run_indices(rng):
    """The 64-bit run-index path (images of 2**31 runs or more), forced on small images."""
    normlab._core._ccl_force_wide_index(True)
    try:
        imgs = [rng.random((120, 130)) < p for p in (0.1, 0.5, 0.9)]
        imgs += [checkerboard(64, 65), spiral(40), real_images()["page<128"]]
        for img in imgs:
            for conn in CONNS:
                assert_same_as_scipy(img, conn)
                assert_stats_match_opencv(img, conn)
            assert normlab.remove_small_components(img, 3).dtype == img.dtype
    finally:
        normlab._core._ccl_force_wide_index(False)


def test_streamed_label_writes():
    """Labels larger than half the last-level cache are streamed out: force that path."""
    import os
    import subprocess
    import sys

    code = """
import numpy as np, scipy.ndimage as ndi, normlab
rng = np.random.default_rng(5)
for target in normlab.cpu_targets():
    normlab.set_cpu_target(target)
    for threads in (1, 3):
        normlab.set_num_threads(threads)
        for shape in [(1, 1), (3, 70), (257, 301), (64, 64)]:
            img = rng.random(shape) < 0.4
            ref, n = ndi.label(img, structure=np.ones((3, 3)))
            for dtype in ("uint16", "uint32", "int32", "int64", "uint64"):
                labels, count, stats = normlab.label(img, dtype=dtype, return_stats=True)
                assert count == n and (labels == ref).all(), (target, threads, shape, dtype)
                assert stats["area"][1:].sum() == img.sum()
print("ok")
"""
    env = dict(os.environ, NORMLAB_STREAM_MIN_BYTES="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- threads and targets ---------------------------------------------------------------------


def test_identical_for_1_2_3_threads(cpu_target, num_threads, rng):
    images = [
        rng.random((310, 257)) < 0.5,
        rng.random((257, 310)) < 0.15,
        np.kron(rng.random((80, 80)) < 0.6, np.ones((4, 4), bool)),
        checkerboard(300, 300),
        lattice(301, 299),
        spiral(301),
        np.ones((2, 40000), bool),  # fewer rows than threads
        rng.random((3, 40000)) < 0.7,
        np.asfortranarray(rng.random((333, 260)) < 0.5),
        real_images()["camera>128"],
    ]
    for img in images:
        for conn in CONNS:
            results = []
            for threads in (1, 2, 3):
                normlab.set_num_threads(threads)
                labels, count, stats = normlab.label(img, conn, return_stats=True)
                results.append((labels, count, stats))
            ref, n = scipy_label(img, conn)
            for labels, count, stats in results:
                assert count == n
                np.testing.assert_array_equal(labels, ref)
                for key in ("area", "bbox", "centroid"):
                    np.testing.assert_array_equal(stats[key], results[0][2][key])
            areas = results[0][2]["area"]
            largest = ref == (int(np.argmax(areas[1:])) + 1) if n else np.zeros(img.shape, bool)
            kept = (areas[ref] >= 5) & (ref > 0)
            for threads in (1, 2, 3):
                normlab.set_num_threads(threads)
                np.testing.assert_array_equal(normlab.largest_component(img, conn), largest)
                np.testing.assert_array_equal(normlab.remove_small_components(img, 5, conn) != 0, kept)


def test_dense_and_sparse_rows_mixed(cpu_target, num_threads, rng):
    """Rows of many short runs (noise) and rows of few long ones (blobs) are united by different
    code for 4-connectivity: images switching between them, down the rows and across them."""
    for h, w in ((300, 257), (517, 130), (64, 1000)):
        blobs = np.kron(rng.random((h // 8 + 1, w // 8 + 1)) < 0.5, np.ones((8, 8), bool))[:h, :w]
        noise = rng.random((h, w)) < 0.5
        down = np.where((rng.random(h) < 0.5)[:, None], noise, blobs)
        across = np.where((np.arange(w) < w // 3)[None, :], noise, blobs)
        for img in (down, across, np.asfortranarray(down)):
            for threads in (1, 3):
                normlab.set_num_threads(threads)
                for conn in CONNS:
                    assert_same_as_scipy(img, conn)


def test_large_images_in_turn_and_concurrently(num_threads, rng):
    # Images of a million pixels or more keep their run arrays in mappings reused by later calls
    # (whatever those calls left in them), also from several Python threads at once.
    images = [
        rng.random((1100, 1000)) < 0.5,
        np.kron(rng.random((300, 350)) < 0.6, np.ones((4, 4), bool)),
        rng.random((1024, 1030)) < 0.3,
        np.asfortranarray(rng.random((1200, 900)) < 0.55),
    ]
    refs = {(k, conn): scipy_label(img, conn) for k, img in enumerate(images) for conn in CONNS}
    for order in ([0, 1, 2, 3], [3, 2, 1, 0, 0, 2]):
        for k in order:
            for conn in CONNS:
                labels, count = normlab.label(images[k], conn)
                ref, n = refs[(k, conn)]
                assert count == n
                np.testing.assert_array_equal(labels, ref)
    import threading

    failures = []

    def work(start):
        for step in range(6):
            k, conn = (start + step) % len(images), CONNS[step % 2]
            labels, count = normlab.label(images[k], conn)
            ref, n = refs[(k, conn)]
            if count != n or not np.array_equal(labels, ref):
                failures.append((k, conn))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# ---- statistics: as OpenCV ------------------------------------------------------------------


def opencv_stats(img, conn):
    n, cv_labels, st, cent = cv2.connectedComponentsWithStats(
        (img != 0).astype(np.uint8), connectivity=conn, ltype=cv2.CV_32S)
    x, y, w, h, area = st.T
    bbox = np.stack([y, x, y + h, x + w], axis=1).astype(np.int64)
    centroid = cent[:, ::-1]  # (x, y) -> (row, col)
    return n - 1, cv_labels, area.astype(np.int64), bbox, centroid


def assert_stats_match_opencv(img, conn):
    labels, count, stats = normlab.label(img, conn, return_stats=True)
    n, cv_labels, area, bbox, centroid = opencv_stats(img, conn)
    assert count == n
    # OpenCV's block-based scans (BBDT / Spaghetti, two rows at a time) do not always number in
    # pixel raster order: check the two labelings are the same partition, then compare the
    # statistics through the label correspondence.
    perm = np.zeros(n + 1, np.int64)
    perm[labels.ravel()] = cv_labels.ravel()
    np.testing.assert_array_equal(perm[labels], cv_labels)
    assert np.unique(perm).size == n + 1 and perm[0] == 0
    area, bbox, centroid = area[perm], bbox[perm], centroid[perm]
    assert stats["area"].dtype == np.int64 and stats["bbox"].dtype == np.int64
    assert stats["centroid"].dtype == np.float64
    assert stats["area"].shape == (n + 1,) and stats["bbox"].shape == (n + 1, 4)
    assert stats["centroid"].shape == (n + 1, 2)
    has_bg = area[0] > 0
    first = 0 if has_bg else 1
    np.testing.assert_array_equal(stats["area"], area)
    np.testing.assert_array_equal(stats["bbox"][first:], bbox[first:])
    np.testing.assert_allclose(stats["centroid"][first:], centroid[first:], rtol=1e-13, atol=0)
    if not has_bg:
        assert stats["bbox"][0].tolist() == [0, 0, 0, 0]
        assert np.isnan(stats["centroid"][0]).all()
    # the second pass over the labels agrees exactly
    again = normlab.component_stats(labels, count)
    for key in ("area", "bbox", "centroid"):
        np.testing.assert_array_equal(again[key], stats[key])
    return stats


def test_stats_match_opencv(cpu_target, rng):
    for shape, p, img in random_images(rng):
        if 0 in shape:
            continue
        for conn in CONNS:
            assert_stats_match_opencv(img, conn)


def test_stats_special_and_real_images():
    imgs = [np.ones((5, 7), np.uint8), np.zeros((5, 7), np.uint8), checkerboard(31, 40),
            lattice(30, 41), spiral(40)]
    imgs += list(real_images().values())
    for img in imgs:
        for conn in CONNS:
            assert_stats_match_opencv(img, conn)
    stats = assert_stats_match_opencv(np.ones((5, 7), np.uint8), 8)
    assert stats["area"].tolist() == [0, 35]
    assert stats["bbox"].tolist() == [[0, 0, 0, 0], [0, 0, 5, 7]]
    assert stats["centroid"][1].tolist() == [2.0, 3.0]


def test_background_row_bbox():
    img = np.ones((6, 8), np.uint8)
    img[2, 3] = 0
    img[4, 5] = 0
    _, _, stats = normlab.label(img, return_stats=True)
    assert stats["area"][0] == 2
    assert stats["bbox"][0].tolist() == [2, 3, 5, 6]
    assert stats["centroid"][0].tolist() == [3.0, 4.0]


def test_component_stats_arguments(rng):
    labels, count = normlab.label(rng.random((20, 30)) < 0.5)
    ref = normlab.component_stats(labels, count)
    for variant in (labels.astype(np.int64), labels.astype(np.uint16), np.asfortranarray(labels),
                    labels.astype(">i4")):
        got = normlab.component_stats(variant)
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key])
    bigger = normlab.component_stats(labels, count + 2)  # missing labels: empty rows
    assert bigger["area"][-2:].tolist() == [0, 0]
    assert np.isnan(bigger["centroid"][-1]).all()
    with pytest.raises(ValueError, match="count"):
        normlab.component_stats(labels, count - 1)
    with pytest.raises(ValueError, match="count"):
        normlab.component_stats(labels, -1)
    with pytest.raises(ValueError):
        normlab.component_stats(np.array([[0, -1]], np.int32))
    with pytest.raises(TypeError, match="labels"):
        normlab.component_stats(labels.astype(np.float32))
    with pytest.raises(TypeError, match="labels"):
        normlab.component_stats(labels[None])
    with pytest.raises(TypeError, match="count"):
        normlab.component_stats(labels, 2.5)


# ---- largest_component and remove_small_components ----------------------------------------


def reference_areas(img, conn, background=0):
    ref, n = scipy_label(img, conn, background)
    return ref, np.bincount(ref.ravel(), minlength=n + 1)


@pytest.mark.parametrize("conn", CONNS)
def test_largest_component(cpu_target, conn, rng):
    imgs = [rng.random((80, 90)) < p for p in (0.2, 0.5, 0.6)] + [real_images()["coins>100"]]
    for img in imgs:
        ref, areas = reference_areas(img, conn)
        best = int(np.argmax(areas[1:])) + 1
        mask = normlab.largest_component(img, conn)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, ref == best)
    assert not normlab.largest_component(np.zeros((4, 5), np.uint8), conn).any()
    tie = np.zeros((5, 9), bool)
    tie[1, 5:8] = True  # first in raster order: label 1
    tie[3, 0:3] = True
    np.testing.assert_array_equal(normlab.largest_component(tie, conn), tie & (np.arange(5)[:, None] == 1))
    out = np.ones((5, 9), bool)
    assert normlab.largest_component(tie, conn, out=out) is out


@pytest.mark.parametrize("conn", CONNS)
def test_remove_small_components(cpu_target, conn, rng):
    img = rng.integers(0, 3, (90, 110)).astype(np.uint16) * (rng.random((90, 110)) < 0.5)
    ref, areas = reference_areas(img, conn)
    for min_size in (0, 1, 2, 5, 30, 10**9):
        expected = np.where(areas[ref] >= min_size, img, 0)
        expected[ref == 0] = img[ref == 0]
        got = normlab.remove_small_components(img, min_size, conn)
        assert got.dtype == img.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)
        got = normlab.remove_small_components(np.asfortranarray(img)[::-1], min_size, conn)
        np.testing.assert_array_equal(got, normlab.remove_small_components(img[::-1].copy(), min_size, conn))
    # a non-zero background, bool images, in place
    bg_img = np.where(img == 0, 7, img).astype(np.uint16)
    got = normlab.remove_small_components(bg_img, 5, conn, background=7)
    expected = np.where(areas[ref] >= 5, bg_img, 7)
    expected[ref == 0] = 7
    np.testing.assert_array_equal(got, expected)
    swapped = normlab.remove_small_components(img.astype(">u2"), 5, conn)
    assert swapped.dtype == np.dtype(">u2")
    np.testing.assert_array_equal(swapped, normlab.remove_small_components(img, 5, conn))
    mask = img != 0
    inplace = mask.copy()
    result = normlab.remove_small_components(inplace, 4, conn, out=inplace)
    assert result is inplace
    np.testing.assert_array_equal(inplace, (areas[ref] >= 4) & (ref > 0))


# ---- bad arguments -------------------------------------------------------------------------


def test_bad_arguments():
    img = np.ones((4, 5), np.uint8)
    with pytest.raises(TypeError, match="image"):
        normlab.label(np.ones((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match="image"):  # also a ValueError
        normlab.label(np.ones(5, np.uint8))
    with pytest.raises(TypeError, match="image"):
        normlab.label(np.ones((3, 3), np.float32))
    with pytest.raises(TypeError, match="image"):
        normlab.label([[1, 0], [0, 1]])
    with pytest.raises(TypeError, match="image"):
        normlab.label(np.ones((3, 3), complex))
    with pytest.raises(ValueError, match="connectivity"):
        normlab.label(img, 5)
    with pytest.raises(ValueError, match="connectivity"):
        normlab.largest_component(img, 6)
    with pytest.raises(TypeError, match="connectivity"):
        normlab.label(img, 8.0)
    with pytest.raises(TypeError, match="dtype"):
        normlab.label(img, dtype=np.float64)
    with pytest.raises(TypeError, match="dtype"):
        normlab.label(img, dtype=np.int8)
    with pytest.raises(TypeError, match="dtype"):
        normlab.label(img, dtype="not a dtype")
    with pytest.raises(ValueError, match="background"):
        normlab.label(img, background=256)
    with pytest.raises(TypeError, match="background"):
        normlab.label(img, background=0.5)
    with pytest.raises(TypeError, match="return_stats"):
        normlab.label(img, return_stats="yes")
    with pytest.raises(ValueError, match="min_size"):
        normlab.remove_small_components(img, -1)
    with pytest.raises(TypeError, match="min_size"):
        normlab.remove_small_components(img, 2.5)


def test_bad_out():
    img = np.ones((4, 5), np.uint8)
    with pytest.raises(ValueError, match="out"):
        normlab.label(img, out=np.empty((5, 4), np.int32))
    with pytest.raises(TypeError, match="out"):
        normlab.label(img, dtype=np.int64, out=np.empty((4, 5), np.int32))
    with pytest.raises(TypeError, match="out"):
        normlab.label(img, out=np.empty((4, 5), np.float64))
    with pytest.raises(TypeError, match="out"):
        normlab.label(img, out=[[0] * 5] * 4)
    ro = np.empty((4, 5), np.int32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        normlab.label(img, out=ro)
    with pytest.raises(ValueError, match="C-contiguous"):
        normlab.label(img, out=np.empty((5, 4), np.int32).T)
    with pytest.raises(ValueError, match="C-contiguous"):
        normlab.label(img, out=np.empty((4, 10), np.int32)[:, ::2])
    shared = np.ones((4, 5), np.int32)
    with pytest.raises(ValueError, match="overlap"):
        normlab.label(shared, out=shared)
    with pytest.raises(TypeError, match="out"):
        normlab.largest_component(img, out=np.empty((4, 5), np.uint8))
    with pytest.raises(TypeError, match="out"):
        normlab.remove_small_components(img, 2, out=np.empty((4, 5), np.uint16))
    base = np.ones(25, np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        normlab.remove_small_components(base[:20].reshape(4, 5), 2, out=base[5:].reshape(4, 5))


def test_gil_released_and_threads_independent(rng):
    import threading

    img = rng.random((400, 400)) < 0.5
    ref, n = scipy_label(img, 8)
    results = []

    def work():
        results.append(normlab.label(img))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for labels, count in results:
        assert count == n
        np.testing.assert_array_equal(labels, ref)
