"""Turn a model name into local files: an existing path, or a Hugging Face Hub id downloaded into the HF cache.

Only the files prosa needs are downloaded (config, tokenizer, one set of weights), through
``huggingface_hub.snapshot_download`` so users get its progress bars and its cache. The usual Hugging Face
environment variables apply: ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE=1``
(use the cache only) and ``HF_HUB_ETAG_TIMEOUT`` (seconds to wait for the Hub before falling back to the cache).
Remote code (``*.py``) is never downloaded.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import CorruptModelError, ModelNotFoundError, ProsaError

__all__ = ["resolve", "select_files", "AUX_FILES"]

#: Non-weight files a transformers checkpoint may need; downloaded when the repo has them.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
             "chat_template.jinja", "chat_template.json")
#: Weights in order of preference: (single file, sharded index). .bin only when there are no safetensors.
WEIGHTS = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
_PATH_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin", ".pt", ".pth")
_MAX_LISTED = 10


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """Return a local folder (or a local ``.gguf`` file) holding the model ``name_or_path``.

    Args:
        name_or_path: an existing file or folder; a Hub id (``gpt2``, ``org/name``); or ``org/name/FILE.gguf``
            for one GGUF file of a Hub repo.
        revision: branch, tag or commit hash on the Hub (default: the repo's default branch). Ignored for paths.

    Raises:
        ModelNotFoundError: no such path, unknown/gated repo or revision, no usable files, or not cached offline.
        ProsaError: the download itself failed.
    """
    if isinstance(name_or_path, os.PathLike):
        path = Path(name_or_path).expanduser()
        if path.exists():
            return path
        raise ModelNotFoundError(f"no such file or folder: {path}")
    name = str(name_or_path).strip()
    if not name:
        raise ModelNotFoundError("no model given: pass a Hub id like 'gpt2' or 'org/name', or a local folder")
    path = Path(name).expanduser()
    if path.exists():
        return path
    repo_id, gguf_file = _split_gguf_id(name)
    if gguf_file is None and _looks_like_path(name):
        raise ModelNotFoundError(f"no such file or folder: {os.path.expanduser(name)}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelNotFoundError(f"'{name}' is neither an existing file or folder nor a valid Hugging Face Hub id "
                                 "(like 'gpt2' or 'org/name')") from None
    return _from_hub(repo_id, revision, gguf_file)


def select_files(files: list[str], repo: str, gguf_file: str | None = None,
                 read_index: Callable[[str], dict] | None = None) -> list[str]:
    """Choose which of a repo's ``files`` prosa needs (see module doc); raise ModelNotFoundError if none fit.

    ``read_index(name)`` returns the parsed JSON of a sharded-weights index (needed only for sharded repos).
    """
    if gguf_file is not None:
        if gguf_file in files:
            return [gguf_file]
        ggufs = _ggufs(files)
        raise ModelNotFoundError(f"'{repo}' has no file '{gguf_file}'; " + (
            f"its GGUF files: {_listing(ggufs)}" if ggufs else f"it has no .gguf files (files: {_listing(files)})"))
    top = {f for f in files if "/" not in f}
    if "config.json" not in top:
        if ggufs := _ggufs(files):
            raise ModelNotFoundError(f"'{repo}' holds GGUF files, not a transformers checkpoint: pick one as "
                                     f"'{repo}/FILE.gguf' (e.g. '{repo}/{ggufs[0]}'); its GGUF files: {_listing(ggufs)}")
        raise ModelNotFoundError(f"'{repo}' is not a transformers model: it has no config.json"
                                 f" (files: {_listing(sorted(files))})")
    chosen = [f for f in AUX_FILES if f in top]
    for single, index in WEIGHTS:
        if single in top:
            return chosen + [single]
        if index in top:
            assert read_index is not None, "read_index is needed for sharded checkpoints"
            return chosen + [index] + _shards(read_index(index), index, single.rsplit(".", 1)[1])
    raise ModelNotFoundError(f"'{repo}' has no PyTorch weights (model.safetensors, pytorch_model.bin or a sharded"
                             f" index of them); files: {_listing(sorted(top))}")


def _from_hub(repo_id: str, revision: str | None, gguf_file: str | None) -> Path:
    """Download (or find in the cache) what ``repo_id`` at ``revision`` needs; return the folder or the .gguf."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    label, revision = _label(repo_id, revision), revision or constants.DEFAULT_REVISION  # same ref for every call
    if _offline(constants):
        return _from_cache(repo_id, revision, gguf_file, "HF_HUB_OFFLINE is set",
                           "unset HF_HUB_OFFLINE and run once with network access to download it")
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=float(constants.HF_HUB_ETAG_TIMEOUT))
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"revision '{revision}' of model '{repo_id}' was not found on the Hub "
                                 f"({constants.ENDPOINT}): use an existing branch, tag or commit hash") from None
    except RepositoryNotFoundError as err:  # also GatedRepoError; a cached copy still works (as in huggingface_hub)
        if isinstance(err, GatedRepoError):
            msg = (f"model '{repo_id}' is gated: accept its terms at {constants.ENDPOINT}/{repo_id}, then log in "
                   "with `hf auth login` or set HF_TOKEN")
        else:
            msg = (f"model '{repo_id}' was not found on the Hugging Face Hub ({constants.ENDPOINT}): check the id "
                   "(like 'gpt2' or 'org/name'); for a private repo log in with `hf auth login` or set HF_TOKEN")
        return _from_cache(repo_id, revision, gguf_file, "", "", not_cached_message=msg)
    except _network_errors() as err:  # includes HfHubHTTPError (an OSError) and OfflineModeIsEnabled
        status = getattr(getattr(err, "response", None), "status_code", 500)
        if isinstance(err, HfHubHTTPError) and status < 500:
            raise ProsaError(f"the Hub refused to list model {label}: {_short(err)}") from None
        return _from_cache(repo_id, revision, gguf_file,
                           f"the Hub ({constants.ENDPOINT}) could not be reached ({_short(err)})",
                           "check your network connection (or HF_ENDPOINT) and try again")

    def read_index(name: str) -> dict:
        return _read_json(Path(hf_hub_download(repo_id, name, revision=info.sha)), label)

    try:
        files = [s.rfilename for s in info.siblings or []]
        wanted = select_files(files, repo_id, gguf_file, read_index)
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[_escape(f) for f in wanted]))
    except ProsaError:
        raise
    except _network_errors() as err:
        raise ProsaError(f"downloading model {label} from {constants.ENDPOINT} failed ({_short(err)}): "
                         "check your network connection and disk space, then try again") from None
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing:  # the repo changed between listing and download
        raise ProsaError(f"downloading model {label} is incomplete (missing {_listing(missing)}): try again")
    return folder / gguf_file if gguf_file else folder


def _from_cache(repo_id: str, revision: str | None, gguf_file: str | None, why: str, fix: str,
                not_cached_message: str | None = None) -> Path:
    """Resolve from the HF cache only. ``why``/``fix`` explain a miss, or ``not_cached_message`` replaces them."""
    from huggingface_hub import constants, snapshot_download

    label = _label(repo_id, revision)
    miss = not_cached_message or (f"model {label} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                                  f"and {why}: {fix}, or pass the path of a local model folder")
    try:
        # allow_patterns=[]: only locate the snapshot; which files must be there is decided below, not by the
        # cached tree listing (which would demand every file of the repo, e.g. junk we chose not to download).
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[]))
    except (OSError, ValueError):  # LocalEntryNotFoundError (a FileNotFoundError), IncompleteSnapshotError, ...
        raise ModelNotFoundError(miss) from None
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    fix = f"{why}: {fix}" if why else "run once with network access to complete it"
    try:
        wanted = select_files(files, repo_id, gguf_file, lambda name: _read_json(folder / name, label))
    except ModelNotFoundError as err:  # e.g. only a .gguf of this repo was downloaded, and now the folder is asked
        raise ModelNotFoundError(f"the cached copy of model {label} cannot be used ({err}); {fix}") from None
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing:
        raise ModelNotFoundError(f"the cached copy of model {label} is incomplete (missing {_listing(missing)}); {fix}")
    return folder / gguf_file if gguf_file else folder


def _split_gguf_id(name: str) -> tuple[str, str | None]:
    """``org/name/sub/file.gguf`` -> (``org/name``, ``sub/file.gguf``); anything else -> (name, None)."""
    parts = name.split("/")
    if len(parts) >= 3 and name.lower().endswith(".gguf") and not name.startswith((".", "~", "/")) \
            and "\\" not in name and all(p and p not in (".", "..") for p in parts):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return name, None


def _looks_like_path(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.lower().endswith(_PATH_SUFFIXES))


def _offline(constants) -> bool:
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached or a transfer fails: OSError covers HfHubHTTPError,
    OfflineModeIsEnabled and requests' errors (huggingface_hub < 1.0); httpx/httpx2 errors are not OSErrors."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _shards(index: dict, index_name: str, suffix: str) -> list[str]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptModelError(f"{index_name} has no weight_map")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        if shard.startswith("/") or ".." in shard.split("/") or not shard.endswith("." + suffix):
            raise CorruptModelError(f"{index_name} names an unexpected weights file: {shard!r}")
    return shards


def _read_json(path: Path, label: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CorruptModelError(f"{path.name} of model {label} is unreadable: {err}") from None


def _escape(name: str) -> str:
    """A file name as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _ggufs(files: list[str]) -> list[str]:
    return sorted(f for f in files if f.lower().endswith(".gguf"))


def _listing(names: list[str]) -> str:
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more if names else "none"


def _label(repo_id: str, revision: str | None) -> str:
    return f"'{repo_id}'" + (f" (revision '{revision}')" if revision not in (None, "main") else "")


def _short(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__
