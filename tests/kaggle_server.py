"""A small Kaggle on localhost (a free port) that answers the real kaggle package's calls as Kaggle does.

The kaggle package (2.x) sends RPC-style POSTs to <endpoint>/api/v1/<Service>/<Method>. Its
KaggleApi honours KAGGLE_API_ENVIRONMENT=LOCALHOST (endpoint http://localhost) but passes its own
environment to the SDK, so KAGGLE_API_ENVIRONMENT=TEST (localhost:7777) is not reached through it.
The tests therefore run the kit with LOCALHOST and an HTTP proxy setting that routes
http://localhost to this server's port: the package, its requests session, its redirects,
downloads and uploads all run unchanged.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from slugify import slugify  # the kaggle package's own dependency: titles become slugs as Kaggle makes them

USER, KEY = "carfan", "0123456789abcdef0123456789abcdef"


@dataclass
class Kaggle:
    """What the server knows: archives by competition or OWNER/SLUG, who may see what, what it received."""

    competitions: dict[str, Path] = field(default_factory=dict)
    datasets: dict[str, Path] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)  # rules not accepted / a private dataset: 403
    uploads: dict[str, bytes] = field(default_factory=dict)
    submissions: list[dict] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    # Kernels: every pushed version's SaveKernel request by OWNER/SLUG; the statuses each status call takes in
    # turn (the last one stays); the latest version's output files (name -> bytes) and log.
    kernels: dict[str, list[dict]] = field(default_factory=dict)
    statuses: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    unverified: bool = False  # an account without phone verification: no internet, no accelerators
    listing_limit: int = 500  # files of a kernel's output that ListKernelSessionOutput lists at most
    # Models: CreateModel requests by OWNER/SLUG; each variation's CreateModelInstance request and its versions'
    # files (name -> the uploaded bytes) by OWNER/SLUG/FRAMEWORK/VARIATION.
    models: dict[str, dict] = field(default_factory=dict)
    instances: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict[str, bytes]]] = field(default_factory=dict)
    blobs: dict[str, str] = field(default_factory=dict)  # upload token -> file name
    port: int = 0  # where serve() listens: a free port, so test processes running side by side never collide

    def environment(self, config_dir: Path) -> dict[str, str]:
        """What a kit process needs to reach this server with the real package and these credentials."""
        proxy = f"http://127.0.0.1:{self.port}"
        return {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "KAGGLE_USERNAME": USER, "KAGGLE_KEY": KEY,
                "KAGGLE_CONFIG_DIR": str(config_dir), "KAGGLE_API_TOKEN": "", "http_proxy": proxy,
                "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}


def serve(kaggle: Kaggle) -> ThreadingHTTPServer:
    """Start the server in a thread; call .shutdown() and .server_close() when done."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet in test output
            pass

        def _path(self) -> str:
            return urlsplit(self.path).path  # a proxied request carries the absolute URL

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"code": status, "message": message})

        def _authorised(self) -> bool:
            expected = "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self._error(401, "Unauthenticated")
                return False
            return True

        def _redirect_to(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            path = self._path()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            kaggle.calls.append(path.rsplit("/", 1)[-1])
            if not self._authorised():
                return
            if path.endswith("CompetitionApiService/DownloadDataFiles"):
                self._download(body["competitionName"], kaggle.competitions, "competitions")
            elif path.endswith("DatasetApiService/DownloadDataset"):
                self._download(f"{body['ownerSlug']}/{body['datasetSlug']}", kaggle.datasets, "datasets")
            elif path.endswith("CompetitionApiService/StartSubmissionUpload"):
                name = body.get("competitionName")
                if name not in kaggle.competitions:
                    return self._error(404, f"Competition {name} not found")
                if name in kaggle.forbidden:
                    return self._error(403, "You must accept this competition's rules before you can submit")
                token = f"token{len(kaggle.uploads)}"
                self._json(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})
            elif path.endswith("KernelsApiService/SaveKernel"):
                self._save_kernel(body)
            elif path.endswith("KernelsApiService/GetKernelSessionStatus"):
                kernel = f"{body['userName']}/{body['kernelSlug']}"
                if kernel not in kaggle.kernels:
                    return self._error(404, f"Kernel {kernel} not found")
                statuses = kaggle.statuses.setdefault(kernel, ["COMPLETE"])
                status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
                failure = "Your notebook tried to allocate more memory than is available." if status == "ERROR" else ""
                self._json(200, {"status": status, **({"failureMessage": failure} if failure else {})})
            elif path.endswith("KernelsApiService/ListKernelSessionOutput"):
                kernel = f"{body['userName']}/{body['kernelSlug']}"
                if kernel not in kaggle.kernels:
                    return self._error(404, f"Kernel {kernel} not found")
                # As Kaggle lists an output: in pages (20 files unless asked), and never more than 500 files in all.
                names = sorted(kaggle.outputs.get(kernel, {}))[:kaggle.listing_limit]
                start, size = int(body.get("pageToken") or 0), int(body.get("pageSize") or 20)
                files = [{"fileName": name, "url": f"http://localhost/files/kernels/{kernel.replace('/', '__')}/{name}"}
                         for name in names[start:start + size]]
                following = str(start + size) if start + size < len(names) else ""
                self._json(200, {"files": files, "log": kaggle.logs.get(kernel, ""), "nextPageToken": following})
            elif path.endswith("BlobApiService/StartBlobUpload"):
                token = f"blob{len(kaggle.blobs)}"
                kaggle.blobs[token] = body["name"]
                self._json(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})
            elif path.rsplit("/", 1)[-1] in ("GetModel", "CreateModel", "GetModelInstance", "CreateModelInstance",
                                             "CreateModelInstanceVersion"):
                self._model(path.rsplit("/", 1)[-1], body)
            elif path.endswith("CompetitionApiService/CreateSubmission"):
                kaggle.submissions.append(body)
                self._json(200, {"message": "Successfully submitted to the competition", "ref": len(kaggle.submissions)})
            else:
                self._error(404, f"Not found: {path}")

        def _save_kernel(self, body: dict) -> None:
            """Kaggle answers a refused push with HTTP 200 and an error, as SaveKernel does."""
            kernel = body.get("slug", "")
            if kernel.split("/")[0] != USER:
                return self._error(403, "You do not have permission to edit this kernel")
            if kernel not in kaggle.kernels and body.get("newTitle"):  # a new kernel is named by its title's slug
                kernel = f"{USER}/{slugify(body['newTitle'])}"
            wants = [what for what in ("enableInternet", "enableGpu", "enableTpu") if body.get(what)]
            if kaggle.unverified and wants:
                return self._json(200, {"error": "Phone verification is required to use internet and accelerators "
                                                 "(" + ", ".join(wants) + ")"})
            unknown = [c for c in body.get("competitionDataSources", []) if c not in kaggle.competitions]
            versions = kaggle.kernels.setdefault(kernel, [])
            versions.append(body)
            kaggle.statuses[kernel] = ["QUEUED", "RUNNING", "COMPLETE"]
            self._json(200, {"ref": f"/code/{kernel}", "url": f"https://www.kaggle.com/code/{kernel}",
                             "versionNumber": len(versions), "invalidCompetitionSources": unknown})

        def _model(self, method: str, body: dict) -> None:
            model = f"{body['ownerSlug']}/{body.get('modelSlug') or body.get('slug')}"
            if body["ownerSlug"] != USER:
                return self._error(403, "You do not have permission to modify this model")
            framework = (body.get("framework") or body.get("body", {}).get("framework") or "").lower()
            variation = body.get("instanceSlug") or body.get("body", {}).get("instanceSlug")
            instance = f"{model}/{framework.replace('model_framework_', '').replace('_', '')}/{variation}"
            sent = body.get("body", {}).get("files", [])
            files = {kaggle.blobs[f["token"]]: kaggle.uploads[f["token"]] for f in sent}
            if method == "GetModel":
                return self._json(200, {"ref": model}) if model in kaggle.models else self._error(404, "Not found")
            if method == "GetModelInstance":
                return (self._json(200, {"slug": variation}) if instance in kaggle.instances
                        else self._error(404, "Not found"))
            if method == "CreateModel":
                kaggle.models[model] = body
            elif method == "CreateModelInstance":
                if model not in kaggle.models:
                    return self._json(200, {"error": f"Model {model} does not exist"})
                kaggle.instances[instance] = body
                kaggle.versions[instance] = [files]
            else:
                kaggle.versions[instance].append(files)
            self._json(200, {"ref": instance, "url": f"https://www.kaggle.com/models/{instance}"})

        def _download(self, name: str, known: dict[str, Path], kind: str) -> None:
            if name not in known:
                return self._error(404, f"{kind[:-1].capitalize()} {name} not found")
            if name in kaggle.forbidden:
                return self._error(403, "Permission denied")
            self._redirect_to(f"http://localhost/files/{kind}/{name.replace('/', '__')}.zip")

        def do_GET(self) -> None:
            path = self._path()
            for kernel, files in kaggle.outputs.items():
                prefix = f"/files/kernels/{kernel.replace('/', '__')}/"
                if path.startswith(prefix) and path[len(prefix):] in files:
                    return self._file(files[path[len(prefix):]], "application/octet-stream")
            for kind, known in (("competitions", kaggle.competitions), ("datasets", kaggle.datasets)):
                for name, archive in known.items():
                    if path == f"/files/{kind}/{name.replace('/', '__')}.zip":
                        return self._file(archive.read_bytes(), "application/zip", archive.stat().st_mtime)
            self._error(404, "No such file")

        def _file(self, data: bytes, kind: str, modified: float | None = None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Last-Modified", formatdate(modified or time.time(), usegmt=True))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            token = self._path().rsplit("/", 1)[-1]
            kaggle.uploads[token] = self._body()
            self._json(200, {})

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    kaggle.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
