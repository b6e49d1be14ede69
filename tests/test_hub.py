"""prosa.weights.hub.resolve against a stand-in Hub (tests/hubserver.py): what is downloaded, the cache, offline
use, and the error messages. No internet: HF_ENDPOINT points at 127.0.0.1.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE... once, at import, into ``huggingface_hub.constants``;
the ``hf`` fixture sets the environment variables (for subprocesses) and patches those constants (for this one).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import serve, silent  # noqa: E402
from tiny import make_checkpoint  # noqa: E402

from prosa.errors import ModelNotFoundError  # noqa: E402
from prosa.weights.hub import resolve, select_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPO = "someorg/tiny-gpt2"
JUNK = ["flax_model.msgpack", "pytorch_model.bin", "tf_model.h5", "README.md", ".gitattributes", "modeling_tiny.py",
        "onnx/model.onnx", "onnx/config.json", "tiny-Q8_0.gguf"]
NEEDED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def _add(folder: Path, names: list[str]) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"junk " + name.encode())
    return folder


def _bin_only(src: Path, folder: Path) -> Path:
    """A copy of checkpoint ``src`` with its weights as pytorch_model.bin (transformers 5 only writes safetensors)."""
    import torch
    from safetensors.torch import load_file

    folder.mkdir()
    for name in NEEDED - {"model.safetensors"}:
        shutil.copy(src / name, folder / name)
    torch.save(load_file(src / "model.safetensors"), folder / "pytorch_model.bin")
    return _add(folder, ["README.md"])


@pytest.fixture(scope="session")
def repos(tmp_path_factory) -> dict[str, Path]:
    """Folders served as Hub repos (built once per session)."""
    root = tmp_path_factory.mktemp("hubrepos")
    main = _add(make_checkpoint("gpt2", root / "main", seed=0), JUNK)
    v1 = make_checkpoint("gpt2", root / "v1", seed=1)
    bin_only = _bin_only(main, root / "bin")
    sharded = make_checkpoint("gpt2", root / "sharded", max_shard_size="40KB")
    _add(sharded, ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "README.md"])
    shutil.copy(sharded / "model.safetensors.index.json", sharded / "pytorch_model.bin.index.json")
    gguf = _add(root / "gguf", ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "README.md"])
    docs = _add(root / "docs", ["README.md"])
    return {"main": main, "v1": v1, "bin": bin_only, "sharded": sharded, "gguf": gguf, "docs": docs}


@pytest.fixture
def hub(repos):
    """A running stand-in Hub with the test repos; ``someorg/tiny-gpt2`` has revisions main and v1."""
    with serve({REPO: {"main": repos["main"], "v1": repos["v1"]}, "someorg/tiny-bin": repos["bin"],
                "someorg/tiny-sharded": repos["sharded"], "someorg/tiny-gguf": repos["gguf"],
                "someorg/docs": repos["docs"], "someorg/gated": repos["main"], "tiny": repos["v1"]}, gated=("someorg/gated",)) as url:
        yield url


class HfEnv:
    """Points huggingface_hub (this process, and ``env`` for subprocesses) at a tmp cache and a stand-in Hub."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        from huggingface_hub import constants

        self.mp, self.constants = monkeypatch, constants
        self.cache = root / "hf" / "hub"
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                    "HUGGINGFACE_HUB_CACHE", "PROSA_MODEL"):
            monkeypatch.delenv(var, raising=False)
        self._set(HF_HOME=str(root / "hf"), HF_HUB_CACHE=str(self.cache), HF_TOKEN_PATH=str(root / "hf" / "token"),
                  HF_HUB_DISABLE_TELEMETRY="1")  # telemetry on would also GET {HF_ENDPOINT}/api/agent-harnesses
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(root / "hf" / ".agent_harnesses.json"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        self.endpoint("http://127.0.0.1:9")  # nothing listens on the discard port: no accidental real Hub

    def _set(self, **env: str) -> None:
        for key, value in env.items():
            self.mp.setenv(key, value)
            if key in ("HF_HOME", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
                self.mp.setattr(self.constants, key, value)

    def endpoint(self, url: str) -> None:
        self.mp.setenv("HF_ENDPOINT", url)
        self.mp.setattr(self.constants, "ENDPOINT", url)
        self.mp.setattr(self.constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    def offline(self, on: bool = True) -> None:
        self.mp.setattr(self.constants, "HF_HUB_OFFLINE", on)
        if on:
            self.mp.setenv("HF_HUB_OFFLINE", "1")
        else:
            self.mp.delenv("HF_HUB_OFFLINE", raising=False)

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ)


@pytest.fixture
def hf(tmp_path, monkeypatch) -> HfEnv:
    return HfEnv(tmp_path, monkeypatch)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- choosing files (no network)

def test_select_files_prefers_safetensors_and_skips_junk():
    files = sorted(NEEDED | set(JUNK) | {"vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja"})
    chosen = select_files(files, "o/r")
    assert set(chosen) == NEEDED | {"vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja"}
    assert select_files(["config.json", "pytorch_model.bin", "x.py"], "o/r") == ["config.json", "pytorch_model.bin"]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                            "c": "model-00001-of-00002.safetensors"}}
    chosen = select_files(["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                           "model-00002-of-00002.safetensors", "pytorch_model.bin"], "o/r", read_index=lambda n: index)
    assert chosen == ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                      "model-00002-of-00002.safetensors"]


def test_select_files_errors():
    from prosa.errors import CorruptModelError

    with pytest.raises(ModelNotFoundError, match=r"'o/r/FILE\.gguf' \(e\.g\. 'o/r/a\.gguf'\).*: a\.gguf, b\.gguf$"):
        select_files(["README.md", "a.gguf", "b.gguf"], "o/r")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        select_files(["README.md"], "o/r")
    with pytest.raises(ModelNotFoundError, match="no PyTorch weights.*flax_model.msgpack"):
        select_files(["config.json", "flax_model.msgpack"], "o/r")
    with pytest.raises(ModelNotFoundError, match="no file 'c.gguf'.*a.gguf"):
        select_files(["a.gguf"], "o/r", gguf_file="c.gguf")
    with pytest.raises(CorruptModelError, match="unexpected weights file"):
        select_files(["config.json", "model.safetensors.index.json"], "o/r",
                     read_index=lambda n: {"weight_map": {"a": "../../evil.py"}})


# ---------------------------------------------------------------- local paths

def test_local_paths_are_returned_as_is(tmp_path, monkeypatch, hf):
    folder = tmp_path / "my-model"
    folder.mkdir()
    gguf = folder / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(folder)) == folder
    assert resolve(folder) == folder
    assert resolve(str(gguf)) == gguf
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/my-model") == folder
    monkeypatch.chdir(tmp_path)
    assert resolve("my-model") == Path("my-model")  # an existing relative folder wins over a Hub id


@pytest.mark.parametrize("name", ["./nope", "~/nope", "/abs/nope", "a/b/c", "nope.gguf", "nope/config.json",
                                  "C:\\models\\nope"])
def test_missing_paths(name, hf):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve(name)


def test_missing_pathlike(tmp_path, hf):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve(tmp_path / "nope")


@pytest.mark.parametrize("name", ["bad id!", "org/-x", "a--b", ""])
def test_invalid_hub_ids(name, hf):
    with pytest.raises(ModelNotFoundError):
        resolve(name)


# ---------------------------------------------------------------- downloads

def test_downloads_only_needed_files_then_reuses_cache(hub, hf, repos):
    hf.endpoint(hub)
    folder = resolve(REPO)
    assert folder.is_dir() and hf.cache in folder.parents
    assert _files(folder) == NEEDED
    assert hub.downloaded() == NEEDED
    touched = {p.split("/resolve/", 1)[1].split("/", 1)[1] for p in hub.requests()}
    assert touched == NEEDED, "junk files must not even be HEAD-requested"
    assert (folder / "model.safetensors").read_bytes() == (repos["main"] / "model.safetensors").read_bytes()

    hub.log.clear()
    assert resolve(REPO) == folder
    assert hub.requests() == [], "second call: no file requests (HEAD or GET), only the listing"
    assert hub.requests(kind="api")


def test_offline_uses_cache(hub, hf):
    hf.endpoint(hub)
    folder = resolve(REPO)
    v1 = resolve(REPO, revision="v1")
    hub.log.clear()
    hf.offline()
    assert resolve(REPO) == folder
    assert resolve(REPO, revision="v1") == v1
    assert hub.log == []


def test_offline_after_server_stopped(repos, hf):
    with serve({REPO: repos["main"]}) as url:
        hf.endpoint(url)
        folder = resolve(REPO)
    hf.offline()
    assert resolve(REPO) == folder
    hf.offline(False)  # not declared offline, but the Hub is unreachable: falls back to the cache, quickly
    start = time.monotonic()
    assert resolve(REPO) == folder
    assert time.monotonic() - start < 5


def test_hub_down_uses_cache(hub, hf):
    hf.endpoint(hub)
    folder = resolve(REPO)
    hub.outage = 503
    assert resolve(REPO) == folder
    with pytest.raises(ModelNotFoundError, match="could not be reached.*503"):
        resolve("someorg/tiny-bin")


def test_offline_not_cached(hf):
    hf.offline()
    with pytest.raises(ModelNotFoundError) as err:
        resolve(REPO)
    msg = str(err.value)
    assert REPO in msg and "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "local model folder" in msg and "\n" not in msg


def test_unreachable_not_cached(hf):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="could not be reached.*local model folder"):
        resolve(REPO)  # HF_ENDPOINT is http://127.0.0.1:9: connection refused
    assert time.monotonic() - start < 5


def test_silent_hub_times_out(hf, monkeypatch):
    monkeypatch.setattr(hf.constants, "HF_HUB_ETAG_TIMEOUT", 1)
    with silent() as url:
        hf.endpoint(url)
        start = time.monotonic()
        with pytest.raises(ModelNotFoundError, match="could not be reached.*Timeout"):
            resolve(REPO)
        assert time.monotonic() - start < 10


def test_unknown_repo(hub, hf):
    hf.endpoint(hub)
    with pytest.raises(ModelNotFoundError) as err:
        resolve("someorg/missing")
    msg = str(err.value)
    assert "'someorg/missing' was not found on the Hugging Face Hub" in msg and "\n" not in msg


def test_gated_repo(hub, hf):
    hf.endpoint(hub)
    with pytest.raises(ModelNotFoundError, match="gated.*HF_TOKEN"):
        resolve("someorg/gated")


def test_unknown_revision(hub, hf):
    hf.endpoint(hub)
    with pytest.raises(ModelNotFoundError, match="revision 'v9' of model 'someorg/tiny-gpt2' was not found"):
        resolve(REPO, revision="v9")


def test_revision(hub, hf, repos):
    hf.endpoint(hub)
    main, v1 = resolve(REPO), resolve(REPO, revision="v1")
    assert main != v1 and _files(v1) == NEEDED
    assert (v1 / "model.safetensors").read_bytes() == (repos["v1"] / "model.safetensors").read_bytes()
    assert (v1 / "model.safetensors").read_bytes() != (main / "model.safetensors").read_bytes()
    assert resolve(REPO, revision=v1.name) == v1  # a commit hash
    assert _files(resolve("tiny")) == NEEDED  # a repo id without namespace, like "gpt2"


def test_bin_only_repo(hub, hf):
    hf.endpoint(hub)
    folder = resolve("someorg/tiny-bin")
    assert "pytorch_model.bin" in _files(folder) and "README.md" not in _files(folder)
    assert hub.downloaded() == _files(folder)


def test_sharded_repo(hub, hf, repos):
    hf.endpoint(hub)
    folder = resolve("someorg/tiny-sharded")
    shards = {p.name for p in repos["sharded"].glob("model-*.safetensors")}
    assert len(shards) > 1
    assert _files(folder) == (NEEDED - {"model.safetensors"}) | {"model.safetensors.index.json"} | shards
    assert not any(name.endswith(".bin") for name in hub.downloaded())
    hf.offline()
    assert resolve("someorg/tiny-sharded") == folder


def test_gguf_repo(hub, hf):
    hf.endpoint(hub)
    with pytest.raises(ModelNotFoundError) as err:
        resolve("someorg/tiny-gguf")
    msg = str(err.value)
    assert "tiny-Q4_K_M.gguf" in msg and "tiny-Q8_0.gguf" in msg and "someorg/tiny-gguf/FILE.gguf" in msg
    assert hub.downloaded() == set()

    path = resolve("someorg/tiny-gguf/tiny-Q8_0.gguf")
    assert path.is_file() and path.name == "tiny-Q8_0.gguf"
    assert hub.downloaded() == {"tiny-Q8_0.gguf"}
    with pytest.raises(ModelNotFoundError, match="no file 'nope.gguf'.*tiny-Q4_K_M.gguf"):
        resolve("someorg/tiny-gguf/nope.gguf")
    hf.offline()
    assert resolve("someorg/tiny-gguf/tiny-Q8_0.gguf") == path
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        resolve("someorg/other/x.gguf")


def test_gguf_of_a_transformers_repo(hub, hf):
    hf.endpoint(hub)
    path = resolve(f"{REPO}/tiny-Q8_0.gguf")
    assert path.name == "tiny-Q8_0.gguf" and hub.downloaded() == {"tiny-Q8_0.gguf"}
    hf.offline()  # only the .gguf is cached: the transformers folder is not usable offline
    with pytest.raises(ModelNotFoundError, match="cached copy of model 'someorg/tiny-gpt2' cannot be used.*HF_HUB_OFFLINE"):
        resolve(REPO)


def test_not_a_model(hub, hf):
    hf.endpoint(hub)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve("someorg/docs")


# ---------------------------------------------------------------- end to end (prosa.load, the CLI)

def test_load_from_hub_then_offline(hub, hf):
    import prosa

    hf.endpoint(hub)
    lm = prosa.load(REPO)
    kw = dict(max_new_tokens=5, seed=0, ignore_eos=True)    # 5 tokens: two empty texts would be equal too
    first = lm.generate("A story about", **kw)
    assert len(first.tokens) == 5
    hub.log.clear()
    hf.offline()
    again = prosa.load(REPO)
    assert again.generate("A story about", **kw).tokens == first.tokens
    assert hub.log == []


def test_cli_reports_missing_model_in_one_line(hub, hf):
    hf.endpoint(hub)
    prosa_bin = Path(sys.executable).with_name("prosa")
    cmd = [str(prosa_bin)] if prosa_bin.exists() else [sys.executable, "-m", "prosa.cli"]
    proc = subprocess.run(cmd + ["info", "someorg/missing"], capture_output=True, text=True, env=hf.env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "someorg/missing" in lines[0] and "not found" in lines[0], proc.stderr
