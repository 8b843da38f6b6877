"""Train on Kaggle's machines from your own terminal: push the kit's notebook, watch it, pull its output, continue.

    python -m kit.remote push --watch          # a kernel YOU/car-kit on a GPU, training the recipe
    python -m kit.remote status --watch        # queued, running, complete or error, until it ends
    python -m kit.remote pull                  # its output (the run: weights, submissions, logs) into --workdir
    python -m kit.remote continue --watch      # the next version, with this one's output attached: it resumes

Each version trains until --time-budget (by default the session limit of its accelerator less 30 minutes:
690 of a GPU session's 720, 510 of a TPU session's 540), stops with a checkpoint and ends cleanly, its
report and prediction started only if they end 10 minutes before the limit; `continue` pushes the next
version with the kernel's own output attached as a source, where the notebook finds the run and
resumes it at the next batch. What was pushed is kept in
<workdir>/remote/kernel.json, so the later commands need no arguments.

Exit codes as every command's: 0 done (status: the version completed; pull: every stage is done and the
prediction written), 3 work remains (a version queued or running; a pulled run with stages left:
continue it), 2 a user error, 1 the version failed on Kaggle (its message and log are shown).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from kit.cli import EXIT_DONE, EXIT_FAILED, EXIT_STOPPED, KitError, add_workdir, main_guard, workdir_lock
from kit.config import COMPETITION, KAGGLE_SESSION_MINUTES, PROFILES, Workdir
from kit.files import atomic_path, write_text
from kit.kaggle_api import KaggleClient, kaggle_api, kaggle_errors, slugify, username
from kit.manifest import Manifest, is_compiled, status_table
from kit.notebook import HARDWARE, kaggle_budgets, kaggle_cells, notebook

RECORD = Path("remote") / "kernel.json"
KIT_SOURCE = Path(__file__).resolve().parents[1]  # the kit's checkout, when it is one: its repository and commit
ACCELERATORS = ("gpu", "tpu", "none")
WAITING = ("QUEUED", "RUNNING", "NEW_SCRIPT")
OUTPUT_LISTING_LIMIT = 500  # files of a version's output that Kaggle lists, pages included
CUT_LISTING_ADVICE = ("Download the output from the version's page (Output > Download), unpack its car-kit folder "
                      "over this work directory, and pull again; the kit's own versions keep far fewer files.")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


@dataclass
class Kernel:
    """What was pushed: enough to push the next version, ask its status and pull it with no arguments."""

    kernel: str  # OWNER/SLUG
    repo: str
    commit: str
    data: str  # a competition's name, or a dataset's OWNER/SLUG
    accelerator: str = "gpu"
    machine: str | None = None  # Kaggle's machine shape (e.g. NvidiaTeslaT4), overriding the accelerator's default
    time_budget: str = "690"  # minutes (the record keeps what was pushed; new ones from the accelerator's limit)
    profile: str = "colab"
    stage_args: list[str] = field(default_factory=list)
    private: bool = True
    versions: list[int] = field(default_factory=list)
    pulled: int | None = None

    @property
    def slug(self) -> str:
        return self.kernel.split("/", 1)[1]

    @property
    def page(self) -> str:
        return f"https://www.kaggle.com/code/{self.kernel}"


def read_kernel(workdir: Workdir) -> Kernel | None:
    path = workdir.root / RECORD
    if not path.is_file():
        return None
    try:
        return Kernel(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise KitError(f"{path} is not a kernel record the kit wrote ({error}). Delete it and push again.") from None


def write_kernel(workdir: Workdir, kernel: Kernel) -> None:
    write_text(workdir.root / RECORD, json.dumps(asdict(kernel), indent=1) + "\n")


def needs_kernel(kernel: Kernel | None, workdir: Workdir) -> Kernel:
    """The record this command read, or a message that nothing was pushed from here."""
    if kernel is None:
        raise KitError(f"Nothing was pushed from {workdir.root} (no {RECORD}). Start with "
                       f"'{workdir.command('kit.remote', 'push')}', or give the --workdir you pushed from.")
    return kernel


# ---- the kernel's folder ----------------------------------------------------------------------------

def kit_checkout() -> tuple[str, str]:
    """(repository URL, commit) of the kit's own git checkout; empty strings where it is not one."""
    def git(*args: str) -> str:
        try:
            result = subprocess.run(["git", "-C", str(KIT_SOURCE), *args], capture_output=True, text=True, timeout=30)
        except OSError:
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

    return git("remote", "get-url", "origin"), git("rev-parse", "HEAD")


def https_url(repo: str) -> str:
    """git@host:path and ssh://git@host/path as https://host/path: a Kaggle notebook has no SSH key to clone with."""
    match = re.fullmatch(r"(?:ssh://)?git@([^:/]+)[:/](.+)", repo)
    return f"https://{match.group(1)}/{match.group(2)}" if match else repo


def metadata(kernel: Kernel, continuing: bool) -> dict:
    """kernel-metadata.json: the data as a source and, for a continuation, the kernel's own output too."""
    dataset = "/" in kernel.data
    return {
        "id": kernel.kernel, "title": kernel.slug, "code_file": f"{kernel.slug}.ipynb", "language": "python",
        "kernel_type": "notebook", "is_private": kernel.private, "enable_gpu": kernel.accelerator == "gpu",
        "enable_tpu": kernel.accelerator == "tpu", "enable_internet": True,  # pip installs the kit and its packages
        "dataset_sources": [kernel.data] if dataset else [], "competition_sources": [] if dataset else [kernel.data],
        "kernel_sources": [kernel.kernel] if continuing else [], "model_sources": [],
        **({"machine_shape": kernel.machine} if kernel.machine else {}),
    }


def write_folder(kernel: Kernel, folder: Path, continuing: bool) -> Path:
    """The folder `kaggle kernels push` takes: the kit's Kaggle notebook, filled in, and its metadata."""
    cells = kaggle_cells(repo=kernel.repo, commit=kernel.commit, data=kernel.data.rsplit("/", 1)[-1],
                         accelerator=kernel.accelerator, time_budget=kernel.time_budget,
                         stage_args=tuple(kernel.stage_args), profile=kernel.profile, remote=True,
                         machine=kernel.machine)
    shutil.rmtree(folder, ignore_errors=True)
    write_text(folder / f"{kernel.slug}.ipynb",
               notebook(kernel.slug, cells, accelerator={"gpu": "GPU", "tpu": "TPU"}.get(kernel.accelerator, "None")))
    write_text(folder / "kernel-metadata.json", json.dumps(metadata(kernel, continuing), indent=1) + "\n")
    return folder


def secrets(api: KaggleClient, environ: dict[str, str]) -> dict[str, str]:
    """Values that must never leave this machine, by where they came from: the Kaggle key and any *KEY/*TOKEN."""
    found = {name: value for name, value in environ.items() if SECRET_NAME.search(name) and len(value) >= 8}
    for name in ("key", "token"):
        value = getattr(api, "config_values", {}).get(name)
        if isinstance(value, str) and len(value) >= 8:
            found[f"your Kaggle {name}"] = value
    return found


def check_no_secrets(folder: Path, repo: str, known: dict[str, str]) -> None:
    """Refuse to push a folder holding a credential: a kernel's notebook is readable by whoever it is shared with."""
    parts = urlsplit(repo)
    if parts.password or (parts.username and parts.scheme in ("http", "https")):
        raise KitError(f"The repository URL carries credentials ({parts.hostname} with a user name or token in it): "
                       "the pushed notebook would show them. Give the plain URL with --repo (make the repository "
                       "public, or clone a private one with a Kaggle secret in your own cell).")
    for path in sorted(folder.iterdir()):
        text = path.read_text(errors="replace")
        leaked = [name for name, value in known.items() if value in text]
        if leaked:
            raise KitError(f"{path.name} would carry a secret ({', '.join(sorted(leaked))}), so nothing was pushed. "
                           "Remove it from the arguments (--repo, the training arguments) and push again.")


# ---- talking to Kaggle ----------------------------------------------------------------------------

def refused(error: str) -> KitError:
    """SaveKernel's own error (HTTP 200) in one paragraph: what Kaggle asks of the account, or the error."""
    lowered = error.lower()
    if "quota" in lowered:
        return KitError(f"Kaggle refused the notebook: {error}. The weekly accelerator quota is used up: wait for "
                        "it to reset (see https://www.kaggle.com/settings), or push with --accelerator none to run "
                        "on a CPU.")
    if any(word in lowered for word in ("verif", "phone", "internet", "accelerator", "gpu", "tpu")):
        return KitError(f"Kaggle refused the notebook: {error}. Notebooks with a GPU, a TPU or the internet (which "
                        "the kit needs to install itself) need a phone-verified account: verify it at "
                        "https://www.kaggle.com/settings (Phone Verification), then run the same command again.")
    return KitError(f"Kaggle refused the notebook: {error}.")


def push(api: KaggleClient, workdir: Workdir, kernel: Kernel, continuing: bool, environ: dict[str, str]) -> int:
    """Write the folder, check it for secrets, push it; returns the new version's number (also recorded)."""
    folder = write_folder(kernel, workdir.root / "remote" / "kernel", continuing)
    check_no_secrets(folder, kernel.repo, secrets(api, environ))
    with kaggle_errors("Pushing the notebook", kernel=kernel.kernel):
        response = api.kernels_push(str(folder))
    if response.error:
        raise refused(response.error)
    invalid = [*response.invalid_competition_sources, *response.invalid_dataset_sources,
               *response.invalid_kernel_sources]
    if invalid:
        raise KitError(f"Kaggle saved the notebook but could not attach {', '.join(invalid)}: join the competition "
                       "(accept its rules) or check the dataset's name, then push again.")
    named = (response.ref or "").removeprefix("/code/").strip("/")
    if named and named != kernel.kernel:  # Kaggle keeps the kernel under the name it made, not the one asked for
        print(f"note: Kaggle named the kernel {named} (asked: {kernel.kernel}); the kit follows Kaggle's name.")
        kernel.kernel = named
    kernel.versions.append(int(response.version_number or len(kernel.versions) + 1))
    write_kernel(workdir, kernel)
    print(f"Pushed {kernel.kernel} version {kernel.versions[-1]} ({kernel.accelerator}, the kit at "
          f"{kernel.commit[:12]}): {response.url or kernel.page}")
    return kernel.versions[-1]


def version_status(api: KaggleClient, kernel: Kernel) -> tuple[str, str]:
    """(QUEUED | RUNNING | COMPLETE | ERROR | CANCEL_..., Kaggle's failure message) of the latest version."""
    with kaggle_errors("Asking for the notebook's status", kernel=kernel.kernel):
        response = api.kernels_status(kernel.kernel)
    return getattr(response.status, "name", str(response.status)), response.failure_message or ""


def watch(api: KaggleClient, kernel: Kernel, interval_s: float, follow: bool) -> tuple[str, str]:
    """The status, polled every `interval_s` until the version ends when `follow`; one line per change."""
    started, shown = time.monotonic(), None
    while True:
        status, failure = version_status(api, kernel)
        if status != shown:
            minutes = (time.monotonic() - started) / 60
            print(f"{kernel.kernel} version {kernel.versions[-1] if kernel.versions else '?'}: {status.lower()}"
                  + (f" after {minutes:.0f} min of watching" if shown else ""), flush=True)
            shown = status
        if not follow or status not in WAITING:
            return status, failure
        time.sleep(interval_s)


def exit_code(status: str, failure: str, kernel: Kernel, workdir: Workdir) -> int:
    if status in WAITING:
        print(f"Still {status.lower()}: '{workdir.command('kit.remote', 'status', '--watch')}' follows it.")
        return EXIT_STOPPED
    if status == "COMPLETE":
        print(f"Complete: '{workdir.command('kit.remote', 'pull')}' brings the run back.")
        return EXIT_DONE
    print(f"The version ended with {status.lower()}" + (f": {failure}" if failure else "") +
          f". Its log and the checkpoints it saved come back with '{workdir.command('kit.remote', 'pull')}'; "
          f"{kernel.page} shows it too.", file=sys.stderr)
    return EXIT_FAILED


def mirror(output: Path, listed: list[str], workdir: Workdir) -> int:
    """The version's car-kit folder copied over the local work directory, each manifest after its run's files.

    Only what the version listed is copied: a checkpoint an earlier version had and this one pruned is
    dropped from the download folder, not carried back into the run.
    """
    source = output / "car-kit"
    names = {Path(name).resolve() for name in listed}
    for stale in [p for p in output.rglob("*") if p.is_file() and p.resolve() not in names]:
        stale.unlink()
    if not source.is_dir():
        raise KitError(f"The version's output holds no car-kit folder (in {output}): it stopped before the kit "
                       "started. Its log is in that folder.")
    files = sorted((p for p in source.rglob("*") if p.is_file() and not is_compiled(_run_relative(p, source))),
                   key=lambda p: (p.name == "state.json", str(p)))
    for path in files:
        with atomic_path(workdir.root / path.relative_to(source)) as tmp:
            shutil.copyfile(path, tmp)
    return len(files)


def _run_relative(path: Path, source: Path) -> Path:
    """The path inside its run (weights/..., submissions/...), a profile's sub-folder (smoke/) left out."""
    relative = path.relative_to(source)
    subdirs = {profile.subdir for profile in PROFILES.values() if profile.subdir}
    return Path(*relative.parts[1:]) if relative.parts[0] in subdirs else relative


def check_whole(manifest: Manifest, listed: int, root: Path) -> None:
    """Every file the pulled record names arrived: a listing cut short (Kaggle lists at most 500 files of an
    output, and clients before kaggle 2.2.2 read its first page only) would leave a record without its weights."""
    missing = [path for path in manifest.named_files() if not path.is_file()]
    if missing:
        raise KitError(f"The pulled output lacks {len(missing)} of the files its record names (e.g. "
                       f"{missing[0].relative_to(root)}); Kaggle listed {listed} files, and lists at "
                       f"most {OUTPUT_LISTING_LIMIT}. {CUT_LISTING_ADVICE}")


def hardware_line(workdir: Workdir) -> str:
    """What the newest pulled session ran on, from the run's hardware.json ('' before any pull)."""
    try:
        session = json.loads((workdir.root / HARDWARE).read_text())[-1]
    except (OSError, ValueError, IndexError, KeyError):
        return ""
    got = ", ".join(session.get("gpus") or []) or ("a TPU" if session.get("tpu") else "no accelerator")
    return (f"The last session pulled ran on {got}" + (f": {session['mismatch']}." if session.get("mismatch")
                                                         else ", as asked."))


def pull(api: KaggleClient, workdir: Workdir, kernel: Kernel) -> int:
    """Download the latest version's output (the kaggle package skips files older than its copy) and mirror it."""
    status, failure = version_status(api, kernel)
    if status in WAITING:
        return exit_code(status, failure, kernel, workdir)
    local_runs = [p for p in workdir.root.glob("**/weights/state.json") if "remote" not in p.parts]
    if kernel.pulled is None and local_runs:
        raise KitError(f"{workdir.root} holds a run of its own ({local_runs[0].parent}): pulling would overwrite "
                       f"it. Pull into another folder (--workdir), or move that run away first.")
    output = workdir.root / "remote" / "output"
    with kaggle_errors("Downloading the notebook's output", kernel=kernel.kernel):
        files, _ = api.kernels_output(kernel.kernel, str(output), quiet=True)
    with workdir_lock(workdir, "remote pull"):
        copied = mirror(output, files, workdir)
    kernel.pulled = kernel.versions[-1] if kernel.versions else None
    write_kernel(workdir, kernel)
    print(f"Pulled version {kernel.pulled} of {kernel.kernel}: {len(files)} files, {copied} of them the run's, "
          f"into {workdir.root}.")
    if line := hardware_line(workdir):
        print(line)
    profile = kernel.profile
    run = Workdir.resolve(workdir.root, PROFILES[profile])
    if not run.manifest.is_file() and len(files) >= OUTPUT_LISTING_LIMIT:
        raise KitError(f"Kaggle listed {OUTPUT_LISTING_LIMIT} files of the output, its limit, and the run's record "
                       f"({run.manifest.relative_to(workdir.root)}) was not among them. {CUT_LISTING_ADVICE}")
    if not run.manifest.is_file():
        raise KitError(f"The output holds no run of the {profile} profile ({run.manifest} is missing): it stopped "
                       f"before training. Its log: {output / (kernel.slug + '.log')}.")
    stages = PROFILES[profile].stages
    manifest = Manifest.read(run)
    check_whole(manifest, len(files), workdir.root)
    print(status_table(manifest, stages))
    left = [stage.step for stage in stages if manifest.status(stage.step) != "done"]
    if left:
        print(f"{len(left)} stages left: '{workdir.command('kit.remote', 'continue', '--watch')}' resumes them on "
              "Kaggle.")
        return EXIT_STOPPED
    if status != "COMPLETE":
        return exit_code(status, failure, kernel, workdir)
    return EXIT_DONE


# ---- the command ------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """Everything after `--` is the notebook's `kit.stage --all` arguments, which argparse cannot say itself."""

    def parse_args(self, args: Sequence[str] | None = None, namespace=None) -> argparse.Namespace:
        args = list(sys.argv[1:] if args is None else args)
        split = args.index("--") if "--" in args else len(args)
        parsed = super().parse_args(args[:split], namespace)
        parsed.stage_args = args[split + 1:]
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m kit.remote", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir(parser)
    parser.add_argument("action", choices=("push", "status", "pull", "continue"))
    parser.add_argument("--kernel", metavar="OWNER/SLUG", help="the notebook on Kaggle (push; default YOU/car-kit)")
    parser.add_argument("--repo", help="the kit's git URL the notebook installs from (push; default this "
                                       "checkout's origin)")
    parser.add_argument("--commit", help="the kit's commit to run (push; default this checkout's HEAD)")
    parser.add_argument("--dataset", metavar="OWNER/SLUG", help=f"train on this dataset instead of {COMPETITION}")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default="gpu",
                        help="gpu (default), tpu (trains under JAX), none (push)")
    parser.add_argument("--machine", help="Kaggle's machine shape, e.g. NvidiaTeslaT4 (push; default: Kaggle's)")
    parser.add_argument("--time-budget", help="minutes each version trains before it stops with a checkpoint (push; "
                                              "default: the accelerator's session limit less 30, e.g. 690 of a GPU "
                                              "session's 720, 510 of a TPU session's 540)")
    parser.add_argument("--public", action="store_true", help="make the notebook public (push; default private)")
    parser.add_argument("--watch", action="store_true", help="poll the status until the version ends")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    parser.epilog = ("Arguments after -- go to the notebook's 'kit.stage --all' (push), e.g. "
                     "'push -- --backbone keras-efficientnetb6'.")
    return parser


def new_kernel(args: argparse.Namespace, api: KaggleClient) -> Kernel:
    user = username(api)
    name = args.kernel or (f"{user}/car-kit" if user else "")
    slug = name.split("/", 1)[-1]
    if not re.fullmatch(r"[\w-]+/[a-z0-9][a-z0-9-]{4,49}", name or "") or slugify(slug) != slug:
        raise KitError(f"--kernel {name!r} should be OWNER/SLUG: your Kaggle user name and 5-50 lower-case letters, "
                       "digits or single dashes, neither first nor last, as Kaggle names kernels (it would make "
                       f"{slugify(slug)!r} of {slug!r}; e.g. --kernel carfan/car-kit-b6).")
    origin, head = kit_checkout()
    repo, commit = https_url(args.repo or origin), args.commit or head
    if not repo or not commit:
        raise KitError(f"The kit at {KIT_SOURCE} is not a git checkout, so its repository and commit are unknown: "
                       "give --repo URL and --commit SHA (the kit's repository as the notebook should clone it).")
    if repo.startswith(("/", ".", "file:")) or ("://" not in repo and "@" not in repo):
        raise KitError(f"The kit's repository {repo!r} is a local path, which Kaggle cannot clone: give its URL "
                       "with --repo (e.g. https://github.com/YOU/car-kit.git).")
    extra = list(args.stage_args)
    if args.accelerator == "tpu" and "--backbone" not in extra:
        extra = ["--backbone", "keras-efficientnetb6", *extra]  # the TPU trains under JAX: the Keras B6
    return Kernel(kernel=name, repo=repo, commit=commit, data=args.dataset or COMPETITION,
                  accelerator=args.accelerator, machine=args.machine,
                  time_budget=time_budget(args.time_budget, args.accelerator), profile=args.profile,
                  stage_args=extra, private=not args.public)


def time_budget(given: str | None, accelerator: str) -> str:
    """The training budget of each version: the accelerator's default, or the one given, with a warning when it
    would run into the session's limit (Kaggle would end the session before the clean stop)."""
    training, after = kaggle_budgets(accelerator)
    if given is None:
        return f"{training:g}"
    try:
        minutes = float(given)
    except ValueError:
        raise KitError(f"--time-budget {given!r} is not a number of minutes (e.g. {training:g}).") from None
    if minutes > after:
        print(f"warning: --time-budget {given} runs into Kaggle's {KAGGLE_SESSION_MINUTES[accelerator]}-minute limit "
              f"for {accelerator} sessions: the session may be cut off before training stops cleanly, and a "
              f"continued version then finds an ERROR. {training:g} leaves time for the checkpoint and the output.",
              file=sys.stderr)
    return given


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Workdir.resolve(args.workdir)
    kernel = read_kernel(workdir)
    api = kaggle_api()
    if args.action == "push":
        if kernel is not None:
            raise KitError(f"{kernel.kernel} was pushed from here already (version {kernel.versions[-1]}). "
                           f"'{workdir.command('kit.remote', 'continue')}' resumes its run; to start another, push "
                           "from another --workdir or with another --kernel after deleting "
                           f"{workdir.root / RECORD}.")
        kernel = new_kernel(args, api)
        push(api, workdir, kernel, continuing=False, environ=dict(os.environ))
    elif args.action == "continue":
        kernel = needs_kernel(kernel, workdir)
        status, _ = version_status(api, kernel)
        if status in WAITING:
            raise KitError(f"Version {kernel.versions[-1]} of {kernel.kernel} is still {status.lower()}: wait for it "
                           f"('{workdir.command('kit.remote', 'status', '--watch')}'), then continue.")
        push(api, workdir, kernel, continuing=True, environ=dict(os.environ))
    else:
        kernel = needs_kernel(kernel, workdir)
        if args.action == "pull":
            return pull(api, workdir, kernel)
    if args.action != "status" and not args.watch:
        print(f"'{workdir.command('kit.remote', 'status', '--watch')}' follows it.")
        return EXIT_DONE
    status, failure = watch(api, kernel, args.interval, follow=args.watch)
    if args.action == "status" and (line := hardware_line(workdir)):
        print(line)
    return exit_code(status, failure, kernel, workdir)


main = main_guard(main)

if __name__ == "__main__":
    raise SystemExit(main())
