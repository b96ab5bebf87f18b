"""Every command the README documents runs, as a user would type it, on tiny generated data.

The commands run as the installed console scripts in subprocesses, in the README's order
(a tree, shards, a fitted model, its evaluation, an ONNX bundle, predictions, a subset
bundle, an extension, broker files). Commands that need a broker and client processes
(``edgehmoe-server run`` / ``simulate``, ``edgehmoe-client``) or long measurements
(``tools/*.py``) run in the test modules named in ``ELSEWHERE``; a test checks that the README
documents no command outside these two lists, so a new README command needs a test here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = "synthetic:coarse=2,fine=3,per_class=30,test_per_class=10,size=16,seed=1"

# README command -> test module that runs it (broker, clients or long measurements needed).
ELSEWHERE = {
    "edgehmoe-server run": "tests/test_federation.py",
    "edgehmoe-server simulate": "tests/test_simulate.py",
    "edgehmoe-client": "tests/test_federation.py",
    "python tools/profile_round.py": "tests/test_profile_round.py",
    "python tools/bench_inference.py": "tests/test_profile_round.py",
    "make demo": ".ci/run",
    "make test": ".ci/run",
}
HERE = {
    "edgehmoe hierarchy show", "edgehmoe hierarchy build", "edgehmoe partition", "edgehmoe fit",
    "edgehmoe evaluate", "edgehmoe export", "edgehmoe predict", "edgehmoe bundle subset", "edgehmoe extend",
    "edgehmoe-server broker-config", "edgehmoe-server credentials add",
}
GROUPS = {"hierarchy", "bundle", "credentials"}  # commands whose second word is an action


def readme_commands() -> set[str]:
    text = (REPO / "README.md").read_text()
    keys = set()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if not words or words[0] not in ("edgehmoe", "edgehmoe-server", "edgehmoe-client", "python", "make"):
                continue
            if words[0] == "edgehmoe-client":
                keys.add("edgehmoe-client")
            elif words[0] in ("python", "make"):
                keys.add(" ".join(words[:2]))
            else:
                n = 3 if words[1] in GROUPS else 2
                keys.add(" ".join(words[:n]))
    return keys


def test_every_readme_command_is_tested():
    documented = readme_commands()
    assert "edgehmoe fit" in documented and "edgehmoe-server simulate" in documented  # the parser works
    untested = documented - HERE - set(ELSEWHERE)
    assert not untested, f"README documents {sorted(untested)}: add them to this test"
    for where in set(ELSEWHERE.values()):
        assert (REPO / where).exists(), where


def cli(*args: str, cwd: Path, expect: int = 0) -> str:
    cmd = [str(BIN / args[0]), *args[1:]]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == expect, f"{' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.mark.slow
def test_readme_tour_on_tiny_data(tmp_path):
    from PIL import Image

    from edgehmoe.data import load_dataset

    # hierarchy show / build
    tree = json.loads(cli("edgehmoe", "hierarchy", "show", "--dataset", TINY, "--json", cwd=tmp_path))
    assert tree["leaves"] == 6 and tree["experts"] == 3 and tree["names"][0] == "root"
    if Path("/usr/share/wordnet").is_dir():
        (tmp_path / "wnids.txt").write_text("n02124075\nn02123045\nn01443537\n")  # two cats, a goldfish
        cli("edgehmoe", "hierarchy", "build", "--wordnet", "wnids.txt", "--out", "tree.csv", cwd=tmp_path)
        edges = (tmp_path / "tree.csv").read_text().splitlines()
        assert {"n02124075", "n02123045", "n01443537"} <= {e.split(",")[1] for e in edges[1:]}
    # partition
    out = cli("edgehmoe", "partition", "--dataset", TINY, "--num-devices", "3", "--scheme", "dirichlet:0.5",
              "--out", "shards", cwd=tmp_path)
    assert len(list((tmp_path / "shards").glob("*.npz"))) == 3 and "wrote 3 shards" in out
    # fit, evaluate
    cli("edgehmoe", "-q", "fit", "--dataset", TINY, "--model", "both", "--epochs", "1", "--threads", "1",
        "--out", "runs/central", cwd=tmp_path)
    runs = {}
    for extra in ([], ["--model", "flat"], ["--beam", "2"], ["--threshold", "0.5"]):
        runs[" ".join(extra)] = json.loads(cli("edgehmoe", "-q", "evaluate", "--model-dir", "runs/central",
                                               "--dataset", TINY, "--split", "test", "--json", *extra, cwd=tmp_path))
    assert runs[""]["model"] == "hmoe" and runs["--model flat"]["model"] == "flat"
    assert runs["--beam 2"]["beam"] == 2 and runs["--threshold 0.5"]["threshold"] == 0.5
    assert all(m["num_examples"] == 60 for m in runs.values())
    # export, predict (a PNG of a test image and the same image in an .npz)
    cli("edgehmoe", "export", "--model-dir", "runs/central", "--out", "bundle", cwd=tmp_path)
    test = load_dataset(TINY, "test")
    Image.fromarray(test.x[0]).save(tmp_path / "cat.png")
    pred = json.loads(cli("edgehmoe", "predict", "--bundle", "bundle", "cat.png", "--json", cwd=tmp_path))
    assert len(pred) == 1 and pred[0]["input"] == "cat.png" and pred[0]["class_name"] in test.class_names
    # bundle subset: keep the first superclass
    coarse = tree["names"][1]
    sub = json.loads(cli("edgehmoe", "bundle", "subset", "--bundle", "bundle", "--keep", coarse, "--out", "sub",
                         "--json", cwd=tmp_path))
    assert sub["classes"] == 3
    # extend: a new class under the first superclass, from an npz with a tree CSV
    names = list(test.class_names)
    edges = _edges(tree) + [(coarse, f"{coarse}/new")]
    (tmp_path / "new_tree.csv").write_text("parent,child\n" + "".join(f"{p},{c}\n" for p, c in edges))
    train = load_dataset(TINY, "train")
    x = np.concatenate([train.x, train.x[train.y == 0][:, ::-1]])  # the new class: flipped images
    label = np.concatenate([train.y, np.full(int((train.y == 0).sum()), len(names))])
    np.savez(tmp_path / "new.npz", x=x, label=label, class_names=np.array(names + [f"{coarse}/new"]))
    report = json.loads(cli("edgehmoe", "extend", "--model-dir", "runs/central", "--hierarchy", "new_tree.csv",
                            "--dataset", "npz:new.npz", "--epochs", "1", "--out", "runs/extended", "--json",
                            cwd=tmp_path))
    assert report and (tmp_path / "runs/extended/model.json").is_file()


def _edges(tree: dict) -> list[tuple[str, str]]:
    names, parents = tree["names"], tree["parents"]
    return [(names[p], names[j]) for j, p in enumerate(parents) if p >= 0]


def test_readme_server_files(tmp_path):
    cli("edgehmoe-server", "broker-config", "--out-dir", "broker", cwd=tmp_path)
    assert (tmp_path / "broker/mosquitto.conf").is_file() and (tmp_path / "broker/acl").is_file()
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed (apt-get install -y mosquitto)")
    (tmp_path / "passwd").write_text("")
    cli("edgehmoe-server", "credentials", "add", "--password-file", "passwd", "--device-id", "pi-07",
        "--out-dir", "creds", cwd=tmp_path)
    pw = (tmp_path / "creds/pi-07.password").read_text().strip()
    assert len(pw) >= 16 and (tmp_path / "passwd").read_text().startswith("pi-07:")
    assert (tmp_path / "creds/pi-07.password").stat().st_mode & 0o077 == 0
