"""Tests for edgehmoe.data.partition: IID and Dirichlet partitioners, shard files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgehmoe.data import ImageDataset, make_synthetic
from edgehmoe.data.partition import (
    DirichletPartitioner,
    IidPartitioner,
    ShardError,
    load_shard,
    make_partitioner,
    write_shards,
)


def tiny_dataset(per_class: int = 10) -> ImageDataset:
    """2 superclasses × 3 classes of 8×8 synthetic images:
    root ─ super0 ─ disc, square, triangle
         └ super1 ─ disc, square, triangle"""
    x, y, names, tree = make_synthetic(coarse=2, fine=3, per_class=per_class, size=8)
    return ImageDataset(x=x, y=y, class_names=names, hierarchy=tree, name="synthetic", split="train")


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    k = labels.max() + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum() for p in parts]))


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == n and np.array_equal(np.sort(merged), np.arange(n))


# ---------------------------------------------------------------------- partitioners
def test_iid_balanced_disjoint_covering():
    # Prepare
    labels = np.repeat(np.arange(10), 1003)
    part = IidPartitioner(7, seed=1)

    # Execute
    parts = part.partition(labels)
    again = IidPartitioner(7, seed=1).partition(labels)

    # Assert
    assert len(parts) == 7
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert_disjoint_cover(parts, len(labels))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    np.testing.assert_array_equal(part.load_partition(3), parts[3])
    assert label_skew(labels, parts) < 0.1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    # Prepare
    labels = np.repeat(np.arange(20), 100)

    # Execute
    skews = {a: label_skew(labels, DirichletPartitioner(10, a, seed=0).partition(labels)) for a in (100.0, 1.0, 0.1)}
    parts = DirichletPartitioner(10, 0.3, seed=5).partition(labels)
    same = DirichletPartitioner(10, 0.3, seed=5).partition(labels)
    other = DirichletPartitioner(10, 0.3, seed=6).partition(labels)

    # Assert
    assert skews[100.0] < skews[1.0] < skews[0.1], skews
    assert skews[100.0] < 0.1 and skews[0.1] > 0.5
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_partitioner_parameters_validated():
    # Execute / Assert
    for alpha in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            DirichletPartitioner(4, alpha)
    with pytest.raises(ValueError, match="num_partitions must be a positive integer"):
        IidPartitioner(0)
    with pytest.raises(ValueError, match="cannot split 3 samples into 4"):
        IidPartitioner(4).partition(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="cannot give 4 partitions of at least 10"):
        DirichletPartitioner(4, 1.0).partition(np.zeros(30, np.int64))
    with pytest.raises(ValueError, match="no Dirichlet.*raise alpha"):
        DirichletPartitioner(5, 0.01, min_partition_size=15, max_retries=2).partition(np.repeat(np.arange(5), 20))
    with pytest.raises(RuntimeError, match=r"call partition\(labels\) before"):
        IidPartitioner(2).load_partition(0)


def test_make_partitioner():
    # Execute
    iid = make_partitioner("iid", 3, seed=4)
    dirichlet = make_partitioner("dirichlet:0.5", 3, seed=4, min_partition_size=2)

    # Assert
    assert isinstance(iid, IidPartitioner) and iid.seed == 4 and iid.num_partitions == 3
    assert isinstance(dirichlet, DirichletPartitioner) and dirichlet.alpha.tolist() == [0.5] * 3
    with pytest.raises(ValueError, match=r"unknown partitioner 'shards'; valid: iid.*dirichlet:ALPHA"):
        make_partitioner("shards", 3)
    with pytest.raises(ValueError, match="dirichlet:ALPHA"):
        make_partitioner("dirichlet:abc", 3)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        make_partitioner("dirichlet:0", 3)


# ---------------------------------------------------------------------- shards
def test_shards_round_trip(tmp_path):
    # Prepare
    ds = tiny_dataset()
    part = DirichletPartitioner(3, 1.0, seed=2, min_partition_size=5)

    # Execute
    paths = write_shards(ds, part, tmp_path / "shards")
    shards = [load_shard(p) for p in paths]
    info = json.loads((tmp_path / "shards" / "partition.json").read_text())

    # Assert
    assert [p.name for p in paths] == ["device_000.npz", "device_001.npz", "device_002.npz"]
    assert sum(len(s) for s in shards) == len(ds)
    for i, (s, idx) in enumerate(zip(shards, part.partition(ds.y))):
        np.testing.assert_array_equal(s.x, ds.x[idx])
        np.testing.assert_array_equal(s.label, ds.y[idx])
        assert s.label.dtype == np.int64 and s.class_names == ds.class_names
        assert s.meta["shard"] == i and s.meta["num_shards"] == 3 and s.meta["seed"] == 2
        assert s.meta["dataset"] == "synthetic" and s.hierarchy == ds.hierarchy
        assert info["shards"][i]["class_counts"] == s.class_counts().tolist()
        as_ds = s.to_dataset()
        assert as_ds.split == f"shard{i}" and len(as_ds) == len(s)
    with np.load(paths[0], allow_pickle=False) as z:
        assert z["class_names"].dtype.kind == "U" and z["meta"].dtype.kind == "U"
    assert info["partitioner"]["name"] == "DirichletPartitioner" and info["partitioner"]["alpha"] == 1.0


def test_shards_not_overwritten_unless_asked(tmp_path):
    # Prepare
    ds = tiny_dataset()
    write_shards(ds, IidPartitioner(4), tmp_path)

    # Execute / Assert
    with pytest.raises(FileExistsError, match="already holds shards.*overwrite=True"):
        write_shards(ds, IidPartitioner(2), tmp_path)
    paths = write_shards(ds, IidPartitioner(2, seed=1), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("device_*.npz")) == ["device_000.npz", "device_001.npz"]
    assert [len(load_shard(p)) for p in paths] == [30, 30]


def test_corrupt_or_wrong_shards_rejected(tmp_path):
    # Prepare
    ds = tiny_dataset()
    (good,) = write_shards(ds, IidPartitioner(1), tmp_path / "ok")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "nolabel.npz", **{k: v for k, v in arrays.items() if k != "label"})
    np.savez(tmp_path / "int32.npz", **{**arrays, "label": arrays["label"].astype(np.int32)})
    meta = json.loads(str(arrays["meta"]))
    np.savez(tmp_path / "v9.npz", **{**arrays, "meta": np.asarray(json.dumps({**meta, "version": 9}))})
    np.savez(tmp_path / "range.npz", **{**arrays, "label": arrays["label"] + 6})

    # Execute / Assert
    with pytest.raises(ShardError, match="cannot read shard .*truncated"):
        load_shard(truncated)
    with pytest.raises(ShardError, match="lacks array.*label"):
        load_shard(tmp_path / "nolabel.npz")
    with pytest.raises(ShardError, match="'label' must be int64"):
        load_shard(tmp_path / "int32.npz")
    with pytest.raises(ShardError, match="format version 9"):
        load_shard(tmp_path / "v9.npz")
    with pytest.raises(ShardError, match=r"labels must be in 0\.\.5"):
        load_shard(tmp_path / "range.npz")
    with pytest.raises(ShardError, match="does not exist"):
        load_shard(tmp_path / "absent.npz")


def test_shard_readable_as_npz_dataset(tmp_path):
    # Prepare
    from edgehmoe.data import load_dataset

    ds = tiny_dataset()
    (path,) = write_shards(ds, IidPartitioner(1), tmp_path)

    # Execute
    loaded = load_dataset(f"npz:{path}", "all")

    # Assert
    assert loaded.hierarchy == ds.hierarchy and loaded.class_names == ds.class_names
    np.testing.assert_array_equal(np.sort(loaded.y), np.sort(ds.y))
