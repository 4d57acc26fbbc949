"""Feature files (community HDF5 layouts), the stand-in builder, and the probe."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.sparse import csr_matrix

from minivln.features.hdf5 import (
    NUM_CLASSES,
    FeatureStore,
    FeatureWriter,
    MissingFeatureError,
    ObjectFeatures,
    ObjectFeatureStore,
    ObjectFeatureWriter,
    probs_to_logits,
)
from minivln.features.standin import Sparse
from minivln.paths import DataError

SCAN, VP = "scanA", "0123abcd"


def _write_raw(path, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
    """A community-style file: one dataset per key, no MiniVLN attributes unless given."""
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


# -- the stand-in builder's sparse products ----------------------------------------------------------
def test_sparse_products_are_scipys_bit_for_bit():
    """The builder's NumPy sparse matrix gives the same floats as scipy's CSR (each row summed in column
    order, a position given twice summed), so the stand-in features did not change when scipy left."""
    rng = np.random.default_rng(0)
    shape = (300, 40)
    cells = rng.choice(shape[0] * shape[1], 2000, replace=False)
    cells = np.concatenate([cells, cells[:300]])  # 300 positions given twice (more: scipy's order is its own)
    rows, cols = cells // shape[1], cells % shape[1]
    nnz = len(cells)
    vals = rng.random(nnz) ** 3  # float64 values, stored as float32
    ours = Sparse.of(vals, rows, cols, shape)
    ref = csr_matrix((vals, (rows, cols)), shape=shape, dtype=np.float32)
    ref.sum_duplicates()
    assert len(ours.vals) == ref.nnz < nnz  # some positions repeat
    for x in (rng.standard_normal((shape[1], 384)).astype(np.float32), rng.standard_normal((shape[1], 7))):
        got, want = ours.dot(x), np.asarray(ref @ x)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    y = rng.standard_normal((shape[0], 5)).astype(np.float32)
    assert ours.transpose().dot(y).tobytes() == np.asarray(ref.T @ y).tobytes()
    counts = Sparse.of(np.ones(nnz), rows, cols, shape)  # the builder sums counts (exact in any order)
    ref_counts = csr_matrix((np.ones(nnz), (rows, cols)), shape=shape, dtype=np.float32)
    for axis in (0, 1):
        assert counts.sum(axis).tobytes() == np.asarray(ref_counts.sum(axis)).ravel().tobytes()
    assert counts.vals.max() == 2 and counts.sum(1).sum() == nnz
    other = Sparse.of(rng.random(50), rng.integers(0, shape[0], 50), rng.integers(0, shape[1], 50), shape)
    both = ours.plus(other)
    dense = np.asarray((ref + csr_matrix((other.vals, (other.rows, other.cols)), shape=shape)).todense())
    np.testing.assert_array_equal(np.asarray(csr_matrix((both.vals, (both.rows, both.cols)), shape=shape).todense()),
                                  dense)


# -- reader / writer -------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [512, 768, 1024])
def test_roundtrip_community_dims(tmp_path, dim):
    rng = np.random.default_rng(dim)
    data = {f"{SCAN}_{i}": rng.standard_normal((36, dim)).astype(np.float32) for i in range(3)}
    path = tmp_path / "f.hdf5"
    _write_raw(path, data)
    store = FeatureStore(path)
    assert store.dim == dim and not store.is_standin and not store.has_classes
    for key, arr in data.items():
        got = store.get(SCAN, key.split("_", 1)[1])
        assert got.shape == (36, dim) and got.dtype == np.float32
        np.testing.assert_array_equal(got, arr)
    assert FeatureStore(path, expected_dim=dim).dim == dim


def test_roundtrip_768_plus_1000_logits(tmp_path):
    rng = np.random.default_rng(0)
    fts = rng.standard_normal((36, 768)).astype(np.float32)
    logits = rng.standard_normal((36, NUM_CLASSES)).astype(np.float32)
    path = tmp_path / "f.hdf5"
    _write_raw(path, {f"{SCAN}_{VP}": np.concatenate([fts, logits], 1)})
    store = FeatureStore(path, expected_dim=768)
    assert store.dim == 768 and store.class_layout == "concat"
    np.testing.assert_array_equal(store.get(SCAN, VP), fts)
    probs = store.classes(SCAN, VP)
    assert probs.shape == (36, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), rtol=1e-4, atol=1e-7)
    assert FeatureStore(path).dim == 768  # inferred without a hint


@pytest.mark.parametrize("layout", ["separate", "concat"])
def test_writer_class_layouts(tmp_path, layout):
    rng = np.random.default_rng(1)
    fts = rng.standard_normal((36, 768)).astype(np.float32)
    probs = rng.dirichlet(np.ones(NUM_CLASSES) * 0.05, size=36).astype(np.float32)
    path = tmp_path / "f.hdf5"
    with FeatureWriter(path, dim=768, standin=True, description="test stand-in", class_layout=layout,
                       dtype="float32") as w:
        w.add(SCAN, VP, fts, probs)
    store = FeatureStore(path, expected_dim=768)
    assert store.is_standin and store.description == "test stand-in"
    assert store.class_layout == layout
    np.testing.assert_allclose(store.get(SCAN, VP), fts, rtol=1e-6)
    np.testing.assert_allclose(store.classes(SCAN, VP), probs, atol=2e-3)


def test_compressed_features_read_back_the_same_and_take_less_disk(tmp_path):
    rng = np.random.default_rng(2)
    views = {f"vp{i}": rng.standard_normal((36, 768)).astype(np.float16) for i in range(20)}
    for fts in views.values():
        fts[:12, :256] = 0  # views with nothing near, as stand-in features have
    sizes = {}
    for compress in (False, True):
        path = tmp_path / f"f{compress}.hdf5"
        with FeatureWriter(path, dim=768, standin=True, description="x", compress=compress) as w:
            for vp, fts in views.items():
                w.add(SCAN, vp, fts)
        store = FeatureStore(path, expected_dim=768)
        for vp, fts in views.items():
            assert np.asarray(store.get(SCAN, vp), np.float32).tobytes() == fts.astype(np.float32).tobytes()
        sizes[compress] = path.stat().st_size
    assert sizes[True] < 0.95 * sizes[False]


def test_wrong_dim_names_expected_and_found(tmp_path):
    path = tmp_path / "f.hdf5"
    _write_raw(path, {f"{SCAN}_{VP}": np.zeros((36, 512), np.float32)})
    with pytest.raises(DataError, match=r"expected view features of dim 768.*found dim 512"):
        FeatureStore(path, expected_dim=768).get(SCAN, VP)
    odd = tmp_path / "odd.hdf5"
    _write_raw(odd, {f"{SCAN}_{VP}": np.zeros((12, 768), np.float32)})
    with pytest.raises(DataError, match=r"\(12, 768\)"):
        FeatureStore(odd).dim


def test_missing_key_names_the_key(tmp_path):
    path = tmp_path / "f.hdf5"
    _write_raw(path, {f"{SCAN}_{VP}": np.zeros((36, 768), np.float32)})
    store = FeatureStore(path)
    with pytest.raises(MissingFeatureError, match=f"{SCAN}_nothere"):
        store.get(SCAN, "nothere")
    with pytest.raises(KeyError):  # also a KeyError for callers that expect one
        store.get(SCAN, "nothere")
    with pytest.raises(DataError, match="does not exist"):
        FeatureStore(tmp_path / "absent.hdf5")


def test_lru_bound_respected(tmp_path):
    path = tmp_path / "f.hdf5"
    _write_raw(path, {f"{SCAN}_{i}": np.full((36, 512), i, np.float32) for i in range(10)})
    store = FeatureStore(path, cache_size=3)
    for i in range(10):
        assert store.get(SCAN, str(i))[0, 0] == i
        assert store.cache_info()["size"] <= 3
    store.get(SCAN, "9")  # most recent: a hit
    store.get(SCAN, "0")  # evicted long ago: a miss
    info = store.cache_info()
    assert info == {"size": 3, "max": 3, "hits": 1, "misses": 11}
    store.get(SCAN, "8")  # still cached (recently used)
    assert store.cache_info()["hits"] == 2
    assert FeatureStore(path, cache_size=0).get(SCAN, "1")[0, 0] == 1


def test_standin_attribute_read(tmp_path):
    path = tmp_path / "f.hdf5"
    _write_raw(path, {f"{SCAN}_{VP}": np.zeros((36, 768), np.float32)},
               {"standin": True, "description": "made up"})
    store = FeatureStore(path)
    assert store.is_standin and store.description == "made up"
    plain = tmp_path / "plain.hdf5"
    _write_raw(plain, {f"{SCAN}_{VP}": np.zeros((36, 768), np.float32)})
    assert not FeatureStore(plain).is_standin


def test_object_store_layouts(tmp_path):
    rng = np.random.default_rng(2)
    k = 4
    fts = rng.standard_normal((k, 768)).astype(np.float32)
    # Community layout: dataset + attributes.
    p1 = tmp_path / "obj1.hdf5"
    with h5py.File(p1, "w") as f:
        ds = f.create_dataset(f"{SCAN}_{VP}", data=fts)
        ds.attrs["obj_ids"] = np.arange(k)
        ds.attrs["directions"] = rng.uniform(-1, 1, (k, 2))
        ds.attrs["sizes"] = np.full((k, 2), 10.0)
        ds.attrs["bboxes"] = np.tile([0.0, 0.0, 10.0, 10.0], (k, 1))
    # Group layout written by the MiniVLN writer.
    p2 = tmp_path / "obj2.hdf5"
    objs = ObjectFeatures(fts, np.arange(k), np.zeros((k, 2)), np.ones((k, 2)), np.zeros((k, 4)),
                          np.arange(k), [f"thing{i}" for i in range(k)])
    with ObjectFeatureWriter(p2, dim=768, standin=True, description="objs", dtype="float32") as w:
        w.add(SCAN, VP, objs)
    for path in (p1, p2):
        store = ObjectFeatureStore(path, expected_dim=768)
        got = store.get(SCAN, VP)
        assert len(got) == k and got.fts.shape == (k, 768)
        np.testing.assert_allclose(got.fts, fts, rtol=1e-6)
        np.testing.assert_array_equal(got.obj_ids, np.arange(k))
        assert len(store.get(SCAN, "empty")) == 0  # a viewpoint without objects
    assert ObjectFeatureStore(p2).get(SCAN, VP).names == [f"thing{i}" for i in range(k)]
    assert ObjectFeatureStore(p2).is_standin
    with pytest.raises(DataError, match="expected object features of dim 512, found dim 768"):
        ObjectFeatureStore(p1, expected_dim=512).dim
    with pytest.raises(MissingFeatureError, match=f"{SCAN}_empty"):
        ObjectFeatureStore(p1, strict=True).get(SCAN, "empty")


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "out.hdf5"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with FeatureWriter(path, dim=768, standin=True, description="x") as w:
            w.add(SCAN, VP, np.zeros((36, 768)))
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.hdf5"]
    with pytest.raises(DataError, match=r"expected \(36, 768\)"):
        with FeatureWriter(path, dim=768, standin=True, description="x") as w:
            w.add(SCAN, VP, np.zeros((36, 512)))
    assert path.read_bytes() == b"old"
    assert probs_to_logits(np.array([1.0, 0.0])).argmax() == 0


# -- stand-in on real houses -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def resources(real_data_dir):
    from minivln.features.standin import Resources

    return Resources(real_data_dir)


@pytest.mark.realdata
def test_standin_real_house(real_data_dir, resources):
    from minivln.data.graph import load_house
    from minivln.features.standin import (
        ROOM_WORDS,
        StandinConfig,
        build_house_features,
        load_house_objects,
        text_query,
    )

    house = load_house("Pm6F8kyY3z2", real_data_dir)  # small, with beds
    objs = load_house_objects(house, real_data_dir)
    hf = build_house_features(house, objs, resources, StandinConfig())
    n = len(house)
    assert hf.fts.shape == (n, 36, 768) and hf.fts.dtype == np.float32
    assert np.isfinite(hf.fts).all() and np.abs(hf.fts).max() < 10
    assert hf.class_probs.shape == (n, 36, NUM_CLASSES)
    np.testing.assert_allclose(hf.class_probs.sum(-1), 1.0, atol=1e-4)
    assert hf.rooms.shape == (n, len(ROOM_WORDS))
    assert len(hf.objects) == n and sum(len(o) for o in hf.objects) > 0

    # Views with a bed box are more like the text "bed" than views without one.
    bed = np.zeros((n, 36), bool)
    for ob in objs.observations:
        if objs.names[ob.obj] == "bed":
            bed[ob.vp, ob.view] = True
    assert bed.any() and (~bed).any()
    q = text_query(resources.embedder.embed_one("bed"), 768)
    f = hf.fts / np.maximum(np.linalg.norm(hf.fts, axis=-1, keepdims=True), 1e-8)
    sim = f @ (q / np.linalg.norm(q))
    assert sim[bed].mean() > sim[~bed].mean() + 0.05
    # and the bed class is where the boxes are
    bed_class = resources.class_names.index("bed")
    assert hf.class_probs[bed, bed_class].min() > 0
    # Bedrooms are more likely where beds are than elsewhere.
    bed_vps = bed.any(1)
    p_bedroom = hf.rooms[:, ROOM_WORDS.index("bedroom")]
    assert p_bedroom[bed_vps].mean() > p_bedroom[~bed_vps].mean()


@pytest.mark.realdata
def test_build_files_and_atomicity(real_data_dir, resources, tmp_path):
    from minivln.features.standin import build_standin

    out, objs_out = tmp_path / "views.hdf5", tmp_path / "objs.hdf5"
    summary = build_standin(real_data_dir, out, objects_out=objs_out, scans=["17DRP5sb8fy"], res=resources)
    assert summary["viewpoints"] == 44 and summary["objects"] > 0
    store = FeatureStore(out, expected_dim=768)
    assert store.is_standin and "STAND-IN" in store.description
    assert len(store) == 44 and store.class_layout == "separate"
    key = next(store.keys())
    scan, vp = key.split("_", 1)
    assert store.get(scan, vp).shape == (36, 768)
    np.testing.assert_allclose(store.classes(scan, vp).sum(1), 1.0, atol=2e-2)
    ostore = ObjectFeatureStore(objs_out, expected_dim=768)
    assert ostore.is_standin
    got = [ostore.get(*k.split("_", 1)) for k in ostore.keys()]
    assert sum(len(o) for o in got) == summary["objects"]
    o = got[0]
    assert (o.bboxes[:, 2] >= o.bboxes[:, 0]).all() and (o.view_ids >= 0).all() and o.names

    # A failure half-way leaves no file behind (and no temporary file either).
    def boom(_):
        raise RuntimeError("interrupted")

    bad, bad_objs = tmp_path / "bad.hdf5", tmp_path / "bad_objs.hdf5"
    with pytest.raises(RuntimeError, match="interrupted"):
        build_standin(real_data_dir, bad, objects_out=bad_objs, scans=["17DRP5sb8fy"], res=resources,
                      on_house=boom)
    assert not bad.exists() and not bad_objs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objs.hdf5", "views.hdf5"]


@pytest.mark.realdata
def test_probe_and_cli(real_data_dir, resources, tmp_path, capsys):
    from minivln.cli import main
    from minivln.data.datasets import load_episodes
    from minivln.features.probe import run_probe
    from minivln.features.standin import build_standin

    eps = load_episodes("r2r", "val_unseen", real_data_dir)[:6]
    scans = sorted({e.scan for e in eps})
    out = tmp_path / "views.hdf5"
    build_standin(real_data_dir, out, scans=scans, res=resources)
    report = run_probe(real_data_dir, out, split="val_unseen", limit=6)
    assert report.steps > 0 and report.standin is True
    assert 0.0 <= report.accuracy <= 1.0 and 0.0 < report.random < 1.0
    assert set(report.baselines) == {"overlap_near", "overlap_near_far"}
    assert main(["features", "info", str(out)]) == 0
    assert "STAND-IN" in capsys.readouterr().out
    assert main(["features", "probe", "--data-dir", str(real_data_dir), "--features", str(out),
                 "--limit", "6", "--no-baselines"]) == 0
    assert "STAND-IN" in capsys.readouterr().out


@pytest.mark.realdata
def test_embedder_semantics(resources):
    e = resources.embedder.embed(["bed", "bedroom", "kitchen sink", "bed"])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]
    np.testing.assert_array_equal(e[0], e[3])
