"""Signed bundles: a file changed together with the manifest passes plain verify but fails a signed one."""

import base64
import json
import stat

import pytest

from atomlab.cli import main
from atomlab.steps import MANIFEST, sha256_file, write_json
from tests.conftest import atomlab

pytest.importorskip("cryptography")


@pytest.fixture
def keys(tmp_path):
    assert main(["keygen", str(tmp_path / "keys"), "--name", "alice"]) == 0
    assert main(["keygen", str(tmp_path / "other"), "--name", "mallory"]) == 0
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "alice.pub").write_bytes((tmp_path / "keys" / "alice.pub").read_bytes())
    return tmp_path


def verify(bundle, trusted, capsys) -> tuple[int, str]:
    code = main(["verify", str(bundle), "--trusted-keys", str(trusted)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def forge(bundle, name: str, text: str) -> None:
    """Change a file and rewrite the manifest to match: what plain verify cannot catch."""
    (bundle / name).write_text(text)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["outputs"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    write_json(bundle / MANIFEST, manifest)


def test_keygen_writes_a_private_key_only_its_owner_reads(keys, capsys):
    private = keys / "keys" / "alice.key"
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (keys / "keys" / "alice.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert main(["keygen", str(keys / "keys"), "--name", "alice"]) == 2  # never replaces a key
    assert "already exists" in capsys.readouterr().err


def test_signed_bundle_verifies_and_names_the_signer(bundle_copy, keys):
    atomlab("sign", str(bundle_copy), "--key", str(keys / "keys" / "alice.key"), cwd=bundle_copy)
    result = atomlab("verify", str(bundle_copy), "--trusted-keys", str(keys / "trusted"), cwd=bundle_copy)
    assert "match its manifest; signed by alice (sha256:" in result.stdout
    plain = atomlab("verify", str(bundle_copy), cwd=bundle_copy)  # the signature file is not "unlisted"
    assert "match its manifest" in plain.stdout and "--trusted-keys" in plain.stdout


def test_file_and_manifest_changed_together_fail_a_signed_verify(bundle_copy, keys, capsys):
    assert main(["sign", str(bundle_copy), "--key", str(keys / "keys" / "alice.key")]) == 0
    forge(bundle_copy, "MODEL_CARD.md", "a better model than it is\n")
    assert main(["verify", str(bundle_copy)]) == 0  # the manifest alone cannot tell
    code, output = verify(bundle_copy, keys / "trusted", capsys)
    assert code == 2 and "manifest.json: changed since alice signed it" in output


def test_signature_by_an_untrusted_key_or_a_forged_statement_fails(bundle_copy, keys, capsys):
    assert main(["sign", str(bundle_copy), "--key", str(keys / "other" / "mallory.key"), "--name", "alice"]) == 0
    code, output = verify(bundle_copy, keys / "trusted", capsys)
    assert code == 2 and "signed by no trusted key" in output  # the claimed name does not matter

    assert main(["sign", str(bundle_copy), "--key", str(keys / "keys" / "alice.key")]) == 0
    forge(bundle_copy, "MODEL_CARD.md", "changed\n")
    envelope = json.loads((bundle_copy / "manifest.sig").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["subject"][0]["digest"]["sha256"] = sha256_file(bundle_copy / MANIFEST)  # re-point, keep the sig
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (bundle_copy / "manifest.sig").write_text(json.dumps(envelope))
    code, output = verify(bundle_copy, keys / "trusted", capsys)
    assert code == 2 and "signature by alice" in output and "does not match" in output


def test_unsigned_or_damaged_signature_is_a_one_line_error(bundle_copy, keys, capsys):
    code, output = verify(bundle_copy, keys / "trusted", capsys)
    assert code == 2 and "not signed" in output and "atomlab sign" in output
    (bundle_copy / "manifest.sig").write_text("{")
    code, output = verify(bundle_copy, keys / "trusted", capsys)
    assert code == 2 and "corrupt signature file" in output and output.count("\n") == 1
