"""Publish a converted model on the Hugging Face Hub (`moeify push`, `moeify convert --push-to-hub`).

Everything goes through `huggingface_hub`: the repository is created (or reused), then the output folder is
uploaded in one call (config, safetensors, tokenizer, model card, remote code), with huggingface_hub's own
progress display. Failures become a `MoeifyError` that says what to do, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import MoeifyError

NO_TOKEN_MESSAGE = "no Hugging Face token: run `hf auth login` or set HF_TOKEN"
DEFAULT_COMMIT_MESSAGE = "Upload Mixture-of-Experts model converted with moeify"
_TOKEN_HELP = "create a token with write access at https://huggingface.co/settings/tokens, then run `hf auth login`"


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    progress: bool = True,
    ignore_patterns: list[str] | None = None,
) -> str:
    """Upload a moeify output folder to the Hub model repository `repo_id`; returns the repository URL.

    The repository is created if needed (`private` only applies to a repository created now: the visibility of
    an existing one is left as it is), then every file of `folder` is committed to `revision` (default: the main
    branch; a branch that does not exist yet is created from it). Files already on the Hub unchanged are skipped.

    Args:
        folder: the folder `moeify convert` wrote (it must hold a config.json).
        repo_id: `org/name`, or `name` for a repository in the token owner's namespace.
        private: create the repository private.
        token: a Hugging Face token with write access; default: `huggingface_hub.get_token()` (HF_TOKEN, or the
            token saved by `hf auth login`).
        revision: the branch to commit to.
        commit_message: the commit title (default: `DEFAULT_COMMIT_MESSAGE`).
        progress: show huggingface_hub's progress display (False hides it for this call only).
        ignore_patterns: files of `folder` not to upload (e.g. a training run's `checkpoint-*`).

    Raises:
        MoeifyError: no token, `folder` missing or not a moeify output, offline, token without write access,
            invalid repository id, Hub unreachable or refusing the upload.
    """
    path = _check_folder(folder)
    from importlib.metadata import version

    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise MoeifyError(
            "cannot push while offline: HF_HUB_OFFLINE is set. Unset it (or set HF_HUB_OFFLINE=0) and run again."
        )
    token = token or _saved_token()
    api = HfApi(token=token, library_name="moeify", library_version=version("moeify"))
    with _hub_errors(repo_id, api.endpoint), hub_progress_bars(progress):
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(url.repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=path,
            repo_id=url.repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            ignore_patterns=ignore_patterns,
        )
    return str(url)


def _check_folder(folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    if not path.exists():
        raise MoeifyError(f"OUT {path} does not exist: give the folder written by `moeify convert SOURCE -o OUT`.")
    if not path.is_dir():
        raise MoeifyError(f"OUT {path} is a file: give the folder written by `moeify convert SOURCE -o OUT`.")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise MoeifyError(
            f"OUT {path} has no config.json: it is not a moeify output (the folder written by `moeify convert`, "
            "or an adapter written by `moeify train`)."
        )
    return path


def _saved_token() -> str:
    """The token huggingface_hub would use (HF_TOKEN, then `hf auth login`'s file); MoeifyError if none."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import OIDCError

    try:
        token = get_token()
    except OIDCError as err:
        raise MoeifyError(f"cannot get a Hugging Face token through OIDC (HF_OIDC_RESOURCE is set): {err}") from None
    if not token:
        raise MoeifyError(NO_TOKEN_MESSAGE)
    return token


def transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning the Hub could not be reached (huggingface_hub 1.x uses httpx, 2.x httpx2)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _server_message(err: BaseException) -> str:
    message = getattr(err, "server_message", None)
    return f" (the Hub says: {message.strip()})" if message and message.strip() else ""


@contextlib.contextmanager
def _hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub's errors while pushing to `repo_id` into a `MoeifyError` saying what to do."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        said = _server_message(err)
        if status == 401:
            raise MoeifyError(
                f"the Hub refused the Hugging Face token for {repo_id} (401 Unauthorized{said}): it is invalid or "
                f"expired. Run `hf auth login` or set HF_TOKEN to a valid token; {_TOKEN_HELP}."
            ) from None
        if status == 403:
            raise MoeifyError(
                f"the Hugging Face token lacks write access to {repo_id} (403 Forbidden{said}): {_TOKEN_HELP}, or "
                "push to a namespace (user or organization) the token can write to."
            ) from None
        if isinstance(err, RepositoryNotFoundError) or status == 404:
            raise MoeifyError(
                f"Hub repository {repo_id} not found and it could not be created: check the namespace (user or "
                "organization) and that the token can write to it."
            ) from None
        raise MoeifyError(
            f"the Hub refused the push to {repo_id} (HTTP {status}{said}); nothing was committed, run again later."
        ) from None
    except HFValidationError as err:
        raise MoeifyError(f"invalid Hub repository id '{repo_id}': {err} Use org/name or name.") from None
    except OfflineModeIsEnabled:
        raise MoeifyError(
            "cannot push while offline: HF_HUB_OFFLINE is set. Unset it (or set HF_HUB_OFFLINE=0) and run again."
        ) from None
    except transport_errors() as err:
        raise MoeifyError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(err).__name__}: {err}): check the network "
            "connection, proxy settings and HF_ENDPOINT, then run again."
        ) from None
    except ValueError as err:
        if "README.md" not in str(err):
            raise
        raise MoeifyError(f"the Hub rejected the model card README.md of the upload: {err}") from None


@contextlib.contextmanager
def hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn huggingface_hub's progress bars on (or off) for the block, unless HF_HUB_DISABLE_PROGRESS_BARS decides."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_enabled = not are_progress_bars_disabled()
    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not None or enabled == was_enabled:
        yield
        return
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (enable_progress_bars if was_enabled else disable_progress_bars)()
