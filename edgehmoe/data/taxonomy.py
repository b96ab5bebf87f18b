"""Dataset taxonomies: CIFAR-100's superclasses, WordNet over Tiny ImageNet's wnids.

Builders return a :class:`edgehmoe.core.hierarchy.Hierarchy`. WordNet is read with nltk's
``WordNetCorpusReader`` from Debian's ``wordnet-base`` (``/usr/share/wordnet``), single-child
chains collapsed; the tree used for Tiny ImageNet is packaged as a CSV so a device needs
neither nltk nor WordNet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from edgehmoe.errors import MissingDependency

from ..core.hierarchy import (
    Hierarchy,
    HierarchyError,
    collapse_single_child_chains,
    from_edge_list,
    read_edge_csv,
)

__all__ = ["cifar100_hierarchy", "wordnet_hierarchy", "tiny_imagenet_hierarchy", "packaged_tree_path"]

logger = logging.getLogger(__name__)

TINY_IMAGENET_TREE = "tiny_imagenet_wordnet_v1.csv"


def cifar100_hierarchy(
    fine_names: Sequence[str], coarse_names: Sequence[str], fine_to_coarse: Sequence[int]
) -> Hierarchy:
    """Root → 20 coarse superclasses → 100 fine classes (class id = fine label)."""
    if len(fine_to_coarse) != len(fine_names):
        raise HierarchyError("fine_to_coarse must have one entry per fine class")
    edges = [("root", f"coarse:{c}") for c in coarse_names]
    # A fine class name could equal a coarse one; prefix coarse nodes to keep names unique.
    edges += [(f"coarse:{coarse_names[int(k)]}", f) for f, k in zip(fine_names, fine_to_coarse)]
    return from_edge_list(edges, list(fine_names))


def packaged_tree_path(name: str = TINY_IMAGENET_TREE) -> Path:
    return Path(__file__).with_name(name)


# WordNet's lexicographer file names (lexnames(5WN)); nltk needs this file but Debian's
# wordnet-base does not ship it, so we write it beside symlinks to the real database files.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def _wordnet_root_with_lexnames(d: Path) -> Path:
    """``d`` itself if it has ``lexnames``, else a cache folder with a copy of d plus lexnames.

    (A copy, not symlinks: nltk's path sandbox rejects links that lead out of the corpus root.)
    """
    if (d / "lexnames").is_file():
        return d
    import hashlib
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgehmoe" / (
        "wordnet-" + hashlib.sha1(str(d.resolve()).encode()).hexdigest()[:10]
    )
    cache.mkdir(parents=True, exist_ok=True)
    import shutil

    for f in d.iterdir():
        dst = cache / f.name
        if f.is_file() and (dst.is_symlink() or not dst.exists() or dst.stat().st_size != f.stat().st_size):
            shutil.copyfile(f, cache / (f.name + ".tmp"))
            (cache / (f.name + ".tmp")).replace(dst)
    lex = "".join(f"{i:02d}\t{n}\t{_LEX_CATEGORY[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES))
    tmp = cache / "lexnames.tmp"
    tmp.write_text(lex)
    tmp.replace(cache / "lexnames")
    return cache


def _wordnet_reader(wordnet_dir: str | Path | None):
    """An nltk WordNet 3.0 reader: Debian's wordnet-base, or nltk_data when present."""
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as e:  # pragma: no cover - depends on install
        raise MissingDependency("building WordNet trees needs nltk: pip install 'edgehmoe[train]'") from e
    candidates = [Path(wordnet_dir)] if wordnet_dir else [
        Path.home() / "nltk_data/corpora/wordnet",
        Path("/usr/share/nltk_data/corpora/wordnet"),
        Path("/usr/share/wordnet"),
        Path("/usr/local/share/wordnet"),
    ]
    for d in candidates:
        if (d / "data.noun").is_file() and (d / "index.noun").is_file():
            root = _wordnet_root_with_lexnames(d)
            # nltk >= 3.9 opens corpora only below its data path (a path sandbox): register
            # the folder WordNet lives in.
            for p in {str(root), str(root.resolve()), str(d.resolve())}:
                if p not in nltk.data.path:
                    nltk.data.path.append(p)
            import warnings

            class _Reader(WordNetCorpusReader):
                # nltk maps every non-"wordnet" database onto its own downloaded copy for
                # the multilingual (OMW) data; we read WordNet 3.0 as is and need no mapping.
                def map_wn(self, version="wordnet"):
                    return None

            with warnings.catch_warnings():  # "multilingual functions are not available"
                warnings.simplefilter("ignore", UserWarning)
                return _Reader(str(root), None)
    raise FileNotFoundError(
        "WordNet 3.0 not found (looked in " + ", ".join(map(str, candidates)) + "). Install it with "
        "`apt-get install -y wordnet-base` (Debian/Ubuntu) or `python -m nltk.downloader wordnet`, "
        "or pass --wordnet-dir."
    )


def wordnet_hierarchy(
    wnids: Sequence[str], wordnet_dir: str | Path | None = None, root: str = "entity.n.01"
) -> Hierarchy:
    """WordNet hypernym tree over ``wnids`` (e.g. ``n01443537``), single-child chains collapsed.

    WordNet is a DAG; each synset gets one canonical parent: among its hypernyms (and
    instance hypernyms), the one with the greatest ``max_depth()`` (the most specific), ties
    broken by name. The tree is the union of the canonical paths of the classes, rooted at
    ``root``; a class that is an ancestor of another class gets its own leaf named
    ``<wnid>`` under an internal node ``<synset>`` so that every class is a leaf. Internal
    nodes with one child are then removed (the root is kept), so every expert has ≥ 2 children.
    Leaves are named by wnid, internal nodes by synset name.
    """
    wn = _wordnet_reader(wordnet_dir)

    def canonical_parent(s):
        hyp = s.hypernyms() + s.instance_hypernyms()
        if not hyp:
            return None
        return max(hyp, key=lambda h: (h.max_depth(), h.name()))

    parent_of: dict[str, str] = {}
    class_synsets = []
    for wnid in wnids:
        wnid = wnid.strip()
        if len(wnid) < 2 or wnid[0] != "n" or not wnid[1:].isdigit():
            raise HierarchyError(f"{wnid!r} is not a WordNet noun id like 'n01443537'")
        try:
            import warnings

            with warnings.catch_warnings():  # nltk warns, then returns None: we raise instead
                warnings.simplefilter("ignore", UserWarning)
                s = wn.synset_from_pos_and_offset("n", int(wnid[1:]))
        except Exception:  # nltk raises several types for offsets it cannot find
            s = None
        if s is None:
            raise HierarchyError(f"{wnid} is not a noun synset in WordNet 3.0 (check wnids.txt)")
        class_synsets.append(s)
        node = s
        while node.name() != root:
            p = canonical_parent(node)
            if p is None:
                raise HierarchyError(f"{wnid} ({s.name()}) does not descend from {root}")
            if node.name() in parent_of:
                break
            parent_of[node.name()] = p.name()
            node = p
    synset_of_class = {s.name(): w.strip() for s, w in zip(class_synsets, wnids)}
    has_children = set(parent_of.values())
    edges: list[tuple[str, str]] = []
    for child, par in parent_of.items():
        edges.append((par, synset_of_class.get(child, child) if child not in has_children else child))
    for syn, wnid in synset_of_class.items():
        if syn in has_children:  # class is also an ancestor of another class: give it a leaf
            edges.append((syn, wnid))
    tree = from_edge_list(edges, [w.strip() for w in wnids])
    return collapse_single_child_chains(tree)


def tiny_imagenet_hierarchy(wnids: Sequence[str] | None = None) -> Hierarchy:
    """The packaged WordNet tree over Tiny ImageNet's 200 wnids (official order)."""
    path = packaged_tree_path()
    if wnids is None:
        wnids_path = Path(__file__).with_name("tiny_imagenet_wnids.txt")
        wnids = [w.strip() for w in wnids_path.read_text().split() if w.strip()]
    return read_edge_csv(path, list(wnids))
