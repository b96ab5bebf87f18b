"""Tests for edgehmoe.data: fake CIFAR-100 / Tiny ImageNet folders and npz files written
to tmp_path, the synthetic generator, splits, and smoke tests on ../shared/data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from edgehmoe.data import (
    DatasetError,
    ImageDataset,
    channel_stats,
    load_dataset,
    make_synthetic,
    open_source,
    parse_spec,
    train_val_split,
)
from edgehmoe.data.taxonomy import tiny_imagenet_hierarchy, wordnet_hierarchy

# Three real Tiny ImageNet classes: goldfish, European fire salamander, bullfrog.
WNIDS = ["n01443537", "n01629819", "n01641577"]
# A hand-written tree over them (no WordNet needed):
#   root ─ n01443537
#        └ amphibian ─ n01629819, n01641577
TREE_CSV = "parent,child\nroot,n01443537\nroot,amphibian\namphibian,n01629819\namphibian,n01641577\n"


def shared_data() -> Path:
    env = os.environ.get("EDGEHMOE_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not present")
    return path


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Keep decoded-image caches (and nltk's WordNet copy) out of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="module")
def wordnet_tree():
    """The WordNet tree over WNIDS; skip when WordNet is missing (fail in CI)."""
    try:
        return wordnet_hierarchy(WNIDS)
    except (FileNotFoundError, ImportError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"WordNet must be installed in CI (apt-get install wordnet-base): {e}")
        pytest.skip(f"WordNet not available: {e}")


# ---------------------------------------------------------------------- fake CIFAR-100
def write_fake_cifar(root: Path, per_class: int = 2, test_per_class: int = 1) -> dict:
    """cifar-100-python/{train,test,meta} like torchvision's own tests: fine k has coarse k % 20."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine_names = [f"fine{k}" for k in range(100)]
    coarse_names = [f"coarse{k}" for k in range(20)]
    out = {}
    for name, n in (("train", per_class), ("test", test_per_class)):
        fine = np.tile(np.arange(100), n)
        data = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)
        d = {"filenames": [f"img{i}.png" for i in range(len(fine))], "batch_label": name,
             "fine_labels": fine.tolist(), "coarse_labels": (fine % 20).tolist(), "data": data}
        (base / name).write_bytes(pickle.dumps(d, protocol=2))
        out[name] = (data, fine)
    meta = {"fine_label_names": fine_names, "coarse_label_names": coarse_names}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def test_cifar100_pickles_load_with_20x5_tree(tmp_path):
    # Prepare
    arrays = write_fake_cifar(tmp_path)
    data, fine = arrays["train"]

    # Execute
    ds = load_dataset(f"cifar100:{tmp_path}", "all")
    ds_inner = load_dataset(f"cifar100:{tmp_path / 'cifar-100-python'}", "all")
    test = load_dataset(f"cifar100:{tmp_path}", "test")

    # Assert
    assert ds.name == "cifar100" and len(ds) == 200 and ds.x.shape == (200, 32, 32, 3) and ds.x.dtype == np.uint8
    np.testing.assert_array_equal(ds.y, fine)
    # CHW rows become HWC images: red plane first.
    np.testing.assert_array_equal(ds.x[7, :, :, 0], data[7, :1024].reshape(32, 32))
    np.testing.assert_array_equal(ds.x[7, :, :, 2], data[7, 2048:].reshape(32, 32))
    h = ds.hierarchy
    assert h.num_leaves == 100 and len(h.children(0)) == 20
    assert all(len(h.children(int(c))) == 5 for c in h.children(0))
    assert ds.class_names == h.class_names() == [f"fine{k}" for k in range(100)]
    parent_names = [h.names[h.parents[h.class_to_node[k]]] for k in range(100)]
    assert parent_names == [f"coarse:coarse{k % 20}" for k in range(100)]
    np.testing.assert_array_equal(ds_inner.x, ds.x)
    assert len(test) == 100 and test.split == "test"
    np.testing.assert_array_equal(test.class_counts(), np.ones(100))


def test_cifar100_missing_file_says_which(tmp_path):
    # Prepare
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-100-python" / "train").unlink()

    # Execute / Assert
    with pytest.raises(DatasetError, match=r"cifar-100-python/train is missing.*download_cifar100"):
        load_dataset(f"cifar100:{tmp_path}")


def test_cifar100_missing_test_suggests_val(tmp_path):
    # Prepare
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()

    # Execute / Assert
    assert len(load_dataset(f"cifar100:{tmp_path}", "val")) == 100  # 1 of each class's 2
    with pytest.raises(DatasetError, match=r"test.*missing.*--split val"):
        load_dataset(f"cifar100:{tmp_path}", "test")


def test_cifar100_wrong_keys(tmp_path):
    # Prepare
    write_fake_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    d = pickle.loads(path.read_bytes())
    d["labels"] = d.pop("fine_labels")
    path.write_bytes(pickle.dumps(d, protocol=2))

    # Execute / Assert
    with pytest.raises(DatasetError, match=r"lacks key\(s\) 'fine_labels'"):
        load_dataset(f"cifar100:{tmp_path}")


def test_cifar100_empty_folder_and_inconsistent_labels(tmp_path):
    # Prepare
    write_fake_cifar(tmp_path / "bad")
    path = tmp_path / "bad" / "cifar-100-python" / "train"
    d = pickle.loads(path.read_bytes())
    d["coarse_labels"][100] = 7  # fine 0 now has superclasses 0 and 7
    path.write_bytes(pickle.dumps(d, protocol=2))

    # Execute / Assert
    with pytest.raises(DatasetError, match=r"no CIFAR-100 found.*cifar-100-python"):
        load_dataset(f"cifar100:{tmp_path / 'empty'}")
    with pytest.raises(DatasetError, match=r"fine class 0 appears with two coarse labels"):
        load_dataset(f"cifar100:{tmp_path / 'bad'}")


def test_cifar100_md5_checked_when_asked_and_unsafe_pickles_refused(tmp_path):
    # Prepare
    write_fake_cifar(tmp_path)
    meta = tmp_path / "cifar-100-python" / "meta"

    # Execute / Assert
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset(f"cifar100:{tmp_path}", verify=True)
    meta.write_bytes(pickle.dumps({"fine_label_names": os.getcwd, "coarse_label_names": []}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset(f"cifar100:{tmp_path}")


# ---------------------------------------------------------------------- fake Tiny ImageNet
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def write_fake_tiny_imagenet(root: Path, per_class: int = 4, with_val: bool = True) -> Path:
    """tiny-imagenet-200/ with 3 classes of solid-colour JPEGs: image 0 of class 1 grayscale,
    image 1 of class 2 48×48 (to be resized)."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\n")
    for c, wnid in enumerate(WNIDS):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(per_class):
            if c == 1 and k == 0:
                im = Image.new("L", (64, 64), 128)
            else:
                im = Image.new("RGB", (48, 48) if (c == 2 and k == 1) else (64, 64), COLOURS[c])
            im.save(folder / f"{wnid}_{k}.JPEG", quality=95)
    if with_val:
        (base / "val" / "images").mkdir(parents=True)
        lines = []
        for i, c in enumerate([2, 0, 1, 2]):
            Image.new("RGB", (64, 64), COLOURS[c]).save(base / "val" / "images" / f"val_{i}.JPEG", quality=95)
            lines.append(f"val_{i}.JPEG\t{WNIDS[c]}\t0\t0\t63\t63")
        (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def test_tiny_imagenet_loads_train_and_official_val(tmp_path, wordnet_tree, caplog):
    # Prepare
    base = write_fake_tiny_imagenet(tmp_path)

    # Execute
    with caplog.at_level(logging.WARNING, logger="edgehmoe.data.tiny_imagenet"):
        ds = load_dataset(f"tinyimagenet:{base}", "all")
    test = load_dataset(f"tinyimagenet:{base}", "test")

    # Assert
    assert ds.name == "tinyimagenet" and ds.x.shape == (12, 64, 64, 3) and ds.x.dtype == np.uint8
    np.testing.assert_array_equal(ds.y, np.repeat([0, 1, 2], 4))
    assert ds.class_names == WNIDS and ds.hierarchy == wordnet_tree and ds.hierarchy.num_leaves == 3
    gray = ds.x[4].astype(int)  # class 1, image 0
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 2 and abs(gray.mean() - 128) < 3
    for i in (0, 8, 9):  # plain RGB, and the resized 48×48 one
        assert np.abs(ds.x[i].reshape(-1, 3).mean(0) - COLOURS[ds.y[i]]).max() < 8
    assert "resized 1 image" in caplog.text and "n01641577_1.JPEG" in caplog.text
    np.testing.assert_array_equal(test.y, [2, 0, 1, 2])
    assert np.abs(test.x[0].reshape(-1, 3).mean(0) - COLOURS[2]).max() < 8


def test_tiny_imagenet_with_csv_tree_and_cache(tmp_path, caplog):
    # Prepare
    base = write_fake_tiny_imagenet(tmp_path)
    tree_csv = tmp_path / "tree.csv"
    tree_csv.write_text(TREE_CSV)
    spec = f"tinyimagenet:{base}"

    # Execute
    first = load_dataset(spec, "train", hierarchy=tree_csv, val_fraction=0.25)
    with caplog.at_level(logging.INFO, logger="edgehmoe.data.tiny_imagenet"):
        second = load_dataset(spec, "train", hierarchy=tree_csv, val_fraction=0.25)
    cached_text = caplog.text
    caplog.clear()
    img = base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="edgehmoe.data.tiny_imagenet"):
        load_dataset(spec, "train", hierarchy=tree_csv, val_fraction=0.25)
    val = load_dataset(spec, "val", hierarchy=tree_csv, val_fraction=0.25)

    # Assert
    assert [first.hierarchy.names[i] for i in first.hierarchy.children(0)] == ["n01443537", "amphibian"]
    np.testing.assert_array_equal(first.class_counts(), [3, 3, 3])
    np.testing.assert_array_equal(val.class_counts(), [1, 1, 1])
    np.testing.assert_array_equal(first.x, second.x)
    assert "from cache" in cached_text
    assert "from cache" not in caplog.text and "cached" in caplog.text  # a changed mtime re-decodes


def test_tiny_imagenet_corrupt_jpeg_named(tmp_path):
    # Prepare
    base = write_fake_tiny_imagenet(tmp_path)
    bad = base / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_3.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    tree_csv = tmp_path / "tree.csv"
    tree_csv.write_text(TREE_CSV)

    # Execute / Assert
    with pytest.raises(DatasetError, match=r"cannot decode image .*n01641577_3\.JPEG"):
        load_dataset(f"tinyimagenet:{base}", "all", hierarchy=tree_csv)


def test_tiny_imagenet_missing_parts(tmp_path):
    # Prepare
    base = write_fake_tiny_imagenet(tmp_path, with_val=False)
    tree_csv = tmp_path / "tree.csv"
    tree_csv.write_text(TREE_CSV)

    # Execute / Assert
    with pytest.raises(DatasetError, match=r"val_annotations\.txt.*--split val"):
        load_dataset(f"tinyimagenet:{base}", "test", hierarchy=tree_csv)
    (base / "wnids.txt").write_text("\n".join(WNIDS + ["n01644900"]) + "\n")
    with pytest.raises(DatasetError, match=r"train/n01644900/images is missing"):
        load_dataset(f"tinyimagenet:{base}", hierarchy=tree_csv)
    with pytest.raises(DatasetError, match=r"wnids\.txt is missing"):
        load_dataset(f"tinyimagenet:{tmp_path}")


# ---------------------------------------------------------------------- npz
def test_npz_fine_coarse_layout_with_and_without_meta(tmp_path):
    # Prepare
    rng = np.random.default_rng(1)
    fine = np.tile(np.arange(6), 4)
    x = rng.integers(0, 256, (len(fine), 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x, fine=fine.astype(np.int16), coarse=(fine // 3).astype(np.int16))
    other = tmp_path / "other"
    other.mkdir()
    np.savez(other / "d.npz", x=x, fine=fine, coarse=fine // 3)
    meta = {"fine_label_names": list("abcdef"), "coarse_label_names": ["low", "high"]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))

    # Execute
    named = load_dataset(f"npz:{tmp_path / 'train.npz'}", "all")
    plain = load_dataset(f"npz:{other / 'd.npz'}", "all")
    as_cifar = load_dataset(f"cifar100:{tmp_path / 'train.npz'}", "all")

    # Assert
    assert named.name == "npz" and as_cifar.name == "cifar100"
    assert named.class_names == list("abcdef") and plain.class_names == [f"fine_{i}" for i in range(6)]
    assert named.hierarchy.names[named.hierarchy.parents[named.hierarchy.index("d")]] == "coarse:high"
    assert plain.hierarchy.summary()["experts"] == 3
    np.testing.assert_array_equal(named.x, x)
    np.testing.assert_array_equal(named.y, fine)


def test_npz_label_layout(tmp_path, caplog):
    # Prepare
    rng = np.random.default_rng(2)
    label = np.array([0, 1, 2, 2, 1, 0, 0, 1, 2, 1], dtype=np.int64)
    gray = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8)
    chw = rng.integers(0, 256, (10, 3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", x=gray, label=label, class_names=np.array(WNIDS))
    sub = tmp_path / "sub"
    sub.mkdir()
    np.savez(sub / "chw.npz", x=chw, label=label)
    (sub / "classes.txt").write_text("\n".join(WNIDS) + "\n")
    tree_csv = tmp_path / "tree.csv"
    tree_csv.write_text(TREE_CSV)

    # Execute
    g = load_dataset(f"npz:{tmp_path / 'gray.npz'}", "all", hierarchy=tree_csv)
    with caplog.at_level(logging.INFO, logger="edgehmoe.data.npz"):
        c = load_dataset(f"npz:{sub / 'chw.npz'}", "test", hierarchy=tree_csv)

    # Assert
    assert g.x.shape == (10, 6, 6, 3)
    np.testing.assert_array_equal(g.x[..., 1], gray)
    np.testing.assert_array_equal(c.x, chw.transpose(0, 2, 3, 1))
    assert c.class_names == WNIDS and c.hierarchy.num_nodes == 5
    assert len(c) == 10 and "whole file" in caplog.text


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"label": np.zeros(3, np.int64)}, r"lacks array 'x'"),
        ({"x": np.zeros((3, 4, 4, 3), np.uint8)}, r"expected arrays x"),
        (
            {"x": np.zeros((3, 4, 4, 3), np.uint8), "label": np.zeros(2, np.int64)},
            r"'label' has 2 entries but 'x' has 3",
        ),
        ({"x": np.zeros((3, 4, 4, 3), np.uint8), "label": np.array([0, 1, 3])}, r"class id 3 but there are only 3"),
        ({"x": np.zeros((3, 4, 4, 3), np.float32), "label": np.zeros(3, np.int64)}, r"'x' has dtype float32"),
        ({"x": np.zeros((3, 4, 4, 2), np.uint8), "label": np.zeros(3, np.int64)}, r"'x' has shape \(3, 4, 4, 2\)"),
        ({"x": np.zeros((3, 4, 4, 3), np.uint8), "label": np.zeros(3)}, r"'label' must be 1-D integers"),
        ({"x": np.zeros((3, 4, 4, 3), np.uint8), "fine": np.zeros(3, np.int64)}, r"expected arrays x"),
    ],
)
def test_npz_bad_arrays(tmp_path, arrays, match):
    # Prepare
    np.savez(tmp_path / "d.npz", class_names=np.array(WNIDS), **arrays)
    tree_csv = tmp_path / "tree.csv"
    tree_csv.write_text(TREE_CSV)

    # Execute / Assert
    with pytest.raises(DatasetError, match=match):
        load_dataset(f"npz:{tmp_path / 'd.npz'}", "all", hierarchy=tree_csv)


def test_npz_unreadable_files(tmp_path):
    # Prepare
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), label=np.zeros(1, np.int64))
    np.savez(tmp_path / "notree.npz", x=np.zeros((2, 4, 4, 3), np.uint8), label=np.zeros(2, np.int64))

    # Execute / Assert
    with pytest.raises(DatasetError, match=r"cannot read .*junk\.npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(DatasetError, match=r"object \(pickled\) arrays"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")
    with pytest.raises(DatasetError, match=r"no tree: pass hierarchy="):
        load_dataset(f"npz:{tmp_path / 'notree.npz'}")
    with pytest.raises(DatasetError, match=r"does not exist"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")


# ---------------------------------------------------------------------- specs and splits
def test_parse_spec():
    # Execute / Assert
    assert parse_spec("synthetic") == ("synthetic", parse_spec("synthetic:coarse=4,fine=5")[1])
    kind, opts = parse_spec("synthetic:coarse=3, fine=2 ,per_class=7,seed=5")
    assert kind == "synthetic"
    assert (opts["coarse"], opts["fine"], opts["per_class"], opts["seed"]) == (3, 2, 7, 5)
    assert parse_spec("synthetic:mid=2")[1]["levels"] == 3
    assert parse_spec("cifar100:/data/c100") == ("cifar100", Path("/data/c100"))
    with pytest.raises(DatasetError, match=r"unknown dataset kind 'imagenet'.*cifar100:PATH.*tinyimagenet:PATH"):
        parse_spec("imagenet:/x")
    with pytest.raises(DatasetError, match=r"did you mean npz:data\.npz"):
        parse_spec("data.npz")
    with pytest.raises(DatasetError, match=r"unknown synthetic option\(s\) colours; valid options: levels"):
        parse_spec("synthetic:colours=3")
    with pytest.raises(DatasetError, match=r"coarse=1 must be between 2"):
        parse_spec("synthetic:coarse=1")
    with pytest.raises(DatasetError, match=r"must be an integer"):
        parse_spec("synthetic:fine=five")
    with pytest.raises(DatasetError, match=r"needs a path"):
        parse_spec("npz:")
    with pytest.raises(DatasetError, match=r"unknown split 'dev'"):
        load_dataset("synthetic:per_class=2", "dev")


def test_train_val_split_is_stratified_disjoint_and_deterministic():
    # Prepare
    y = np.repeat(np.arange(5), [40, 20, 10, 3, 1])

    # Execute
    tr, va = train_val_split(y, 0.25, seed=3)
    tr2, va2 = train_val_split(y, 0.25, seed=3)
    _, va_other = train_val_split(y, 0.25, seed=4)

    # Assert
    assert len(np.intersect1d(tr, va)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(y)))
    np.testing.assert_array_equal(np.bincount(y[va], minlength=5), [10, 5, 3, 1, 0])  # 2.5 rounds up; 1 → train
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(va, va_other)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        train_val_split(y, 1.0, 0)


def test_load_dataset_splits_are_disjoint_and_limit_per_class():
    # Prepare
    spec = "synthetic:coarse=2,fine=2,per_class=20,test_per_class=5,size=16"

    # Execute
    train = load_dataset(spec, "train", val_fraction=0.2, seed=1)
    val = load_dataset(spec, "val", val_fraction=0.2, seed=1)
    whole = load_dataset(spec, "all")
    test = load_dataset(spec, "test")
    small = load_dataset(spec, "train", val_fraction=0.2, seed=1, limit_per_class=3)

    # Assert
    def digests(ds):
        return {hashlib.sha1(img.tobytes()).hexdigest() for img in ds.x}

    np.testing.assert_array_equal(train.class_counts(), [16] * 4)
    np.testing.assert_array_equal(val.class_counts(), [4] * 4)
    assert len(whole) == 80 and len(test) == 20 and test.split == "test"
    assert not digests(train) & digests(val)
    assert digests(train) | digests(val) == digests(whole)
    assert not digests(test) & digests(whole)
    np.testing.assert_array_equal(small.class_counts(), [3] * 4)
    assert digests(small) <= digests(train)
    with pytest.raises(DatasetError, match="val_fraction is 0"):
        load_dataset(spec, "val", val_fraction=0.0)


def test_image_dataset_helpers():
    # Prepare
    x, y, names, tree = make_synthetic(coarse=2, fine=3, per_class=4, size=8)
    ds = ImageDataset(x=x, y=y, class_names=names, hierarchy=tree, name="synthetic", split="all")

    # Execute
    sub = ds.subset(np.flatnonzero(ds.y < 2))
    masked = ds.subset(ds.y == 5)

    # Assert
    assert len(ds) == 24 and ds.image_size == 8
    np.testing.assert_array_equal(ds.class_counts(), [4] * 6)
    np.testing.assert_array_equal(sub.class_counts(), [4, 4, 0, 0, 0, 0])
    assert sub.hierarchy is tree and sub.class_names == names and len(masked) == 4
    with pytest.raises(DatasetError, match=r"uint8 array of shape \(N, H, W, 3\)"):
        ImageDataset(x=x.astype(np.float32), y=y, class_names=names, hierarchy=tree, name="s", split="all")
    with pytest.raises(DatasetError, match=r"5 class names but the hierarchy has 6 leaves"):
        ImageDataset(x=x, y=y, class_names=names[:5], hierarchy=tree, name="s", split="all")


def test_channel_stats():
    # Prepare
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    const = np.zeros((2, 3, 3, 3), np.uint8) + np.array([0, 51, 255], np.uint8)

    # Execute
    mean, std = channel_stats(x, chunk=7)
    cmean, cstd = channel_stats(const)

    # Assert
    assert mean.dtype == np.float32 and mean.shape == (3,)
    np.testing.assert_allclose(mean, x.reshape(-1, 3).mean(0) / 255, rtol=1e-5)
    np.testing.assert_allclose(std, x.reshape(-1, 3).std(0) / 255, rtol=1e-4)
    np.testing.assert_allclose(cmean, [0, 0.2, 1], atol=1e-6)
    np.testing.assert_allclose(cstd, 0, atol=1e-6)


# ---------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_shapes_and_balance():
    # Execute
    x1, y1, names, tree = make_synthetic(coarse=3, fine=4, per_class=10, size=16, seed=7)
    x2, y2, _, _ = make_synthetic(coarse=3, fine=4, per_class=10, size=16, seed=7)
    x3, _, _, _ = make_synthetic(coarse=3, fine=4, per_class=10, size=16, seed=8)

    # Assert
    assert x1.shape == (120, 16, 16, 3) and x1.dtype == np.uint8 and y1.dtype == np.int64
    assert x1.tobytes() == x2.tobytes() and np.array_equal(y1, y2)
    assert (x1 != x3).mean() > 0.5
    np.testing.assert_array_equal(np.bincount(y1), [10] * 12)
    np.testing.assert_array_equal(y1[:12], np.arange(12))  # round-robin: prefixes are balanced
    assert tree.summary() == {"nodes": 16, "leaves": 12, "experts": 4, "max_depth": 2, "max_children": 4}
    assert names[:2] == ["super0/disc", "super0/square"] and tree.class_names() == names
    assert x1.std() > 20  # not blank


def test_synthetic_three_levels():
    # Execute
    x, y, names, tree = make_synthetic(levels=3, coarse=2, mid=3, fine=4, per_class=2, size=16)

    # Assert
    assert tree.num_leaves == 24 and tree.max_depth == 3 and len(tree.children(0)) == 2
    assert names[5] == "group0/super1/square" and len(x) == 48
    group0 = tree.children(0)[0]
    assert [len(tree.children(int(s))) for s in tree.children(int(group0))] == [4, 4, 4]
    with pytest.raises(DatasetError, match="mid= needs levels=3"):
        make_synthetic(mid=3)


def test_synthetic_is_learnable_and_hierarchical():
    """A nearest-class-mean classifier on 8×8 pixels beats chance by far; superclass is easier
    than class, and most class mistakes stay within the superclass (siblings are confusable)."""
    # Prepare
    train = load_dataset("synthetic:per_class=60,test_per_class=30", "all")
    test = load_dataset("synthetic:per_class=60,test_per_class=30", "test")

    def features(x):
        n, h, w, _ = x.shape
        return (x.astype(np.float32) / 255).reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)).reshape(n, -1)

    def nearest_mean(f_train, y_train, f_test):
        means = np.stack([f_train[y_train == c].mean(0) for c in range(y_train.max() + 1)])
        return ((f_test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)

    tree = train.hierarchy
    superclass = tree.child_index[tree.parents[tree.class_to_node]]  # class id -> 0..coarse-1

    # Execute
    f_train, f_test = features(train.x), features(test.x)
    pred = nearest_mean(f_train, train.y, f_test)
    pred_super = nearest_mean(f_train, superclass[train.y], f_test)

    # Assert
    fine_acc = (pred == test.y).mean()
    super_acc = (pred_super == superclass[test.y]).mean()
    wrong = pred != test.y
    sibling_share = (superclass[pred[wrong]] == superclass[test.y[wrong]]).mean()
    assert fine_acc > 3 * (1 / 20), fine_acc
    assert super_acc > 0.7 and super_acc > fine_acc, (super_acc, fine_acc)
    assert sibling_share > 0.6, sibling_share


# ---------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_cifar100_npz():
    # Prepare
    path = shared_data() / "cifar100" / "train.npz"

    # Execute
    ds = load_dataset(f"cifar100:{path}", "all")
    train_idx, val_idx = train_val_split(ds.y, 0.1, seed=0)

    # Assert
    assert len(ds) == 50_000 and ds.x.shape[1:] == (32, 32, 3)
    h = ds.hierarchy
    assert h.num_leaves == 100 and len(h.children(0)) == 20
    assert all(len(h.children(int(c))) == 5 for c in h.children(0))
    assert ds.class_names[:2] == ["apple", "aquarium_fish"]
    np.testing.assert_array_equal(ds.class_counts(), [500] * 100)
    np.testing.assert_array_equal(ds.subset(train_idx).class_counts(), [450] * 100)
    np.testing.assert_array_equal(ds.subset(val_idx).class_counts(), [50] * 100)
    mean, _ = channel_stats(ds.x[:5000])
    assert np.all((mean > 0.4) & (mean < 0.55))


@pytest.mark.realdata
def test_real_tiny_imagenet_folder():
    # Prepare
    spec = f"tinyimagenet:{shared_data() / 'tiny-imagenet-200'}"

    # Execute
    source = open_source(spec)  # lists files; decodes nothing
    ds = load_dataset(spec, "all", limit_per_class=5)

    # Assert: as many training images as JPEGs in train/*/images (the shared copy's size changes)
    root = shared_data() / "tiny-imagenet-200" / "train"
    on_disk = sum(1 for _ in root.glob("*/images/*.JPEG"))
    assert on_disk > 0 and len(source.train.y) == on_disk
    assert len(ds) == 1_000 and ds.x.shape[1:] == (64, 64, 3)
    np.testing.assert_array_equal(ds.class_counts(), [5] * 200)
    assert ds.hierarchy.num_leaves == 200 and ds.class_names[0] == "n02124075"
    assert ds.hierarchy == tiny_imagenet_hierarchy()


def test_hierarchy_override_replaces_builtin_tree(tmp_path):
    # Prepare: a flat tree over the 4 synthetic classes, and one missing a class
    names = ["super0/disc", "super0/square", "super1/disc", "super1/square"]
    flat = tmp_path / "flat.csv"
    flat.write_text("parent,child\n" + "".join(f"root,{n}\n" for n in names))
    short = tmp_path / "short.csv"
    short.write_text("parent,child\n" + "".join(f"root,{n}\n" for n in names[:3]))

    # Execute
    ds = load_dataset("synthetic:coarse=2,fine=2,per_class=3,size=8", "all", hierarchy=flat)

    # Assert
    assert ds.hierarchy.summary()["experts"] == 1 and ds.class_names == names
    with pytest.raises(DatasetError, match=r"missing from the tree: super1/square.*leaves must be exactly"):
        load_dataset("synthetic:coarse=2,fine=2,per_class=3,size=8", "all", hierarchy=short)
