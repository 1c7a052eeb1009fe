"""Signed bundles: `atomlab keygen`, `atomlab sign` and `atomlab verify --trusted-keys`.

A bundle's manifest.json lists every file with its sha256, so signing the manifest signs the bundle.
`manifest.sig` is a DSSE envelope (the signing envelope of in-toto and Sigstore) over an in-toto
Statement whose subject is manifest.json and its sha256: the same envelope and statement that the
OpenSSF model-signing format puts inside its Sigstore bundle, signed here with a plain Ed25519 key
(`cryptography`), with no transparency log or certificate authority to reach. Any DSSE verifier
can check it with the signer's public key; `verify --trusted-keys DIR` checks it against a folder
of trusted `NAME.pub` files and names the signer from that folder, never from the signature's own
claim.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError
from atomlab.manifest import MANIFEST, SIGNATURE, sha256_file

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/atomlab/atomlab/release-signature/v1"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise AtomlabError("signing needs the cryptography package: pip install 'atomlab[sign]'") from None
    return serialization, ed25519


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed (type and body, length-prefixed)."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def fingerprint(public_key: Any) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def keygen(folder: Path, name: str) -> tuple[Path, Path]:
    """A new Ed25519 key pair: folder/NAME.key (private, PEM, owner-only) and folder/NAME.pub."""
    serialization, ed25519 = _crypto()
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise AtomlabError(f"{path}: already exists; choose another --name or folder (keys are never replaced)")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private)
    from atomlab.steps import write_atomic  # here: the hub client verifies and signs without the step graph

    write_atomic(public_path, public)
    return private_path, public_path


def _load_private(path: Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AtomlabError(f"{path}: not a readable private key ({exc}); make one with `atomlab keygen DIR`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AtomlabError(f"{path}: not an Ed25519 private key; make one with `atomlab keygen DIR`")
    return key


def trusted_keys(folder: Path) -> dict[str, tuple[str, Any]]:
    """fingerprint -> (name, public key) for every NAME.pub in folder."""
    serialization, ed25519 = _crypto()
    if not folder.is_dir():
        raise AtomlabError(f"{folder}: --trusted-keys must be a folder of NAME.pub files")
    found = {}
    for path in sorted(folder.glob("*.pub")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except ValueError as exc:
            raise AtomlabError(f"{path}: not a PEM public key ({exc}); remove it from the trusted folder") from None
        if isinstance(key, ed25519.Ed25519PublicKey):
            found[fingerprint(key)] = (path.stem, key)
    if not found:
        raise AtomlabError(f"{folder}: no Ed25519 public keys (NAME.pub) to trust")
    return found


def sign_bundle(bundle: Path, key_path: Path, name: str | None = None) -> dict[str, Any]:
    """Write bundle/manifest.sig signing manifest.json; returns the statement signed."""
    if not (bundle / MANIFEST).is_file():
        raise AtomlabError(f"{bundle}: no {MANIFEST}; sign a release bundle")
    from atomlab.release.bundle import verify_bundle
    from atomlab.steps import write_atomic

    problems = verify_bundle(bundle)
    if problems:  # signing vouches for the files: never sign a bundle that does not match its manifest
        raise AtomlabError(f"{bundle}: {problems[0]}; fix the bundle (atomlab verify) before signing it")
    text = sign_subject(MANIFEST, sha256_file(bundle / MANIFEST), key_path, name)
    write_atomic(bundle / SIGNATURE, text)
    return json.loads(base64.b64decode(json.loads(text)["payload"]))


def check_signature(bundle: Path, trusted_folder: Path) -> tuple[str, str]:
    """(signer name, key fingerprint) when manifest.sig is a valid signature by a trusted key over this
    manifest.json; otherwise an AtomlabError saying which check failed."""
    keys = trusted_keys(trusted_folder)
    path = bundle / SIGNATURE
    if not path.is_file():
        raise AtomlabError(f"{bundle}: not signed (no {SIGNATURE}); sign it with `atomlab sign {bundle} --key KEY`")
    return verify_envelope(path.read_text(encoding="utf-8"), sha256_file(bundle / MANIFEST), keys, str(path),
                           f"in {trusted_folder}")


def public_keys(pems: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """fingerprint -> (name, public key) for named PEM public keys (a hub's registered keys)."""
    serialization, ed25519 = _crypto()
    found = {}
    for name, pem in pems.items():
        key = serialization.load_pem_public_key(pem.encode())
        if isinstance(key, ed25519.Ed25519PublicKey):
            found[fingerprint(key)] = (name, key)
    return found


def sign_subject(name: str, sha256: str, key_path: Path, signer: str | None = None) -> str:
    """A DSSE envelope (JSON text) over an in-toto statement naming one file and its sha256."""
    key = _load_private(key_path)
    keyid = fingerprint(key.public_key())
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "signer": signer or key_path.stem,
            "key": keyid,
            "signed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    payload = json.dumps(statement, sort_keys=True).encode()
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": keyid, "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, payload))).decode()}],
    }
    return json.dumps(envelope, indent=2) + "\n"


def verify_envelope(
    text: str, subject_sha256: str, keys: dict[str, tuple[str, Any]], where: str, trusted: str = ""
) -> tuple[str, str]:
    """(signer name, key fingerprint) when `text` is a DSSE envelope signed by one of `keys` over a
    statement whose subject has `subject_sha256`; otherwise an AtomlabError saying which check failed."""
    from cryptography.exceptions import InvalidSignature

    try:
        envelope = json.loads(text)
        payload = base64.b64decode(envelope["payload"], validate=True)
        statement = json.loads(payload)
        signed_digest = statement["subject"][0]["digest"]["sha256"]
        signatures = [(s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in envelope["signatures"]]
    except (ValueError, KeyError, IndexError, TypeError):
        raise AtomlabError(f"{where}: corrupt signature file (not the DSSE envelope atomlab sign writes)") from None
    for keyid, signature in signatures:
        if keyid not in keys:
            continue
        name, public_key = keys[keyid]
        try:
            public_key.verify(signature, pae(envelope["payloadType"], payload))
        except InvalidSignature:
            raise AtomlabError(f"{where}: the signature by {name} ({keyid}) does not match its statement") from None
        if envelope["payloadType"] != PAYLOAD_TYPE or statement.get("_type") != STATEMENT_TYPE:
            raise AtomlabError(f"{where}: signed, but not an in-toto statement about the signed file")
        if signed_digest != subject_sha256:
            subject = statement["subject"][0].get("name", "the signed file")
            raise AtomlabError(f"{subject}: changed since {name} signed it (sha256 differs from {where})")
        return name, keyid
    known = ", ".join(keyid for keyid, _ in signatures) or "none"
    raise AtomlabError(f"{where}: signed by no trusted key{' ' + trusted if trusted else ''} (signed by {known})")


def _keygen_command(args: argparse.Namespace) -> int:
    private_path, public_path = keygen(Path(args.folder), args.name)
    serialization, _ = _crypto()
    key = serialization.load_pem_public_key(public_path.read_bytes())
    print(f"keygen: {private_path} (private: keep it secret) and {public_path} (share it); key {fingerprint(key)}")
    return 0


def _sign_command(args: argparse.Namespace) -> int:
    statement = sign_bundle(Path(args.bundle), Path(args.key), args.name)
    signer = statement["predicate"]
    print(f"sign: {Path(args.bundle) / SIGNATURE} by {signer['signer']} ({signer['key']})")
    return 0


def _verify_command(args: argparse.Namespace) -> int:
    import sys

    from atomlab.release.bundle import verify_bundle, verify_listed

    folder = Path(args.bundle)
    if not folder.is_dir():
        raise AtomlabError(f"{folder}: not a folder (give the path of a release bundle)")
    problems = verify_bundle(folder)
    for problem in problems[1:]:
        print(f"{folder}: {problem}", file=sys.stderr)
    if problems:
        more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
        raise AtomlabError(f"{folder}: {problems[0]}{more}; the bundle does not match its manifest")
    message = f"verify: all {len(verify_listed(folder))} files in {folder} match its manifest"
    if args.trusted_keys:
        name, keyid = check_signature(folder, Path(args.trusted_keys))
        message += f"; signed by {name} ({keyid})"
    elif (folder / SIGNATURE).is_file():
        message += " (it is signed: pass --trusted-keys DIR to check the signature)"
    print(message)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keygen", help="write an Ed25519 key pair for signing bundles")
    keys.add_argument("folder", help="where to write NAME.key (private) and NAME.pub (public)")
    keys.add_argument("--name", default="atomlab", help="the signer's name, used for the file names (default atomlab)")
    keys.set_defaults(handler=_keygen_command)
    sign = commands.add_parser("sign", help="sign a release bundle's manifest (writes manifest.sig)")
    sign.add_argument("bundle")
    sign.add_argument("--key", required=True, help="a private key from `atomlab keygen`")
    sign.add_argument("--name", help="the signer's name recorded in the signature (default: the key file's name)")
    sign.set_defaults(handler=_sign_command)
    verify = commands.add_parser("verify", help="recheck every file of a release bundle against its manifest")
    verify.add_argument("bundle")
    verify.add_argument(
        "--trusted-keys", metavar="DIR", help="also require a valid signature by one of the NAME.pub keys in DIR"
    )
    verify.set_defaults(handler=_verify_command)
