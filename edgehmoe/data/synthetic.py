"""Synthetic hierarchical images: a deterministic, numpy-only stand-in for CIFAR-100.

Every level of the tree shapes the picture, so a small CNN can learn it and hierarchical
mistakes mean something:

- the **superclass** sets the background: a striped texture with its own orientation and
  frequency, tinted with the superclass's *hue family* (families are spread round the
  colour wheel);
- the **class** sets the foreground shape (disc, square, triangle, ring, cross, bar, dots,
  frame, crescent, half-disc) and its colour, a shade inside the superclass's hue family;
- every image draws a random position, size and tilt (±30°) of the shape, stripe phase,
  saturation, brightness/contrast, a few small clutter blobs and per-pixel noise, so
  classes are not trivially separable: sibling classes share background and colour family
  and differ by shape and shade (hard), cousins differ in background (easy).

With ``levels=3`` the tree is root → ``coarse`` groups → ``mid`` superclasses per group →
``fine`` classes per superclass: the group sets the hue family, the superclass the stripe
texture (and a small hue offset), the class the shape and shade.

Class ids are superclass-major (``class = superclass * fine + k``) and rows are ordered
round-robin over classes, so any prefix is class-balanced. Node names::

    levels=2:  root ─ super0 ─ super0/disc, super0/square, ...
    levels=3:  root ─ group0 ─ group0/super1 ─ group0/super1/disc, ...

(``.../class7`` instead of the shape name when ``fine`` exceeds the 10 shapes; shapes then
repeat with different shades.) Spec options (``synthetic:coarse=4,fine=5,...``):
``levels`` (2), ``coarse`` (4; 2 for levels=3), ``mid`` (3, levels=3 only; giving it implies
levels=3), ``fine`` (5; 4 for levels=3), ``per_class`` (300), ``test_per_class`` (100),
``size`` (32), ``seed`` (0). The ``test`` split is generated from the same seed on a
separate random stream, independent of the training images.

Same arguments give the same bytes with the same numpy version on the same platform
(float32 maths may differ by one grey level across CPU architectures).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from edgehmoe.core.hierarchy import Hierarchy, from_edge_list
from edgehmoe.data.base import DatasetError, Pool, Source

__all__ = ["SHAPES", "SYNTHETIC_OPTIONS", "make_synthetic", "synthetic_options", "open_synthetic"]

logger = logging.getLogger(__name__)

SHAPES = ("disc", "square", "triangle", "ring", "cross", "bar", "dots", "frame", "crescent", "half")

# name -> (default, minimum, maximum)
SYNTHETIC_OPTIONS: dict[str, tuple[int, int, int]] = {
    "levels": (2, 2, 3),
    "coarse": (4, 2, 64),
    "mid": (3, 2, 64),
    "fine": (5, 2, 64),
    "per_class": (300, 1, 1_000_000),
    "test_per_class": (100, 1, 1_000_000),
    "size": (32, 8, 256),
    "seed": (0, 0, 2**63 - 1),
}

_TRAIN_STREAM, _TEST_STREAM = 0, 1
_CHUNK = 1024


def synthetic_options(opts: Mapping[str, object] | None = None) -> dict[str, int]:
    """Validate spec options and fill in defaults (level-dependent for coarse/fine)."""
    opts = dict(opts or {})
    unknown = sorted(set(opts) - set(SYNTHETIC_OPTIONS))
    if unknown:
        raise DatasetError(
            f"unknown synthetic option(s) {', '.join(unknown)}; valid options: {', '.join(SYNTHETIC_OPTIONS)}"
        )
    out: dict[str, int] = {}
    for key, value in opts.items():
        try:
            iv = int(str(value).strip())
        except ValueError:
            raise DatasetError(f"synthetic option {key}={value!r} must be an integer") from None
        lo, hi = SYNTHETIC_OPTIONS[key][1:]
        if not lo <= iv <= hi:
            raise DatasetError(f"synthetic option {key}={iv} must be between {lo} and {hi}")
        out[key] = iv
    levels = out.get("levels", 3 if "mid" in out else 2)
    if levels == 2 and "mid" in out:
        raise DatasetError("synthetic option mid= needs levels=3 (root → groups → superclasses → classes)")
    out["levels"] = levels
    defaults = {"coarse": 2, "mid": 3, "fine": 4} if levels == 3 else {"coarse": 4, "fine": 5}
    for key, (default, _, _) in SYNTHETIC_OPTIONS.items():
        out.setdefault(key, defaults.get(key, default))
    if levels == 2:
        out.pop("mid")
    return out


def _tree(levels: int, coarse: int, mid: int, fine: int) -> tuple[Hierarchy, list[str]]:
    def leaf(k: int) -> str:
        return SHAPES[k] if fine <= len(SHAPES) else f"class{k}"

    edges: list[tuple[str, str]] = []
    class_names: list[str] = []
    if levels == 2:
        for s in range(coarse):
            edges.append(("root", f"super{s}"))
            for k in range(fine):
                class_names.append(f"super{s}/{leaf(k)}")
                edges.append((f"super{s}", class_names[-1]))
    else:
        for g in range(coarse):
            edges.append(("root", f"group{g}"))
            for j in range(mid):
                sup = f"group{g}/super{j}"
                edges.append((f"group{g}", sup))
                for k in range(fine):
                    class_names.append(f"{sup}/{leaf(k)}")
                    edges.append((sup, class_names[-1]))
    return from_edge_list(edges, class_names), class_names


def _super_params(levels: int, coarse: int, mid: int) -> tuple[np.ndarray, ...]:
    """Per superclass: hue centre, stripe orientation, frequency (cycles per image) and the
    per-image jitter of hue and orientation (wide enough that neighbouring families overlap
    a little, so some mistakes cross superclasses)."""
    if levels == 2:
        q = np.arange(coarse)
        hue = q / coarse
        theta = q * np.pi / coarse
        freq = 2.5 + 1.25 * (q % 3)
        hue_jitter = np.full(coarse, 0.3 / coarse)
        theta_jitter = np.full(coarse, np.pi / coarse / 5)
    else:
        g, j = np.divmod(np.arange(coarse * mid), mid)
        hue = g / coarse + (j - (mid - 1) / 2) * min(0.04, 0.3 / (coarse * mid))
        theta = j * np.pi / mid + g * np.pi / (2 * mid * coarse)
        freq = 2.5 + 1.25 * (j % 3)
        hue_jitter = np.full(coarse * mid, 0.3 / coarse)
        theta_jitter = np.full(coarse * mid, np.pi / mid / 5)
    return tuple(a.astype(np.float64) for a in (hue, theta, freq, hue_jitter, theta_jitter))


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB for arrays of equal shape (all in [0, 1]); returns (..., 3)."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))],
        axis=0,
    )
    return np.take_along_axis(table, i[None, ..., None], axis=0)[0]


def _shape_sdf(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance-like field of a unit-radius shape (negative inside)."""
    a_u, a_v = np.abs(u), np.abs(v)
    r = np.hypot(u, v)
    name = SHAPES[shape % len(SHAPES)]
    if name == "disc":
        return r - 0.9
    if name == "square":
        return np.maximum(a_u, a_v) - 0.72
    if name == "triangle":
        angles = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        planes = [u * np.cos(a) + v * np.sin(a) for a in angles]
        return np.maximum(np.maximum(planes[0], planes[1]), planes[2]) - 0.5
    if name == "ring":
        return np.abs(r - 0.68) - 0.22
    if name == "cross":
        return np.minimum(np.maximum(a_u - 0.27, a_v - 0.95), np.maximum(a_u - 0.95, a_v - 0.27))
    if name == "bar":
        return np.maximum(a_u - 1.0, a_v - 0.3)
    if name == "dots":
        return np.minimum(np.hypot(u - 0.5, v), np.hypot(u + 0.5, v)) - 0.42
    if name == "frame":
        box = np.maximum(a_u, a_v)
        return np.maximum(box - 0.85, 0.5 - box)
    if name == "crescent":
        return np.maximum(r - 0.9, 0.72 - np.hypot(u - 0.45, v))
    # half-disc
    return np.maximum(r - 0.95, v - 0.05)


def _render(
    cls: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    fine: int,
    super_hue: np.ndarray,
    super_theta: np.ndarray,
    super_freq: np.ndarray,
    hue_jitter: np.ndarray,
    theta_jitter: np.ndarray,
) -> np.ndarray:
    """Images (len(cls), size, size, 3) uint8 for class ids ``cls``; draws from ``rng`` in a fixed order."""
    n = len(cls)
    sup, k = np.divmod(cls, fine)
    spread = min(0.06, 0.3 / len(super_hue))
    shade = (k / max(fine - 1, 1) - 0.5) * 2 * spread

    # Per-image parameters (drawn in a fixed order: changing this order changes the data).
    # The family hue shifts per image, foreground and background together: the shade
    # *relative* to the background identifies the class, the absolute hue the superclass.
    family = super_hue[sup] + rng.normal(0, 1, n) * hue_jitter[sup]
    theta = super_theta[sup] + rng.normal(0, 1, n) * theta_jitter[sup]
    freq = super_freq[sup] * rng.uniform(0.9, 1.1, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    bg_h = family + rng.normal(0, 0.015, n)
    bg_s = rng.uniform(0.3, 0.6, n)
    bg_v = rng.uniform(0.3, 0.5, n)
    amp = rng.uniform(0.03, 0.18, n)
    fg_h = family + shade + rng.normal(0, 0.02, n)
    fg_s = rng.uniform(0.5, 0.95, n)
    fg_v = rng.uniform(0.7, 1.0, n)
    radius = rng.uniform(0.2, 0.35, n)
    cx = rng.uniform(radius, 1 - radius)
    cy = rng.uniform(radius, 1 - radius)
    rot = rng.uniform(-np.pi / 6, np.pi / 6, n)
    gain = rng.uniform(0.75, 1.15, n)
    bias = rng.uniform(-0.06, 0.06, n)
    n_clutter = 3
    cl_x = rng.uniform(0, 1, (n, n_clutter))
    cl_y = rng.uniform(0, 1, (n, n_clutter))
    cl_r = rng.uniform(0.03, 0.08, (n, n_clutter))
    cl_on = rng.uniform(0, 1, (n, n_clutter)) < 0.5
    cl_v = rng.uniform(0.1, 0.9, (n, n_clutter))
    # Uniform pixel noise (std 0.06): several times faster to draw than Gaussian noise.
    noise = rng.random((n, size, size, 3), dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(0.06 * 12**0.5)

    f32 = np.float32
    # Pixel-sized work in float32 (mixing in float64 scalars per image would promote it).
    theta, freq, phase, bg_v, amp = (a.astype(f32) for a in (theta, freq, phase, bg_v, amp))
    radius, cx, cy, rot, gain, bias = (a.astype(f32) for a in (radius, cx, cy, rot, gain, bias))
    cl_x, cl_y, cl_r, cl_v = (a.astype(f32) for a in (cl_x, cl_y, cl_r, cl_v))
    grid = ((np.arange(size) + 0.5) / size).astype(f32)
    gx = grid[None, None, :]
    gy = grid[None, :, None]

    # Background: stripes across the image, tinted with the hue family (HSV is linear in V).
    t = gx * np.cos(theta)[:, None, None] + gy * np.sin(theta)[:, None, None]
    t = t * (2 * np.pi * freq)[:, None, None] + phase[:, None, None]
    value = bg_v[:, None, None] + amp[:, None, None] * np.sin(t)
    # Clutter: small hard-edged blobs of another brightness, so edge statistics alone are noisy.
    for c in range(n_clutter):
        d2 = (gx - cl_x[:, c, None, None]) ** 2 + (gy - cl_y[:, c, None, None]) ** 2
        m = (d2 < (cl_r[:, c] ** 2)[:, None, None]) & cl_on[:, c, None, None]
        value = np.where(m, cl_v[:, c, None, None], value)
    bg_rgb = _hsv_to_rgb(bg_h, bg_s, np.ones(n)).astype(f32)
    img = value[..., None] * bg_rgb[:, None, None, :]

    # Foreground shape in the class's shade: tilted, scaled unit coordinates per image.
    dx = (gx - cx[:, None, None]) / radius[:, None, None]
    dy = (gy - cy[:, None, None]) / radius[:, None, None]
    cr, sr = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    u = cr * dx + sr * dy
    v = -sr * dx + cr * dy
    shape_id = k % len(SHAPES)
    sdf = np.empty((n, size, size), dtype=f32)
    for s in np.unique(shape_id):
        sel = shape_id == s
        sdf[sel] = _shape_sdf(int(s), u[sel], v[sel])
    # Anti-aliased edge: the field is in radius units, one pixel is 1 / (radius * size).
    mask = np.clip(0.5 - sdf * (radius * size)[:, None, None], 0, 1)
    fg_rgb = _hsv_to_rgb(fg_h, fg_s, fg_v).astype(f32)
    img += mask[..., None] * (fg_rgb[:, None, None, :] - img)

    img *= gain[:, None, None, None]
    img += bias[:, None, None, None]
    img += noise
    np.clip(img, 0, 1, out=img)
    img *= 255
    img += 0.5
    return img.astype(np.uint8)


def make_synthetic(
    coarse: int | None = None,
    fine: int | None = None,
    per_class: int = 300,
    size: int = 32,
    seed: int = 0,
    *,
    levels: int = 2,
    mid: int | None = None,
    stream: int = _TRAIN_STREAM,
) -> tuple[np.ndarray, np.ndarray, list[str], Hierarchy]:
    """Generate ``(x, y, class_names, hierarchy)``; identical bytes for identical arguments.

    Args:
        coarse: superclasses under the root (groups when ``levels=3``); default 4 (2 for levels=3).
        fine: classes per superclass; default 5 (4 for levels=3).
        per_class: images per class.
        size: image height and width in pixels.
        seed: random seed.
        levels: 2 (root → superclasses → classes) or 3 (root → groups → superclasses → classes).
        mid: superclasses per group (``levels=3`` only; default 3).
        stream: independent random stream of the same seed (0 = train, 1 = test).
    """
    opts = {
        "levels": levels, "coarse": coarse, "fine": fine, "mid": mid,
        "per_class": per_class, "size": size, "seed": seed,
    }
    if levels == 2 and mid is not None:
        raise DatasetError("make_synthetic: mid= needs levels=3")
    o = synthetic_options({key: value for key, value in opts.items() if value is not None})
    mid_ = o.get("mid", 1)
    hierarchy, class_names = _tree(o["levels"], o["coarse"], mid_, o["fine"])
    hue, theta, freq, hue_jitter, theta_jitter = _super_params(o["levels"], o["coarse"], mid_)
    num_classes = len(class_names)
    y = np.tile(np.arange(num_classes, dtype=np.int64), o["per_class"])
    x = np.empty((len(y), o["size"], o["size"], 3), dtype=np.uint8)
    root = np.random.SeedSequence([o["seed"], int(stream)])
    # One child generator per chunk: the output does not depend on the chunk's neighbours.
    for i, child in zip(range(0, len(y), _CHUNK), root.spawn((len(y) + _CHUNK - 1) // _CHUNK)):
        x[i : i + _CHUNK] = _render(
            y[i : i + _CHUNK],
            np.random.default_rng(child),
            size=o["size"],
            fine=o["fine"],
            super_hue=hue,
            super_theta=theta,
            super_freq=freq,
            hue_jitter=hue_jitter,
            theta_jitter=theta_jitter,
        )
    return x, y, class_names, hierarchy


def open_synthetic(options: Mapping[str, object]) -> Source:
    """A :class:`Source` over a generated training set and a separately seeded test set.

    Images are generated only when a split is fetched (labels are known up front).
    """
    o = synthetic_options(options)
    common = dict(
        coarse=o["coarse"], fine=o["fine"], size=o["size"], seed=o["seed"], levels=o["levels"], mid=o.get("mid")
    )
    hierarchy, class_names = _tree(o["levels"], o["coarse"], o.get("mid", 1), o["fine"])

    def pool(per_class: int, stream: int, description: str) -> Pool:
        def fetch(idx: np.ndarray) -> np.ndarray:
            x, _, _, _ = make_synthetic(per_class=per_class, stream=stream, **common)
            logger.info("generated %s synthetic images (%s), options %s", len(x), description, o)
            return x if len(idx) == len(x) else x[idx]

        y = np.tile(np.arange(len(class_names), dtype=np.int64), per_class)
        return Pool(y=y, fetch=fetch, description=description)

    return Source(
        name="synthetic",
        class_names=class_names,
        hierarchy=hierarchy,
        train=pool(o["per_class"], _TRAIN_STREAM, "train stream"),
        open_test=lambda: pool(o["test_per_class"], _TEST_STREAM, "test stream"),
        info={"options": o},
    )
