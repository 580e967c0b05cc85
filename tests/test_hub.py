"""The Hugging Face Hub, for real: adapters downloaded from and pushed to a Hub server on 127.0.0.1.

``FakeHub`` implements the requests huggingface_hub makes, as read in its source (``file_download.py``,
``hf_api.py``, ``_commit_api.py``, ``utils/_http.py``):

- Downloading (``hf_hub_download``): ``HEAD`` then ``GET`` on ``/{repo_id}/resolve/{revision}/{path}``. An
  answer carries ``X-Repo-Commit`` (the commit the revision resolves to), ``ETag`` (the git blob sha1) and
  ``Content-Length``. Weights are answered as the Hub answers LFS files: a 302 to another origin (our
  "CDN", a second port) with ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; huggingface_hub then
  downloads from the CDN without the ``Authorization`` header. Errors carry ``X-Error-Code``
  (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), which huggingface_hub maps to its exceptions.
  Loading makes no ``/api/...`` call (checked below).
- Pushing (``HfApi.create_repo``, ``create_branch``, ``upload_folder``): ``POST /api/repos/create``,
  ``/api/models/{repo_id}/branch/{branch}``, ``/api/validate-yaml`` (the README's metadata),
  ``/api/models/{repo_id}/preupload/{revision}`` and ``/api/models/{repo_id}/commit/{revision}`` (NDJSON: a
  header line with the message, then one line per file). Preupload answers "regular" for every file, so
  contents arrive base64-encoded in the commit instead of through LFS or Xet storage, which this server
  does not implement.

Pointing the library at the server: huggingface_hub reads ``HF_ENDPOINT`` once, at import, into
``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, and ``hf_hub_url`` and ``HfApi()`` read
those attributes at call time. The in-process tests patch the two attributes (and ``HF_HUB_OFFLINE``, which
tests/conftest.py turns on for the rest of the suite): the code under test is the real path, from
``PeftModel.from_pretrained`` through ``hf_hub_download`` and httpx to a socket, and outputs compare with
models in the same process. The documentation's example runs in a fresh interpreter with ``HF_ENDPOINT``
set, as a user would point the library at a mirror, so that the environment variable itself is tested too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
import yaml
from peft_core import AdapterLoadError, PeftError, PeftModel, get_peft_model, stack
from peft_core.hub import model_card
from peft_core.testing import tiny_model
from peft_ia3 import IA3Config
from peft_lora import LoraConfig

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_peft_core_test_token"
USER = "peft-core-tester"  # the namespace the token belongs to
LFS_SUFFIXES = (".safetensors", ".bin")  # answered like LFS files: redirected to the CDN


# --- the server ------------------------------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Seen:
    """One request the server answered."""

    origin: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    status: int = 0


@dataclass
class Commit:
    oid: str
    ref: str
    message: str
    files: dict[str, bytes]  # the whole tree at this commit
    added: dict[str, bytes] = field(default_factory=dict)  # what the commit itself brought


@dataclass
class Repo:
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch, tag or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: list[str] = field(default_factory=list)  # their titles; PR n is refs/pr/n

    def resolve(self, revision: str) -> Commit | None:
        return self.commits.get(self.refs.get(revision, revision))


class FakeHub:
    """A Hub with repos in memory, served over HTTP by two threads (the Hub and its CDN) until ``stop``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.seen: list[Seen] = []
        self.created: list[dict[str, Any]] = []  # the payloads of create-repo calls
        self.pushed: list[Commit] = []  # commits that arrived through the API
        self.validated: list[str] = []  # README texts sent to validate-yaml
        self._blobs: dict[str, bytes] = {}  # sha256 -> content, for the CDN
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.cdn_url = ""

    # serving

    def start(self) -> None:
        for origin in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.hub, server.origin = self, origin  # type: ignore[attr-defined]
            # A short poll interval: stop() waits for the serving loop to notice, once per server and test.
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, name=f"fake-{origin}",
                             daemon=True).start()
            self._servers.append(server)
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    # content

    def commit(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main", message: str = "seed",
               private: bool | None = None) -> str:
        """Commit ``files`` on top of ``revision`` (a new branch starts empty); return the commit oid."""
        repo = self.repos.setdefault(repo_id, Repo())
        if private is not None:
            repo.private = private
        parent = repo.resolve(revision)
        tree = {**(parent.files if parent else {}), **files}
        digest = hashlib.sha1(f"{repo_id}\n{revision}\n{len(repo.commits)}\n{message}".encode())
        for path in sorted(tree):
            digest.update(path.encode() + hashlib.sha256(tree[path]).digest())
        commit = Commit(digest.hexdigest(), revision, message, tree, dict(files))
        repo.commits[commit.oid] = commit
        repo.refs[revision] = commit.oid
        return commit.oid

    def add_folder(self, repo_id: str, folder: Path, *, prefix: str = "", **options: Any) -> str:
        files = {"/".join(filter(None, [prefix, p.relative_to(folder).as_posix()])): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.commit(repo_id, files, **options)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return commit.files

    def requests(self, origin: str = "hub") -> list[Seen]:
        return [s for s in self.seen if s.origin == origin]

    # answering

    def answer(self, origin: str, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple:
        split = urlsplit(raw_path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]  # split first: a quoted revision holds "/"
        seen = Seen(origin, method, unquote(split.path), parse_qs(split.query), headers)
        with self._lock:
            self.seen.append(seen)
            if origin == "cdn":
                status, out_headers, content = self._cdn(segments)
            elif segments[:1] == ["api"]:
                status, out_headers, content = self._api(method, segments[1:], seen.query, headers, body)
            elif len(segments) >= 5 and segments[2] == "resolve" and method in ("HEAD", "GET"):
                status, out_headers, content = self._resolve(f"{segments[0]}/{segments[1]}", segments[3],
                                                             "/".join(segments[4:]), headers)
            else:
                status, out_headers, content = _error(404, None, f"the fake Hub has no route {method} {split.path}")
            seen.status = status
        return status, out_headers, content

    def _access(self, repo_id: str, headers: dict[str, str], write: bool = False) -> tuple | None:
        """The error answer when the request may not read (or write) ``repo_id``, else None."""
        authorization = headers.get("authorization")
        if authorization is not None and authorization != f"Bearer {TOKEN}":
            return _error(401, None, "Invalid credentials in Authorization header")
        repo = self.repos.get(repo_id)
        if (write or (repo is not None and repo.private)) and authorization is None:
            # The Hub hides private repos from anonymous requests: they look missing, with a 401.
            return _error(401, "RepoNotFound", "Invalid username or password.")
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        return None

    def _resolve(self, repo_id: str, revision: str, path: str, headers: dict[str, str]) -> tuple:
        refused = self._access(repo_id, headers)
        if refused:
            return refused
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if path not in commit.files:
            status, out, content = _error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"")
            return status, {**out, "X-Repo-Commit": commit.oid}, content
        data = commit.files[path]
        if path.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            self._blobs[sha256] = data
            return 302, {"Location": f"{self.cdn_url}/lfs/{sha256}", "X-Repo-Commit": commit.oid,
                         "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)),
                         "ETag": f'"{git_blob_sha1(sha256.encode())}"'}, b""
        return 200, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha1(data)}"'}, data

    def _cdn(self, segments: list[str]) -> tuple:
        data = self._blobs.get(segments[-1]) if segments[:1] == ["lfs"] else None
        if data is None:
            return 403, {}, b"AccessDenied"
        return 200, {"ETag": f'"{segments[-1]}"', "Content-Type": "application/octet-stream"}, data

    def _api(self, method: str, route: list[str], query: dict, headers: dict[str, str], body: bytes) -> tuple:
        if (method, route) == ("POST", ["repos", "create"]):
            return self._create_repo(json.loads(body), headers)
        if (method, route) == ("POST", ["validate-yaml"]):
            return self._validate_yaml(json.loads(body)["content"])
        if len(route) >= 4 and route[0] == "models":
            repo_id, action, rest = f"{route[1]}/{route[2]}", route[3], "/".join(route[4:])
            refused = self._access(repo_id, headers, write=method == "POST")
            if refused:
                return refused
            if (method, action) == ("POST", "preupload") and rest:
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                         for f in json.loads(body)["files"]]
                return _json(200, {"files": files})
            if (method, action) == ("POST", "branch") and rest:
                return self._create_branch(repo_id, rest, json.loads(body or b"{}"))
            if (method, action) == ("POST", "commit") and rest:
                return self._commit(repo_id, rest, query.get("create_pr") == ["1"], body)
            # With hf_xet installed, upload_folder opens a pull request first, then commits to its ref.
            if (method, action) == ("POST", "discussions") and not rest:
                return self._open_pull_request(repo_id, json.loads(body))
            if (method, action) == ("GET", "discussions") and rest.isdigit():
                return self._pull_request(repo_id, int(rest))
        return _error(404, None, f"the fake Hub has no route {method} /api/{'/'.join(route)}")

    def _create_repo(self, payload: dict[str, Any], headers: dict[str, str]) -> tuple:
        self.created.append(payload)
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return _error(401, None, "You must be authenticated to create a repo")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                    message="initial commit", private=private)
        return _json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, content: str) -> tuple:
        self.validated.append(content)
        match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            metadata = f"{exc}"
        if not isinstance(metadata, dict):
            return _json(400, {"errors": [{"message": f"no YAML mapping in the front matter: {metadata!r}"}]})
        return _json(200, {"errors": [], "warnings": []})

    def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> tuple:
        repo = self.repos[repo_id]
        if branch in repo.refs:
            return _error(409, None, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            return _error(404, "RevisionNotFound", "Invalid starting point")
        repo.refs[branch] = start.oid
        return _json(200, {})

    def _commit(self, repo_id: str, revision: str, create_pr: bool, body: bytes) -> tuple:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        unsupported = [line["key"] for line in lines if line["key"] not in ("header", "file")]
        if unsupported:
            return _error(400, None, f"the fake Hub commits only regular files, not {unsupported}")
        files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                 for line in lines if line["key"] == "file"}
        repo = self.repos[repo_id]
        if repo.resolve(revision) is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        ref = revision
        if create_pr:  # the older protocol: the commit itself opens the pull request
            ref = self._new_pull_request(repo_id, header["summary"])
        oid = self.commit(repo_id, files, revision=ref, message=header["summary"])
        self.pushed.append(repo.commits[oid])
        pr_url = f"{self.url}/{repo_id}/discussions/{ref.rsplit('/', 1)[-1]}" if create_pr else None
        return _json(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                           "pullRequestUrl": pr_url})

    def _new_pull_request(self, repo_id: str, title: str) -> str:
        repo = self.repos[repo_id]
        repo.pull_requests.append(title)
        ref = f"refs/pr/{len(repo.pull_requests)}"
        repo.refs[ref] = repo.refs["main"]  # pull requests are opened against the default branch
        return ref

    def _open_pull_request(self, repo_id: str, payload: dict[str, Any]) -> tuple:
        if not payload.get("pullRequest"):
            return _error(400, None, "the fake Hub opens pull requests, not discussions")
        number = self._new_pull_request(repo_id, payload["title"]).rsplit("/", 1)[-1]
        return _json(200, {"num": int(number), "url": f"{self.url}/{repo_id}/discussions/{number}"})

    def _pull_request(self, repo_id: str, number: int) -> tuple:
        titles = self.repos[repo_id].pull_requests
        if not 0 < number <= len(titles):
            return _error(404, None, "Discussion not found")
        return _json(200, {
            "num": number, "title": titles[number - 1], "author": {"name": USER},
            "createdAt": "2025-01-01T00:00:00.000Z", "status": "draft", "isPullRequest": True,
            "repo": {"name": repo_id, "type": "model"}, "events": [], "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [], "diff": "",
        })


def _json(status: int, payload: Any) -> tuple:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _error(status: int, code: str | None, message: str) -> tuple:
    headers = {"Content-Type": "application/json", "X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return status, headers, json.dumps({"error": message}).encode()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: every connection closes after its answer, so no pooled keep-alive connection outlives
    # stop() and quietly keeps serving the "offline" tests.
    protocol_version = "HTTP/1.0"

    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, out_headers, content = self.server.hub.answer(  # type: ignore[attr-defined]
            self.server.origin, self.command, self.path, headers, body  # type: ignore[attr-defined]
        )
        self.send_response(status)
        for name, value in out_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))  # a HEAD gets the length of what GET sends
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the requests are kept in FakeHub.seen; an access log would only clutter pytest's output


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running FakeHub that huggingface_hub, in this process, talks to (see the module docstring)."""
    import huggingface_hub
    from huggingface_hub import constants

    server = FakeHub()
    server.start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Nothing of the machine's Hub set-up leaks in: its cache, a stored login, a token in the environment.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    huggingface_hub.close_session()  # its shared httpx client is rebuilt, reading NO_PROXY
    yield server
    server.stop()
    huggingface_hub.close_session()


# --- helpers ---------------------------------------------------------------------------------------


def lora(**settings: Any) -> LoraConfig:
    # init_lora_weights=False: B starts random, so an adapter changes the outputs from the first step.
    return LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False,
                         "task_type": "CAUSAL_LM", **settings})


def ia3() -> IA3Config:
    return IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                     init_ia3_weights=False, task_type="CAUSAL_LM")


def adapted(llama_dir: Path, config: Any, seed: int) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(tiny_model("llama", llama_dir), config).eval()


def saved(model: PeftModel, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def has_adapter_layers(model: torch.nn.Module) -> bool:
    return any("lora_" in name or "ia3_" in name for name, _ in model.named_parameters())


# --- loading ---------------------------------------------------------------------------------------


def test_an_adapter_from_the_hub_gives_the_local_adapters_outputs(hub, llama_dir, input_ids, tmp_path):
    model = adapted(llama_dir, lora(), seed=1)
    oid = hub.add_folder("peft-core-tests/tiny-lora", saved(model, tmp_path / "adapter"))
    local = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "adapter")
    downloaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), "peft-core-tests/tiny-lora")
    torch.testing.assert_close(logits(downloaded, input_ids), logits(local, input_ids))
    torch.testing.assert_close(logits(downloaded, input_ids), logits(model, input_ids))
    base = logits(tiny_model("llama", llama_dir), input_ids)
    assert (logits(downloaded, input_ids) - base).abs().max() > 1e-3, "the adapter changes nothing: a vacuous test"
    # Downloaded into huggingface_hub's cache layout, at the commit the server named.
    snapshot = Path(hub_cache(), "models--peft-core-tests--tiny-lora", "snapshots", oid)
    weights = "adapter_model.safetensors"
    assert (snapshot / weights).read_bytes() == (tmp_path / "adapter" / weights).read_bytes()


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def test_loading_makes_only_download_requests(hub, llama_dir, tmp_path):
    hub.add_folder("peft-core-tests/tiny-lora", saved(adapted(llama_dir, lora(), seed=1), tmp_path / "adapter"))
    PeftModel.from_pretrained(tiny_model("llama", llama_dir), "peft-core-tests/tiny-lora")
    requests = hub.requests()
    assert not [s.path for s in requests if s.path.startswith("/api/")], "loading called the Hub API"
    assert {s.method for s in requests} == {"HEAD", "GET"}
    by_file = {(s.method, s.path.rsplit("/", 1)[-1], s.status) for s in requests}
    assert ("HEAD", "peft_stack.json", 404) in by_file  # looked for, absent: a single adapter
    assert {("HEAD", "adapter_config.json", 200), ("GET", "adapter_config.json", 200)} <= by_file
    assert ("HEAD", "adapter_model.safetensors", 302) in by_file  # an LFS file: redirected ...
    assert [(s.method, s.status) for s in hub.requests("cdn")] == [("GET", 200)]  # ... and fetched there
    assert all(s.path.startswith("/peft-core-tests/tiny-lora/resolve/main/") for s in requests)


def test_revision_selects_a_branch_or_a_commit(hub, llama_dir, input_ids, tmp_path):
    first, second = adapted(llama_dir, lora(), seed=1), adapted(llama_dir, lora(), seed=2)
    repo = "peft-core-tests/versions"
    old = hub.add_folder(repo, saved(first, tmp_path / "first"))
    hub.repos[repo].refs["v1"] = old  # a branch left at the first commit
    hub.add_folder(repo, saved(second, tmp_path / "second"))  # main moves on
    expected_first, expected_second = logits(first, input_ids), logits(second, input_ids)
    assert (expected_first - expected_second).abs().max() > 1e-3

    for revision, expected in [(None, expected_second), ("main", expected_second), ("v1", expected_first),
                               (old, expected_first)]:
        loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, revision=revision)
        torch.testing.assert_close(logits(loaded, input_ids), expected, msg=f"revision={revision}")
    assert any(s.path.startswith(f"/{repo}/resolve/v1/") for s in hub.requests())

    loaded.load_adapter(repo, "latest", revision="main")  # load_adapter takes the same options
    loaded.set_adapter("latest")
    torch.testing.assert_close(logits(loaded, input_ids), expected_second)

    with pytest.raises(AdapterLoadError, match="RevisionNotFound"):
        PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, revision="no-such-branch")


def test_subfolder_reaches_an_adapter_inside_the_repo(hub, llama_dir, input_ids, tmp_path):
    model = adapted(llama_dir, lora(), seed=3)
    hub.add_folder("peft-core-tests/many", saved(model, tmp_path / "adapter"), prefix="adapters/chat")
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), "peft-core-tests/many",
                                       subfolder="adapters/chat")
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))
    assert any(s.path == "/peft-core-tests/many/resolve/main/adapters/chat/adapter_config.json"
               for s in hub.requests())
    base = tiny_model("llama", llama_dir)
    with pytest.raises(AdapterLoadError, match=r"^The Hub repo peft-core-tests/many has no adapter_config\.json\.$"):
        PeftModel.from_pretrained(base, "peft-core-tests/many")  # nothing at the top
    assert not has_adapter_layers(base)


def test_a_private_repo_needs_the_token_which_travels_as_a_bearer_header(hub, llama_dir, input_ids, tmp_path,
                                                                         monkeypatch):
    model = adapted(llama_dir, lora(), seed=4)
    repo = "peft-core-tests/private"
    hub.add_folder(repo, saved(model, tmp_path / "adapter"), private=True)

    base = tiny_model("llama", llama_dir)
    for token in (None, "hf_wrong_token"):
        with pytest.raises(AdapterLoadError) as refused:
            PeftModel.from_pretrained(base, repo, token=token)
        message = str(refused.value)
        assert message.startswith(f"Could not get adapter_config.json of {repo!r}: it is no local directory")
        assert "pass token= for a private repo" in message and "401" in message
    assert not has_adapter_layers(base), "a refused load left adapter layers in the base model"
    assert hub.seen and all(s.status == 401 for s in hub.seen)

    hub.seen.clear()
    loaded = PeftModel.from_pretrained(base, repo, token=TOKEN)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))
    assert hub.requests() and all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in hub.requests())
    # The Hub's redirect for weights leaves its origin: huggingface_hub must not send the token along.
    assert hub.requests("cdn") and all("authorization" not in s.headers for s in hub.requests("cdn"))

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token of the environment (or of `hf auth login`) when none is given
    again = PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, cache_dir=str(tmp_path / "other-cache"))
    torch.testing.assert_close(logits(again, input_ids), logits(model, input_ids))


def test_a_cached_adapter_loads_with_the_server_gone(hub, llama_dir, input_ids, tmp_path, monkeypatch):
    from huggingface_hub import constants

    model = adapted(llama_dir, lora(), seed=5)
    repo, cache = "peft-core-tests/cached", str(tmp_path / "cache")
    hub.add_folder(repo, saved(model, tmp_path / "adapter"))
    PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, cache_dir=cache)
    assert (Path(cache) / "models--peft-core-tests--cached" / "refs" / "main").is_file()
    hub.stop()

    expected = logits(model, input_ids)
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, cache_dir=cache, local_files_only=True)
    torch.testing.assert_close(logits(loaded, input_ids), expected)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, cache_dir=cache)
    torch.testing.assert_close(logits(loaded, input_ids), expected)

    with pytest.raises(AdapterLoadError, match=rf"Could not get adapter_config.json of {repo!r}.*HF_HUB_OFFLINE"):
        PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, cache_dir=str(tmp_path / "empty"))


def test_a_missing_repo_or_file_is_a_clear_error(hub, llama_dir, tmp_path):
    base = tiny_model("llama", llama_dir)
    with pytest.raises(AdapterLoadError) as missing:
        PeftModel.from_pretrained(base, "peft-core-tests/no-such-repo")
    message = str(missing.value)
    assert message.startswith("Could not get adapter_config.json of 'peft-core-tests/no-such-repo': it is no "
                              "local directory, and the Hugging Face Hub gave no copy (RepositoryNotFoundError")
    assert "Check the path or repo id" in message

    adapter = saved(adapted(llama_dir, lora(), seed=6), tmp_path / "adapter")
    hub.commit("peft-core-tests/config-only", {"adapter_config.json": (adapter / "adapter_config.json").read_bytes()})
    with pytest.raises(AdapterLoadError, match=r"^peft-core-tests/config-only has neither adapter_model\.safetensors "
                                               r"nor adapter_model\.bin\.$"):
        PeftModel.from_pretrained(base, "peft-core-tests/config-only")
    assert not has_adapter_layers(base), "a failed load left adapter layers in the base model"


def test_a_saved_stack_loads_from_the_hub(hub, llama_dir, input_ids, tmp_path):
    model = adapted(llama_dir, stack([lora(), ia3()]), seed=7)
    folder = saved(model, tmp_path / "stack")
    hub.add_folder("peft-core-tests/stack", folder)
    hub.add_folder("peft-core-tests/stacks", folder, prefix="stacks/v1")
    expected = logits(model, input_ids)
    for repo, subfolder in [("peft-core-tests/stack", None), ("peft-core-tests/stacks", "stacks/v1")]:
        loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, subfolder=subfolder)
        assert loaded.active_adapters == ["lora", "ia3"]
        torch.testing.assert_close(logits(loaded, input_ids), expected)
    fetched = {s.path for s in hub.requests() if s.method == "GET"}
    assert {"/peft-core-tests/stacks/resolve/main/stacks/v1/peft_stack.json",
            "/peft-core-tests/stacks/resolve/main/stacks/v1/ia3/adapter_config.json"} <= fetched


# --- peft inspect ----------------------------------------------------------------------------------


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on: connecting is refused at once, as without a network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peft_command(*argv: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The installed ``peft`` command in a fresh interpreter, which reads ``HF_*`` from its environment as a
    user's shell would set it; and how long it took."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                **env}
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        full_env.pop(variable, None)
    start = time.monotonic()
    done = subprocess.run([Path(sys.executable).with_name("peft"), *argv], capture_output=True, text=True,
                          env=full_env, timeout=120)
    return done, time.monotonic() - start


def test_peft_inspect_reads_a_repo_with_token_revision_and_subfolder(hub, llama_dir, tmp_path, capsys):
    from peft_core.cli import main

    repo = "peft-core-tests/inspected"
    first = hub.add_folder(repo, saved(adapted(llama_dir, lora(r=4), seed=1), tmp_path / "first"),
                           prefix="adapters/chat", private=True)
    hub.add_folder(repo, saved(adapted(llama_dir, lora(r=2), seed=2), tmp_path / "second"), prefix="adapters/chat")
    argv = ["inspect", repo, "--subfolder", "adapters/chat", "--json"]
    capsys.readouterr()  # the models' progress bars

    assert main(argv) == 1  # private: refused without the token, in one line that says what to do
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "401" in err and "token" in err

    hub.seen.clear()
    assert main([*argv, "--token", TOKEN]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == f"{repo}/adapters/chat" and info["r"] == 2
    assert info["parameters"] == sum(t.numel() for t in read_safetensors(tmp_path / "second").values())
    asked = [s for s in hub.requests() if s.path.startswith(f"/{repo}/")]
    assert asked and all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in asked)

    assert main([*argv, "--token", TOKEN, "--revision", first]) == 0
    assert json.loads(capsys.readouterr().out)["r"] == 4


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def test_peft_inspect_without_a_network_fails_in_seconds_or_reads_the_cache(hub, llama_dir, tmp_path, capsys):
    from peft_core.cli import main

    repo = "peft-core-tests/offline"
    hub.add_folder(repo, saved(adapted(llama_dir, lora(), seed=3), tmp_path / "adapter"))
    assert main(["inspect", repo, "--json"]) == 0  # online once: the files are now in the cache
    online = json.loads(capsys.readouterr().out)
    cache, empty = hub_cache(), str(tmp_path / "empty-cache")
    nowhere = f"http://127.0.0.1:{closed_port()}"

    # huggingface_hub alone retries for about 23 s per file; peft inspect asks once and stops.
    done, seconds = peft_command("inspect", repo, HF_ENDPOINT=nowhere, HF_HUB_CACHE=empty)
    assert done.returncode == 1 and seconds < 20, (seconds, done.stderr)
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"peft inspect: error: {repo} is not in the local Hugging Face cache, and the "
                                  f"Hugging Face Hub at {nowhere} does not answer (")
    assert "Check your network (or HF_ENDPOINT)" in done.stderr

    done, seconds = peft_command("inspect", repo, "--json", HF_ENDPOINT=nowhere, HF_HUB_CACHE=cache)
    assert done.returncode == 0 and seconds < 20, (seconds, done.stderr)
    assert json.loads(done.stdout) == online  # what was downloaded before is described as usual

    # HF_HUB_OFFLINE: the Hub (up, and holding the repo) is not asked at all.
    hub.seen.clear()
    done, _ = peft_command("inspect", repo, HF_ENDPOINT=hub.url, HF_HUB_CACHE=empty, HF_HUB_OFFLINE="1")
    assert done.returncode == 1 and "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set. Unset " \
        "HF_HUB_OFFLINE to download it" in done.stderr
    done, _ = peft_command("inspect", repo, "--json", HF_ENDPOINT=hub.url, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1")
    assert done.returncode == 0 and json.loads(done.stdout) == online
    assert hub.seen == []


# --- pushing ---------------------------------------------------------------------------------------


def front_matter(card: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, f"no YAML front matter in:\n{card}"
    return yaml.safe_load(match.group(1))


def test_push_to_hub_uploads_the_adapter_and_a_model_card(hub, llama_dir, input_ids, tmp_path):
    from safetensors.torch import load, load_file

    model = adapted(llama_dir, lora(base_model_name_or_path="peft-core-tests/tiny-llama"), seed=8)
    repo = f"{USER}/my-lora"
    info = model.push_to_hub(repo, private=True, token=TOKEN, commit_message="Add my LoRA")

    assert hub.repos[repo].private
    [commit] = hub.pushed
    assert (commit.ref, commit.message, info.oid) == ("main", "Add my LoRA", commit.oid)
    assert info.commit_url == f"{hub.url}/{repo}/commit/{commit.oid}"
    assert set(commit.added) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    local = saved(model, tmp_path / "local")
    assert commit.added["adapter_config.json"] == (local / "adapter_config.json").read_bytes()
    uploaded, expected = load(commit.added["adapter_model.safetensors"]), load_file(local / "adapter_model.safetensors")
    assert uploaded.keys() == expected.keys() and uploaded
    for key, tensor in expected.items():
        torch.testing.assert_close(uploaded[key], tensor)
    assert all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in hub.requests())

    card = commit.added["README.md"].decode()
    assert hub.validated and hub.validated[-1] == card  # the Hub checked the card's metadata before the commit
    assert front_matter(card) == {"base_model": "peft-core-tests/tiny-llama", "library_name": "peft-core",
                                  "tags": ["peft-core", "lora", "base_model:adapter:peft-core-tests/tiny-llama"]}
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable > 0 and f"Trainable parameters when pushed: {trainable:,d} of {total:,d}" in card
    assert model.peft_config["default"].to_json_string(inference_mode=True).rstrip() in card
    assert "[peft-core-tests/tiny-llama](https://huggingface.co/peft-core-tests/tiny-llama)" in card
    assert f"model = PeftModel.from_pretrained(base, {repo!r})" in card  # ours, and Hugging Face PEFT's:
    assert "from peft_core import PeftModel" in card and "from peft import PeftModel" in card
    assert 'AutoModelForCausalLM.from_pretrained("peft-core-tests/tiny-llama")' in card.replace("'", '"')

    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, token=TOKEN)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))


def test_push_to_hub_options(hub, llama_dir, input_ids, tmp_path):
    model = adapted(llama_dir, lora(), seed=9)
    repo = f"{USER}/options"
    first = model.push_to_hub(repo, token=TOKEN)
    assert hub.created[-1] == {"name": "options", "organization": USER}  # private=None: the Hub's default
    assert not hub.repos[repo].private
    assert hub.pushed[-1].message == "Upload adapter with peft-core"
    main = hub.repos[repo].refs["main"]
    assert main == first.oid

    other = adapted(llama_dir, lora(), seed=10)
    on_branch = other.push_to_hub(repo, token=TOKEN, revision="dev", commit_message="Try on dev")
    assert hub.created[-1]["name"] == "options"  # the repo exists: create_repo's 409 is accepted
    assert (hub.pushed[-1].ref, hub.pushed[-1].message, on_branch.oid) == ("dev", "Try on dev", hub.pushed[-1].oid)
    assert hub.repos[repo].refs["main"] == main, "a push to a branch moved main"
    assert "revision='dev'" in hub.pushed[-1].added["README.md"].decode()

    proposed = other.push_to_hub(repo, token=TOKEN, create_pr=True)
    assert hub.pushed[-1].ref == "refs/pr/1" and proposed.pr_revision == "refs/pr/1"
    assert proposed.pr_url == f"{hub.url}/{repo}/discussions/1"
    assert hub.repos[repo].refs["main"] == main, "a pull request moved main"

    for revision, expected in [("main", model), ("dev", other), ("refs/pr/1", other)]:
        loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), repo, revision=revision)
        torch.testing.assert_close(logits(loaded, input_ids), logits(expected, input_ids), msg=revision)

    before = len(hub.seen)
    with pytest.raises(PeftError, match="create_pr=True opens a pull request against the default branch"):
        other.push_to_hub(repo, token=TOKEN, revision="dev", create_pr=True)
    with pytest.raises(PeftError, match="non-empty commit_message"):
        other.push_to_hub(repo, token=TOKEN, commit_message="")
    assert len(hub.seen) == before, "a refused push still talked to the Hub"

    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="401"):
        model.push_to_hub(f"{USER}/anonymous")  # no token given, none stored
    assert f"{USER}/anonymous" not in hub.repos


def test_push_a_stack_and_load_it_back(hub, llama_dir, input_ids):
    model = adapted(llama_dir, stack([lora(), ia3()]), seed=11)
    model.push_to_hub(f"{USER}/stacked", token=TOKEN)
    commit = hub.pushed[-1]
    assert set(commit.added) == {"README.md", "peft_stack.json", "lora/adapter_config.json",
                                 "lora/adapter_model.safetensors", "ia3/adapter_config.json",
                                 "ia3/adapter_model.safetensors"}
    card = commit.added["README.md"].decode()
    assert front_matter(card)["tags"] == ["peft-core", "lora", "ia3"]
    assert "applied in this order: `lora`, `ia3`" in card
    assert "## Adapter `lora`" in card and "## Adapter `ia3`" in card
    assert "subfolder='lora'" in card  # Hugging Face PEFT reads a member from its folder
    assert "`pip install peft-core peft-lora peft-ia3`" in card  # the distributions of the card's methods
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), f"{USER}/stacked")
    assert loaded.active_adapters == ["lora", "ia3"]
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))


def test_a_base_model_from_a_local_directory_is_no_hub_base_model(llama_dir):
    model = adapted(llama_dir, lora(), seed=12)
    assert model.peft_config["default"].base_model_name_or_path == str(llama_dir)  # set from the loaded model
    card = model_card(model, f"{USER}/local-base")
    metadata = front_matter(card)
    assert "base_model" not in metadata and metadata["tags"] == ["peft-core", "lora"]
    assert "a model that is not on the Hub" in card
    # The saved config keeps the path (as save_pretrained wrote it); the card's prose and code do not use it.
    prose = re.sub(r"```json.*?```", "", card, flags=re.DOTALL)
    assert str(llama_dir) not in prose
    assert "AutoModelForCausalLM.from_pretrained('<the base model>')" in prose


def test_importing_the_hub_module_does_not_import_huggingface_hub():
    code = "import sys, peft_core, peft_core.hub; assert 'huggingface_hub' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- the documentation -----------------------------------------------------------------------------

DOC = REPO / "docs" / "integrations" / "hub.md"
EXAMPLE_MARKER = "<!-- tested: tests/test_hub.py -->"


def documented_example() -> str:
    """The Python block that follows the marker comment in docs/integrations/hub.md."""
    text = DOC.read_text()
    match = re.search(re.escape(EXAMPLE_MARKER) + r"\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, f"{DOC} has no ```python block after {EXAMPLE_MARKER}"
    return match.group(1)


def test_the_documented_example_runs_against_a_hub(hub, llama_dir, tmp_path):
    base_repo = "hf-internal-testing/tiny-random-LlamaForCausalLM"  # the example's base: our tiny Llama
    hub.add_folder(base_repo, llama_dir)
    example = documented_example()
    repo = re.search(r'push_to_hub\(\s*"([^"]+)"', example).group(1)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN,
           "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-c", example], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"the example failed:\n{done.stdout}\n{done.stderr}"

    assert hub.repos[repo].private
    [commit] = hub.pushed
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(commit.added)
    assert front_matter(commit.added["README.md"].decode())["base_model"] == base_repo
    downloads = {s.path for s in hub.requests() if s.method == "GET"}
    assert f"/{base_repo}/resolve/main/config.json" in downloads  # the base came from the server too
    assert f"/{repo}/resolve/{commit.oid}/adapter_config.json" in downloads  # loaded at the pushed commit


def test_push_staging_left_by_a_killed_push_is_removed_by_the_next(tmp_path, monkeypatch):
    import tempfile

    from peft_core.hub import _staging_root

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = Path(_staging_root())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is gone, as a killed push's is
    (root / f"{dead.pid}-abc").mkdir()
    (root / f"{dead.pid}-abc" / "adapter_model.safetensors").write_bytes(b"half")
    (root / f"{os.getpid()}-live").mkdir()  # a push of this process, still running
    assert Path(_staging_root()) == root
    assert sorted(os.listdir(root)) == [f"{os.getpid()}-live"]
