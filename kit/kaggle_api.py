"""The one place that imports the kaggle package: downloads, submissions, kernels, models, its errors in plain words.

`import kaggle` authenticates at import time and prints its own help when that fails, so the
package is imported lazily, quietly, and only by the commands that talk to Kaggle.
"""

from __future__ import annotations

import contextlib
import errno
import io
from typing import Iterator, Protocol

from kit.cli import KitError
from kit.config import COMPETITION

CREDENTIALS_HELP = (
    "Kaggle credentials were not found. Give them in any one of these ways, then run the command again: "
    "set KAGGLE_API_TOKEN to a token from https://www.kaggle.com/settings/api (or save it to "
    "~/.kaggle/access_token); or set KAGGLE_USERNAME and KAGGLE_KEY; or put kaggle.json (from 'Create Legacy "
    "API Key' on the same page) in ~/.kaggle/kaggle.json, or in the folder named by KAGGLE_CONFIG_DIR, with "
    "chmod 600; or run 'kaggle auth login'. On Colab, add KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN) "
    "in the Secrets panel (the key icon) and let the notebook copy them into the environment. On Kaggle no "
    "credentials are needed: attach the competition (or dataset) as input data and run 'python -m kit.download "
    f"--from-dir /kaggle/input/{COMPETITION}' (or the dataset's folder)."
)


class KaggleClient(Protocol):
    """The slice of kaggle's KaggleApi the kit uses."""

    def competition_download_files(self, competition: str, path: str | None = None, force: bool = False,
                                   quiet: bool = True) -> None: ...

    def dataset_download_files(self, dataset: str, path: str | None = None, force: bool = False,
                               quiet: bool = True, unzip: bool = False) -> None: ...

    def competition_submit(self, file_name: str, message: str, competition: str, quiet: bool = False): ...

    def kernels_push(self, folder: str, timeout: str | None = None, acc: str | None = None): ...

    def kernels_status(self, kernel: str): ...

    def kernels_output(self, kernel: str, path: str, file_pattern: str | None = None, force: bool = False,
                       quiet: bool = True) -> tuple[list[str], str]: ...

    def model_get(self, model: str): ...

    def model_create_new(self, folder: str): ...

    def model_instance_create(self, folder: str, quiet: bool = False, dir_mode: str = "skip"): ...

    def model_instance_version_create(self, model_instance: str, folder: str, version_notes: str = "",
                                      quiet: bool = False, dir_mode: str = "skip"): ...


def slugify(title: str) -> str:
    """The slug the kaggle package makes of a kernel's title, and Kaggle names the kernel by (python-slugify, the
    package's own dependency): 'car--kit' and 'car-kit-' both become 'car-kit'."""
    from slugify import slugify as package_slugify

    return package_slugify(title)


def kaggle_api() -> KaggleClient:
    """The kaggle package's API object, authenticated; its exit on missing credentials becomes our message."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
        except SystemExit:
            raise KitError(CREDENTIALS_HELP) from None
        except Exception as error:  # malformed kaggle.json and the like
            raise KitError(f"The kaggle package could not read your credentials ({error}). "
                           f"{CREDENTIALS_HELP}") from None
    return api


def username(api: KaggleClient) -> str:
    """The account the credentials belong to (a token's user is looked up when the API authenticates)."""
    return getattr(api, "config_values", {}).get("username") or ""


def page_of(competition: str | None = None, dataset: str | None = None, kernel: str | None = None,
            model: str | None = None) -> str:
    if kernel:
        return f"https://www.kaggle.com/code/{kernel}"
    if model:
        return f"https://www.kaggle.com/models/{model}"
    if dataset:
        return f"https://www.kaggle.com/datasets/{dataset}"
    return f"https://www.kaggle.com/competitions/{competition or COMPETITION}"


def _what(competition: str | None, dataset: str | None, kernel: str | None, model: str | None) -> str:
    if kernel:
        return f"the notebook '{kernel}'"
    if model:
        return f"the model '{model}'"
    return f"the dataset '{dataset}'" if dataset else f"the competition '{competition or COMPETITION}'"


@contextlib.contextmanager
def kaggle_errors(action: str, competition: str | None = None, dataset: str | None = None, kernel: str | None = None,
                  model: str | None = None) -> Iterator[None]:
    """Translate what the kaggle package raises into one-paragraph messages naming the page to open."""
    page = page_of(competition, dataset, kernel, model)
    what = _what(competition, dataset, kernel, model)
    try:
        yield
    except KitError:
        raise
    except ValueError as error:  # the package's own checks of what it was given (a slug, a metadata file)
        raise KitError(f"{action} failed: the kaggle package refused it ({error}).") from None
    except Exception as error:  # requests' errors are OSErrors too: look at the HTTP status first
        status = http_status(error)
        if status == 401:
            raise KitError(f"{action} failed: Kaggle rejected the credentials (401 Unauthorized). The token "
                           "may be expired or mistyped: create a new one at https://www.kaggle.com/settings/api "
                           "and set it again. " + CREDENTIALS_HELP.split(". ", 1)[1]) from None
        if status == 403:
            if kernel or model:
                raise KitError(f"{action} failed: Kaggle refused access to {what} (403 Forbidden): it belongs to "
                               "another account, or is private. Name one of your own (OWNER is your Kaggle user "
                               "name) and run the command again.") from None
            if dataset:
                raise KitError(f"{action} failed: Kaggle refused access to {what} (403 Forbidden). It may be "
                               f"private, or need its terms accepted: open {page} logged in as the same user, "
                               "then run the command again.") from None
            raise KitError(f"{action} failed: Kaggle refused access (403 Forbidden). Accept the competition's "
                           f"rules first, logged in as the same user: open {page}/rules and click "
                           "'I Understand and Accept', then run the command again.") from None
        if status == 404:
            raise KitError(f"{action} failed: Kaggle says {what} was not found (404). Check the spelling and "
                           f"that {page} opens for your account.") from None
        if status is not None:
            raise KitError(f"{action} failed: Kaggle answered HTTP {status} ({error}). Try again later.") from None
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise KitError(f"{action} failed: the disk is full. Free some space (the competition's archive is "
                           "about 1.6 GiB and unpacks to about 1.7 GiB more) or use another --workdir.") from None
        if _is_network_error(error):
            raise KitError(f"{action} failed: Kaggle could not be reached ({error}). Check the internet "
                           "connection (on Kaggle, switch Internet on in the notebook's settings).") from None
        raise


def http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None) or getattr(error, "status", None)
    return int(status) if isinstance(status, int) else None


def _is_network_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectionError", "Timeout", "NewConnectionError", "MaxRetryError", "gaierror",
                         "ConnectTimeout", "ReadTimeout", "TimeoutError"})
