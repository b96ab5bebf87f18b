"""What a device checks before it trusts a bundle: signed manifests and self-contained ONNX files.

Two checks on top of the manifest's sha256 of every file (:mod:`edgehmoe.edge.manifest`):

* **Signature.** The sha256 list proves only that the files match the manifest; whoever can
  write the bundle folder can rewrite both. An Ed25519 signature over the exact bytes of
  ``manifest.json`` (``manifest.sig``, base64) proves it came from the holder of the private
  key. ``edgehmoe bundle keygen --out DIR`` makes a key pair (:func:`generate_keypair`),
  ``edgehmoe export --sign-key KEY`` signs (:func:`sign_manifest`), and loading a bundle
  verifies (:func:`verify_manifest_signature`) whenever a public key is given (``--verify-key
  PUB`` or the environment variable ``EDGEHMOE_BUNDLE_PUBKEY``, :func:`bundle_verify_key`).
  Uses the ``cryptography`` package (in the ``edge`` extra).
* **No external data.** An ONNX initializer may keep its values in another file
  (``data_location = EXTERNAL``, a path relative to the model). ONNX Runtime given the model
  as bytes resolves such paths against the working directory of ``predict``, so a crafted
  bundle could read a file of the device into a tensor. :func:`check_onnx_self_contained`
  walks the protobuf wire format (standard library only, no ``onnx`` package) and refuses any
  tensor with external data: in the graph's initializers, in constant and sparse tensors of
  node attributes, in sub-graphs (If/Loop/Scan bodies), functions and training info.

Standard library only (plus ``cryptography`` for signatures, imported when used).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from edgehmoe.errors import EdgeHmoeError, MissingDependency

__all__ = [
    "BUNDLE_PUBKEY_ENV",
    "SIGNATURE",
    "PRIVATE_KEY",
    "PUBLIC_KEY",
    "IntegrityError",
    "bundle_verify_key",
    "check_onnx_self_contained",
    "generate_keypair",
    "sign_manifest",
    "verify_manifest_signature",
]

#: Environment variable naming the public key every bundle load must verify against.
BUNDLE_PUBKEY_ENV = "EDGEHMOE_BUNDLE_PUBKEY"
#: File name of the manifest signature inside a bundle.
SIGNATURE = "manifest.sig"
#: File names written by :func:`generate_keypair`.
PRIVATE_KEY = "bundle-signing.key"
PUBLIC_KEY = "bundle-signing.pub"


class IntegrityError(EdgeHmoeError, ValueError):
    """A bundle's signature or ONNX file cannot be trusted (the message says why and what to do).

    :mod:`edgehmoe.edge.manifest` re-raises these as its ``BundleError``, so callers of the
    bundle functions see one error type.
    """


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependency("signed bundles need the cryptography package: pip install cryptography "
                                "(or pip install 'edgehmoe[edge]')") from None
    return ed25519, serialization, InvalidSignature


# ---------------------------------------------------------------------- signatures
def bundle_verify_key(explicit: str | Path | None = None) -> Path | None:
    """The public key bundle loads verify against: ``explicit``, else ``$EDGEHMOE_BUNDLE_PUBKEY``, else None."""
    value = explicit if explicit else os.environ.get(BUNDLE_PUBKEY_ENV, "")
    return Path(value) if value else None


def generate_keypair(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair to ``out_dir``: ``(private key, public key)`` paths.

    The private key (PKCS#8 PEM, unencrypted, mode 0600) signs bundles on the machine that
    exports them; copy only the public key (PEM) to the devices. Existing keys are never
    overwritten.
    """
    ed25519, serialization, _ = _crypto()
    out = Path(out_dir)
    key_path, pub_path = out / PRIVATE_KEY, out / PUBLIC_KEY
    for p in (key_path, pub_path):
        if p.exists():
            raise IntegrityError(f"{p} already exists; keep it, or remove it first to make a new key pair")
    out.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def _load_key(path: Path, private: bool):
    ed25519, serialization, _ = _crypto()
    what = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise IntegrityError(f"cannot read the {what} key {path}: {e.strerror or e}") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        raise IntegrityError(f"{path} is not a PEM {what} key ({e}); make one with `edgehmoe bundle keygen`") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise IntegrityError(f"{path} is not an Ed25519 {what} key; make one with `edgehmoe bundle keygen`")
    return key


def sign_manifest(bundle_dir: str | Path, key_path: str | Path, manifest_name: str = "manifest.json") -> Path:
    """Sign ``bundle_dir/manifest.json`` with the private key at ``key_path``; the signature file."""
    key = _load_key(Path(key_path), private=True)
    bundle_dir = Path(bundle_dir)
    data = (bundle_dir / manifest_name).read_bytes()
    sig_path = bundle_dir / SIGNATURE
    sig_path.write_text(base64.b64encode(key.sign(data)).decode() + "\n")
    return sig_path


def verify_manifest_signature(bundle_dir: str | Path, manifest_bytes: bytes, pub_path: str | Path) -> None:
    """Raise :class:`IntegrityError` unless ``manifest.sig`` of ``bundle_dir`` is a valid Ed25519
    signature of ``manifest_bytes`` (the bytes about to be parsed) by the key at ``pub_path``."""
    _, _, InvalidSignature = _crypto()
    key = _load_key(Path(pub_path), private=False)
    sig_path = Path(bundle_dir) / SIGNATURE
    if not sig_path.is_file():
        raise IntegrityError(f"{bundle_dir} is not signed ({SIGNATURE} missing) but a verify key is set "
                             f"({pub_path}); export it with --sign-key, or unset {BUNDLE_PUBKEY_ENV}")
    try:
        sig = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
    except (ValueError, OSError):
        sig = b""
    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise IntegrityError(f"{sig_path} does not match manifest.json for the key {pub_path}: the bundle was "
                             "modified or signed with another key; re-export and sign it") from None


# ---------------------------------------------------------------------- ONNX external data
# Protobuf field numbers (onnx/onnx.proto3) of the messages that can hold a TensorProto.
_MODEL, _GRAPH, _NODE, _ATTR, _FUNC, _SPARSE, _TENSOR, _TRAINING = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNC},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _FUNC: {7: _NODE, 11: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_MAX_DEPTH = 64


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise IntegrityError("truncated or malformed varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def check_onnx_self_contained(data: bytes, what: str = "ONNX model") -> None:
    """Raise :class:`IntegrityError` if the serialized ONNX model ``data`` is malformed at the
    protobuf level or any of its tensors keeps its values in an external file."""
    buf = memoryview(data)
    stack = [(0, len(buf), _MODEL, 0)]
    while stack:
        pos, end, kind, depth = stack.pop()
        children = _CHILDREN[kind]
        while pos < end:
            tag, pos = _varint(buf, pos, end)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                value, pos = _varint(buf, pos, end)
                if kind == _TENSOR and field == _TENSOR_DATA_LOCATION and value == 1:
                    raise IntegrityError(f"{what} keeps tensor data in an external file (data_location EXTERNAL); "
                                         "bundles must be self-contained: re-export the bundle")
            elif wire == 2:
                size, pos = _varint(buf, pos, end)
                if pos + size > end:
                    raise IntegrityError(f"{what} is not a valid ONNX file (a field runs past its message)")
                if kind == _TENSOR and field == _TENSOR_EXTERNAL_DATA:
                    raise IntegrityError(f"{what} names external data for a tensor; bundles must be "
                                         "self-contained: re-export the bundle")
                if field in children:
                    if depth >= _MAX_DEPTH:
                        raise IntegrityError(f"{what} nests graphs more than {_MAX_DEPTH} deep")
                    stack.append((pos, pos + size, children[field], depth + 1))
                pos += size
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise IntegrityError(f"{what} is not a valid ONNX file (protobuf wire type {wire})")
            if pos > end:
                raise IntegrityError(f"{what} is not a valid ONNX file (truncated)")
