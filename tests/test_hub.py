"""Hub download (SOURCE as a Hub id) and upload (`moeify.io.hub.push_to_hub`) against a fake hub on 127.0.0.1.

No test here reaches the internet: huggingface_hub is pointed at `tests/fake_hub.py` (HF_ENDPOINT and the
module constants it copied at import), its cache, token and home are temporary folders, and every socket
connection to anything but the loopback address fails the test.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, go_offline, point_huggingface_hub_at

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError
from moeify.io.hub import push_to_hub

REPO = "acme/tiny-llama"
DECOYS = ("pytorch_model.bin", "model.gguf", "flax_model.msgpack", "onnx/model.onnx")
FAKE_TOKEN = "hf_fake_write_token"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection (or name lookup) to anything but the loopback address."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:  # type: ignore[index]
            raise AssertionError(f"a test tried to connect to {address}")
        return real_connect(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        if host not in (*_LOOPBACK, None):
            raise AssertionError(f"a test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake hub that huggingface_hub talks to; stopped (and huggingface_hub's client closed) after."""
    from huggingface_hub import close_session

    with FakeHub() as fake:
        point_huggingface_hub_at(fake.endpoint, tmp_path / "hf-home", monkeypatch)
        close_session()  # the shared HTTP client is rebuilt with this environment
        try:
            yield fake
        finally:
            close_session()


def tiny_llama(folder: Path, num_hidden_layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(num_hidden_layers)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def repo_files(folder: Path) -> dict[str, bytes]:
    """A checkpoint laid out as a Hub repo: its files, a card, and files in formats moeify must not fetch."""
    files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny llama\n"
    files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    for decoy in DECOYS:
        files[decoy] = b"decoy: moeify must not download this"
    return files


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Repo contents of two revisions: `v1` (3 layers) then `main` (2 layers)."""
    root = tmp_path_factory.mktemp("hub-checkpoints")
    return {
        "v1": repo_files(tiny_llama(root / "v1", num_hidden_layers=3)),
        "main": repo_files(tiny_llama(root / "main", num_hidden_layers=2)),
    }


@pytest.fixture(scope="module")
def moe_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A moeify output folder (converted from a local tiny Llama, no hub involved)."""
    root = tmp_path_factory.mktemp("hub-moe")
    out = root / "moe"
    convert(str(tiny_llama(root / "dense", num_hidden_layers=2)), out, ConvertOptions(num_experts=4), progress=False)
    return out


def layers_of(out: Path) -> int:
    return json.loads((out / "config.json").read_text())["num_hidden_layers"]


def files_in(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


# ---------------------------------------------------------------------------------------------------- download


def test_hub_source_downloads_only_what_it_needs_per_revision_then_works_offline(
    hub: FakeHub,
    checkpoints: dict[str, dict[str, bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    v1 = hub.add_commit(REPO, checkpoints["v1"], tags=("v1",))
    main = hub.add_commit(REPO, checkpoints["main"])
    options = ConvertOptions(num_experts=4)

    result = convert(REPO, tmp_path / "main", options, progress=False)
    assert layers_of(result.output) == 2
    assert "base_model: acme/tiny-llama" in (result.output / "README.md").read_text()
    needed = {"config.json", "generation_config.json", "model.safetensors", "README.md"}
    assert hub.downloaded(REPO) == needed
    requested = " ".join(r.path for r in hub.requests)
    assert not any(decoy in requested for decoy in DECOYS)
    assert all(r.method in ("GET", "HEAD") for r in hub.requests) and not hub.unhandled
    assert all(r.headers["user-agent"].startswith("moeify/") for r in hub.requests)
    assert "Fetching" not in capsys.readouterr().err  # progress=False hides huggingface_hub's bars too

    assert layers_of(convert(f"{REPO}@v1", tmp_path / "at-v1", options, progress=False).output) == 3
    with_option = ConvertOptions(num_experts=4, revision="v1")
    assert layers_of(convert(REPO, tmp_path / "option-v1", with_option, progress=False).output) == 3
    assert layers_of(convert(f"{REPO}@{main}", tmp_path / "at-sha", options, progress=False).output) == 2
    assert not hub.unhandled

    cache = Path(os.environ["HF_HUB_CACHE"]) / "models--acme--tiny-llama"
    assert {p.name for p in (cache / "snapshots").iterdir()} == {main, v1}
    cached = {
        p.relative_to(snapshot).as_posix() for snapshot in (cache / "snapshots").iterdir() for p in snapshot.rglob("*")
    }
    assert cached == needed  # no decoy, no folder (onnx/) in the cache

    go_offline(monkeypatch)
    seen = len(hub.requests)
    assert layers_of(convert(REPO, tmp_path / "offline-main", options, progress=False).output) == 2
    assert layers_of(convert(f"{REPO}@v1", tmp_path / "offline-v1", options, progress=False).output) == 3
    with pytest.raises(MoeifyError, match="offline") as err:
        convert(f"{REPO}@v2", tmp_path / "offline-v2", options, progress=False)
    assert "local folder" in str(err.value)
    assert len(hub.requests) == seen


def test_hub_source_errors(hub: FakeHub, checkpoints: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    hub.add_commit(REPO, checkpoints["main"])
    with pytest.raises(MoeifyError, match="not found"):
        convert("acme/missing", tmp_path / "a", ConvertOptions(num_experts=4), progress=False)
    with pytest.raises(MoeifyError, match="revision 'nope' not found"):
        convert(f"{REPO}@nope", tmp_path / "b", ConvertOptions(num_experts=4), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------- upload


@pytest.mark.parametrize("upload", ["pipeline", "single-commit"])
@pytest.mark.parametrize("private", [True, False])
def test_push_creates_the_repo_and_uploads_every_file(
    hub: FakeHub, moe_out: Path, private: bool, upload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`upload`: huggingface_hub's streamed pipeline (hf_xet installed) or its single create_commit (no hf_xet)."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", upload == "single-commit")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    bars = are_progress_bars_disabled()

    url = push_to_hub(moe_out, "acme/moe", private=private, progress=False)

    assert url == f"{hub.endpoint}/acme/moe"
    assert [(c.repo_id, c.private) for c in hub.created] == [("acme/moe", private)]
    [commit] = hub.commits
    local = files_in(moe_out)
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json"} <= set(local)
    assert set(commit.files) == set(local) and commit.files == local
    assert (commit.repo_id, commit.revision, commit.lfs_files, commit.deleted) == ("acme/moe", "main", [], [])
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes and all(r.headers.get("authorization") == f"Bearer {FAKE_TOKEN}" for r in writes)
    assert all(r.headers["user-agent"].startswith("moeify/") for r in hub.requests)
    assert not hub.unhandled
    assert are_progress_bars_disabled() == bars  # progress=False only applies to the call

    # Pushing again reuses the repository and commits nothing: every file is unchanged.
    assert push_to_hub(moe_out, "acme/moe", private=private, progress=False) == url
    assert len(hub.created) == 2 and len(hub.commits) == 1


def test_push_to_a_branch_with_explicit_token_and_message(hub: FakeHub, moe_out: Path) -> None:
    push_to_hub(moe_out, "acme/moe", token=FAKE_TOKEN, revision="dev", commit_message="MoE v2", progress=False)
    [commit] = hub.commits
    assert (commit.revision, commit.summary) == ("dev", "MoE v2")
    assert set(hub.repos["acme/moe"].refs) == {"main", "dev"}
    assert set(hub.repos["acme/moe"].commits[hub.repos["acme/moe"].refs["main"]]) == {".gitattributes"}


def test_push_without_token(hub: FakeHub, moe_out: Path) -> None:
    with pytest.raises(MoeifyError, match="no Hugging Face token: run `hf auth login` or set HF_TOKEN"):
        push_to_hub(moe_out, "acme/moe")
    assert hub.requests == []


@pytest.mark.parametrize("repo_exists", [False, True])
def test_push_refused_403_says_the_token_lacks_write_access(
    hub: FakeHub, moe_out: Path, repo_exists: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at creation (new repo), or later at upload (existing repo: create_repo then checks it exists)."""
    if repo_exists:
        hub.add_commit("acme/moe", {"README.md": b"hello"})
    hub.write_error = 403
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(MoeifyError, match="lacks write access to acme/moe") as err:
        push_to_hub(moe_out, "acme/moe", progress=False)
    assert "hf auth login" in str(err.value)
    assert hub.commits == [] and hub.created == []


def test_push_refused_401_says_the_token_is_invalid(hub: FakeHub, moe_out: Path) -> None:
    hub.write_error = 401
    with pytest.raises(MoeifyError, match="invalid or expired"):
        push_to_hub(moe_out, "acme/moe", token="hf_revoked", progress=False)


def test_push_checks_the_folder_first(hub: FakeHub, moe_out: Path, tmp_path: Path) -> None:
    (tmp_path / "not-moeify").mkdir()
    (tmp_path / "file").write_text("x")
    for folder, message in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "file", "is a file"),
        (tmp_path / "not-moeify", "no config.json: it is not a moeify output"),
    ]:
        with pytest.raises(MoeifyError, match=message):
            push_to_hub(folder, "acme/moe", token=FAKE_TOKEN)
    assert hub.requests == []


def test_push_offline_or_unreachable(hub: FakeHub, moe_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    with pytest.raises(MoeifyError, match="invalid Hub repository id"):
        push_to_hub(moe_out, "a/b/c", token=FAKE_TOKEN)
    with monkeypatch.context() as offline:
        go_offline(offline)
        with pytest.raises(MoeifyError, match="offline: HF_HUB_OFFLINE"):
            push_to_hub(moe_out, "acme/moe", token=FAKE_TOKEN)
    assert hub.requests == []

    with socket.socket() as sock:  # a free port, closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(MoeifyError, match=f"cannot reach the Hugging Face Hub at {closed}"):
        push_to_hub(moe_out, "acme/moe", token=FAKE_TOKEN)


def test_cli_push_and_convert_push_to_hub(
    hub: FakeHub, moe_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moeify.cli import main

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert main(["push", str(moe_out), "acme/pushed", "--private", "--quiet"]) == 0
    assert f"{hub.endpoint}/acme/pushed" in capsys.readouterr().out
    assert [(c.repo_id, c.private) for c in hub.created] == [("acme/pushed", True)]
    assert hub.commits[0].files == files_in(moe_out)  # every file, byte for byte

    dense = tiny_llama(tmp_path / "dense", num_hidden_layers=2)
    out = tmp_path / "converted"
    assert (
        main(["convert", str(dense), "-o", str(out), "--num-experts", "4", "--push-to-hub", "acme/fresh", "--quiet"])
        == 0
    )
    assert [(c.repo_id, c.private) for c in hub.created][1:] == [("acme/fresh", False)]
    assert hub.commits[1].files == files_in(out)

    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(moe_out), "acme/pushed"]) == 2
    assert "hf auth login" in capsys.readouterr().err
