"""Bundles a device can trust (issue #10, "files"): signed manifests, malformed manifests,
ONNX external data.

Model: synthetic data, 2 superclasses x 2 shapes at 8x8 px, one short epoch (the accuracy does
not matter here, only what is loaded)::

    0 root ─ 1 super0 ─ 3 disc (class 0), 4 square (class 1)
           └ 2 super1 ─ 5 disc (class 2), 6 square (class 3)
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from edgehmoe.cli.bundle import main as bundle_main
from edgehmoe.edge.integrity import BUNDLE_PUBKEY_ENV, IntegrityError, check_onnx_self_contained
from edgehmoe.edge.manifest import BundleError, read_manifest, verify_bundle

SIZE = 8


@pytest.fixture(autouse=True)
def no_verify_key_after_the_test():
    # `predict --verify-key` sets EDGEHMOE_BUNDLE_PUBKEY for its process; here that is pytest's
    yield
    os.environ.pop(BUNDLE_PUBKEY_ENV, None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from edgehmoe.data.base import channel_stats
    from edgehmoe.data.synthetic import make_synthetic
    from edgehmoe.model.arch import expert_specs
    from edgehmoe.model.central import fit_flat, fit_hmoe, new_model_dir
    from edgehmoe.model.training import TrainConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("signing")
    x, y, _, tree = make_synthetic(coarse=2, fine=2, per_class=16, size=SIZE, seed=0)
    mean, std = channel_stats(x)
    md = new_model_dir(root / "model", tree, SIZE, mean, std, "synthetic")
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05)
    fit_hmoe(md, x, y, cfg, expert_specs(tree, SIZE, fixed_width=4))
    fit_flat(md, x, y, cfg, width=4)
    np.savez(root / "images.npz", x=x[:3])
    return md.path, root / "images.npz"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    assert bundle_main(["bundle", "keygen", "--out", str(out)]) == 0
    return out / "bundle-signing.key", out / "bundle-signing.pub"


@pytest.fixture(scope="module")
def signed(tmp_path_factory, model_dir, keys):
    out = tmp_path_factory.mktemp("signed") / "bundle"
    assert bundle_main(["export", "--model-dir", str(model_dir[0]), "--out", str(out), "--sign-key",
                        str(keys[0])]) == 0
    return out


def copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys, capsys):
    key, pub = keys
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert bundle_main(["bundle", "keygen", "--out", str(key.parent)]) == 2
    assert "bundle-signing.key already exists" in capsys.readouterr().err


def test_signed_bundle_verifies_and_predicts(signed, keys, model_dir, capsys):
    _, pub = keys
    assert (signed / "manifest.sig").is_file()
    assert bundle_main(["bundle", "verify", "--bundle", str(signed), "--verify-key", str(pub)]) == 0
    assert f"manifest signed by {pub}" in capsys.readouterr().out
    assert bundle_main(["predict", "--bundle", str(signed), "--verify-key", str(pub), "--json",
                        str(model_dir[1])]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


@pytest.mark.parametrize("tamper, message", [
    (lambda b: _edit(b, lambda m: m["class_names"].__setitem__(0, "cat")), "does not match manifest.json"),
    (lambda b: (b / "manifest.sig").unlink(), "is not signed (manifest.sig missing)"),
    (lambda b: (b / "manifest.sig").write_text("bm90IGEgc2lnbmF0dXJl\n"), "does not match manifest.json"),
], ids=["edited-manifest", "no-signature", "bad-signature"])
def test_tampered_or_unsigned_bundle_is_refused_with_a_verify_key(signed, keys, model_dir, tmp_path, capsys,
                                                                    monkeypatch, tamper, message):
    from edgehmoe.edge.runtime import BundlePredictor

    bundle = copy(signed, tmp_path / "b")
    tamper(bundle)
    # --verify-key: one line, exit 2
    assert bundle_main(["predict", "--bundle", str(bundle), "--verify-key", str(keys[1]), str(model_dir[1])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    # the environment variable does the same for every bundle load of the process
    monkeypatch.setenv(BUNDLE_PUBKEY_ENV, str(keys[1]))
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BundlePredictor(bundle)
    # without a key the signature is not required (the sha256 checks still apply)
    monkeypatch.delenv(BUNDLE_PUBKEY_ENV)
    BundlePredictor(bundle).close()


def test_bundle_signed_with_another_key_is_refused(signed, tmp_path, capsys):
    assert bundle_main(["bundle", "keygen", "--out", str(tmp_path / "other")]) == 0
    other = tmp_path / "other" / "bundle-signing.pub"
    assert bundle_main(["bundle", "verify", "--bundle", str(signed), "--verify-key", str(other)]) == 2
    assert "signed with another key" in capsys.readouterr().err


def _edit(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------------------------
# Malformed manifests: one BundleError each
# --------------------------------------------------------------------------------------------


def _set_expert(key, value):
    return lambda m: next(iter(m["experts"].values())).__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    (_set_expert("file", 123), "'file' must be a relative path (a string), got 123"),
    (_set_expert("sha256", None), "'sha256' must be 64 lowercase hex digits, got None"),
    (_set_expert("num_outputs", "2"), "'num_outputs' must be a positive integer"),
    (_set_expert("outputs", {"a": 1}), "'outputs' must be a list of column indices"),
    (lambda m: m["experts"].update({"abc": m["experts"]["0"]}), "expert key 'abc' is not a node index"),
    (lambda m: m["experts"].__setitem__("0", [1, 2]), "entry 'expert 0' must be an object"),
    (lambda m: m.update(class_names="a,b,c,d"), "'class_names' must be a list of strings"),
    (lambda m: m.update(class_ids=[0, 1, 2, None]), "'class_ids' must be a list of integers"),
    (lambda m: m.update(hierarchy=[1, 2]), "'hierarchy' must be an object"),
    (lambda m: m["hierarchy"].update(parents="x"), "invalid tree"),
    (lambda m: m.update(input={"image_shape": ["8", 8, 3]}), "image_shape [H, W, C] (three positive integers)"),
    (lambda m: m.update(preprocess={"mean": [0.5] * 3, "std": [0.0] * 3}), "'preprocess.std' values must be > 0"),
    (lambda m: m.update(preprocess={"mean": None, "std": [1.0] * 3}), "'preprocess' must give mean and std"),
    (lambda m: m.update(flat=7), "entry 'flat' must be an object"),
], ids=["file-int", "sha-null", "num-outputs-str", "outputs-dict", "key", "entry-list", "names", "ids", "tree",
        "tree-parents", "shape", "std0", "mean-null", "flat-int"])
def test_malformed_manifest_gives_one_bundle_error(signed, tmp_path, change, message):
    bundle = copy(signed, tmp_path / "b")
    _edit(bundle, change)
    with pytest.raises(BundleError) as err:
        read_manifest(bundle)
    assert message in str(err.value) and "re-export" in str(err.value)


def test_deeply_nested_or_huge_manifest_gives_one_bundle_error(signed, tmp_path, capsys):
    bundle = copy(signed, tmp_path / "b")
    (bundle / "manifest.json").write_text('{"format": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(BundleError, match="nests JSON too deeply"):
        read_manifest(bundle)
    assert bundle_main(["bundle", "verify", "--bundle", str(bundle)]) == 2
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# ONNX external data
# --------------------------------------------------------------------------------------------


def test_onnx_external_data_is_refused_before_onnx_runtime_sees_it(signed, tmp_path, model_dir, monkeypatch,
                                                                   capsys):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from edgehmoe.edge.manifest import file_sha256
    from edgehmoe.edge.runtime import BundlePredictor

    # Prepare: the root expert's initializers point at "secret.bin"; the manifest's sha256 is
    # updated (whoever can write the bundle can do that; only a signature would notice)
    bundle = copy(signed, tmp_path / "b")
    (bundle / "manifest.sig").unlink()
    m = json.loads((bundle / "manifest.json").read_text())
    entry = m["experts"]["0"]
    model = onnx.load(str(bundle / entry["file"]))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="secret.bin", size_threshold=0)
    onnx.save_model(model, str(bundle / entry["file"]))  # also writes bundle/experts/secret.bin
    entry["sha256"] = file_sha256(bundle / entry["file"])
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="external"):  # sanity: the file really names external data
        check_onnx_self_contained((bundle / entry["file"]).read_bytes())
    # a file the attacker wants read, in the working directory of predict
    monkeypatch.chdir(tmp_path)
    shutil.copy(bundle / "experts" / "secret.bin", tmp_path / "secret.bin")
    # Execute / Assert: refused by the loader (verify on or off), by verify and by predict
    with pytest.raises(BundleError, match="bundles must be self-contained"):
        BundlePredictor(bundle)  # verify (the default) checks every file when the bundle is opened
    pred = BundlePredictor(bundle, verify=False)
    with pytest.raises(BundleError, match="bundles must be self-contained"):
        pred.session(0)  # ... and every session checks the bytes it gives ONNX Runtime
    with pytest.raises(BundleError, match="external"):
        verify_bundle(bundle)
    assert bundle_main(["predict", "--bundle", str(bundle), str(model_dir[1])]) == 2
    assert "bundles must be self-contained" in capsys.readouterr().err


def test_exported_models_are_self_contained(signed):
    m = read_manifest(signed)
    for entry in [*m["experts"].values(), m["flat"]]:
        check_onnx_self_contained((signed / entry["file"]).read_bytes())  # no false positive
    with pytest.raises(IntegrityError, match="not a valid ONNX file"):
        check_onnx_self_contained(b"\x0a\xff\xff\xff\xff\x0f")


def test_evaluate_bundle_checks_the_signature_with_verify_key(signed, keys, tmp_path, capsys):
    from edgehmoe.cli.main import main as edgehmoe_main

    spec = f"synthetic:coarse=2,fine=2,per_class=16,size={SIZE},seed=0"
    assert bundle_main(["bundle", "keygen", "--out", str(tmp_path / "other")]) == 0
    other = tmp_path / "other" / "bundle-signing.pub"
    # signed with another key: refused in one line
    assert edgehmoe_main(["evaluate", "--bundle", str(signed), "--dataset", spec, "--verify-key", str(other),
                          "--json"]) == 2
    err = capsys.readouterr().err
    assert "signed with another key" in err and "Traceback" not in err
    os.environ.pop(BUNDLE_PUBKEY_ENV, None)
    assert edgehmoe_main(["evaluate", "--bundle", str(signed), "--dataset", spec, "--verify-key", str(keys[1]),
                          "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["info_f1"] <= 1
