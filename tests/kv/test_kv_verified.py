"""Verified completions on a real daemon: candidates applied and tested in real branches,
the best passing one committed, the rest discarded; the verifiers file checked at load.

The tiny model has random weights, so which candidate passes is made certain
honestly: a first generation with the request's seed shows each candidate's first
token, and the workspace's check accepts one token that only one candidate starts
with; the flow's own generation (same seed, same engine) must then pick it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from branching import EmbeddedDaemon, Workspace
from branching.kv.verified import Completion, VerifierUnavailable, verify
from branching.kv.verifiers import (
    VerifierConfigError,
    load_verifiers,
    parse_verifier,
    verifiers_from_env,
)

pytestmark = [pytest.mark.kv, pytest.mark.timeout(300)]

CHECK = """\
first=$(head -n1 answer.txt)
echo "first token $first"
[ "$first" = "$(cat want)" ] || { echo "wanted $(cat want)" >&2; exit 3; }
"""


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    path = tmp_path / "proj"
    path.mkdir()
    (path / "check.sh").write_text(CHECK)
    return path


@pytest.fixture
def ws(daemon: EmbeddedDaemon, proj: Path) -> Iterator[Workspace]:
    with Workspace(proj, daemon=daemon.socket) as w:
        yield w
        left = [b.name for b in w.branches()]
        assert not left, f"branches left behind: {left}"


def verifier(proj: Path, daemon: EmbeddedDaemon, **spec: Any) -> Any:
    return parse_verifier("check", {
        "workspace": str(proj), "socket": str(daemon.socket), "file": "answer.txt",
        "content": "token_ids", "test": ["/bin/sh", "check.sh"], "timeout": 30,
        "limits": {"memory": "256M", "pids": 64}, **spec})


def fixed(*texts: str) -> Any:
    """A generate callable giving these texts (the candidates of a model that wrote them)."""
    def generate(n: int) -> list[Completion]:
        assert n == len(texts)
        return [Completion((i,), -float(i), t) for i, t in enumerate(texts)]
    return generate


# --- on the engine ---------------------------------------------------------------------

@pytest.fixture
def sampled(engine: Any) -> Any:
    from vllm import SamplingParams

    from branching.kv.fork import snapshot
    from branching.kv.verified import engine_generate

    root = snapshot(engine, [(i * 7 + 3) % 500 + 3 for i in range(96)])
    sampling = SamplingParams(max_tokens=4, temperature=1.0, seed=11, ignore_eos=True,
                              detokenize=False)
    return engine_generate(engine, root, sampling)


@pytest.mark.slow
@pytest.mark.mount
def test_the_one_passing_candidate_is_committed_and_the_rest_discarded(
        sampled: Any, ws: Workspace, proj: Path, daemon: EmbeddedDaemon) -> None:
    preview = sampled(4)
    firsts = [c.token_ids[0] for c in preview]
    unique = [i for i, t in enumerate(firsts) if firsts.count(t) == 1]
    assert unique, f"seed 11 gives no candidate a first token of its own: {firsts}"
    winner = unique[-1]  # the last: not the first by index, not necessarily the best score
    (proj / "want").write_text(f"{firsts[winner]}\n")

    result = verify(sampled, verifier(proj, daemon), 4, commit=True)

    by_index = {c.index: c for c in result.candidates}
    assert [by_index[i].completion.token_ids for i in range(4)] == [
        c.token_ids for c in preview]  # the flow's own generation, same seed
    assert [c.index for c in result.candidates if c.passed] == [winner]
    assert result.candidates[0].index == winner and result.committed == winner
    assert by_index[winner].committed and by_index[winner].exit_code == 0
    losers = [c for c in result.candidates if not c.passed]
    assert all(c.stage == "test" and c.exit_code == 3 and "wanted" in c.log for c in losers)
    assert [c.score for c in losers] == sorted((c.score for c in losers), reverse=True)
    assert f"first token {firsts[winner]}" in by_index[winner].log
    # the workspace holds the winner's tokens; every branch is gone (the ws fixture)
    assert (proj / "answer.txt").read_text().split() == [
        str(t) for t in preview[winner].token_ids]
    ended = {b["name"]: b["status"] for b in ws.client.call(
        "list", workspace=ws.name, all=True)["branches"]}
    assert sorted(ended.values()) == ["committed", "discarded", "discarded", "discarded"]
    json.dumps(result.to_json())


@pytest.mark.slow
@pytest.mark.mount
def test_none_passing_commits_nothing(sampled: Any, ws: Workspace, proj: Path,
                                      daemon: EmbeddedDaemon) -> None:
    (proj / "want").write_text("100000\n")  # no token of a 512-token vocabulary
    result = verify(sampled, verifier(proj, daemon), 3, commit=True)
    assert result.committed is None and "none of 3 candidates passed" in result.message
    assert not any(c.passed or c.committed for c in result.candidates)
    assert not (proj / "answer.txt").exists()


@pytest.mark.mount
def test_token_ids_only_model_cannot_serve_a_text_verifier(
        sampled: Any, ws: Workspace, proj: Path, daemon: EmbeddedDaemon) -> None:
    with pytest.raises(VerifierUnavailable, match="token ids only"):
        verify(sampled, verifier(proj, daemon, content="text"), 2)


# --- the flow with given candidates (diffs) -----------------------------------------------

DIFF = """\
--- a/value.txt
+++ b/value.txt
@@ -1 +1 @@
-0
+{}
"""


@pytest.mark.mount
def test_diffs_are_applied_and_tested_the_best_passing_committed(
        ws: Workspace, proj: Path, daemon: EmbeddedDaemon) -> None:
    (proj / "value.txt").write_text("0\n")
    spec = {"workspace": str(proj), "socket": str(daemon.socket), "apply": "git-apply",
            "test": ["/bin/sh", "-c", "test $(cat value.txt) -ge 4"], "timeout": 30}
    v = parse_verifier("diffs", spec)
    texts = (DIFF.format(1), "not a diff\n", DIFF.format(7), DIFF.format(5))
    result = verify(fixed(*texts), v, 4, commit=True)
    # 2 and 3 pass; 2 scores -2.0, 3 scores -3.0: 2 wins
    assert [(c.index, c.passed, c.stage) for c in result.candidates] == [
        (2, True, "test"), (3, True, "test"), (0, False, "test"), (1, False, "apply")]
    assert result.committed == 2
    assert "patch" in result.candidates[3].log  # git apply's own complaint
    assert (proj / "value.txt").read_text() == "7\n"


@pytest.mark.mount
def test_commit_not_asked_leaves_the_workspace_as_it_was(
        ws: Workspace, proj: Path, daemon: EmbeddedDaemon) -> None:
    (proj / "want").write_text("5\n")
    result = verify(fixed("5\n", "6\n"), verifier(proj, daemon, content="text"), 2)
    assert [c.passed for c in result.candidates] == [True, False]
    assert result.committed is None and "commit not asked" in result.message
    assert not (proj / "answer.txt").exists()


@pytest.mark.mount
def test_runs_are_held_to_the_verifiers_limits(ws: Workspace, proj: Path,
                                                daemon: EmbeddedDaemon) -> None:
    v = verifier(proj, daemon, content="text", timeout=1,
                 test=["/bin/sh", "-c", "sleep 30"])
    [c] = verify(fixed("x"), v, 1, commit=True).candidates
    assert not c.passed and c.ended_by == "timeout"
    v = verifier(proj, daemon, content="text", limits={"pids": 4},
                 test=["/bin/sh", "-c", "for i in 1 2 3 4 5 6; do sleep 5 & done; wait"])
    [c] = verify(fixed("x"), v, 1).candidates
    assert not c.passed and c.stage == "test"


@pytest.mark.mount
def test_two_requests_on_one_workspace_both_commit(ws: Workspace, proj: Path,
                                                   daemon: EmbeddedDaemon) -> None:
    """Side by side, the first commit would end the other request's candidates
    (first commit wins among a workspace's candidate branches): they take turns."""
    from concurrent.futures import ThreadPoolExecutor

    v = verifier(proj, daemon, content="text",
                 test=["/bin/sh", "-c", "sleep 1; grep -q ok answer.txt"])
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda t: verify(fixed(t, "no\n"), v, 2, commit=True),
                                ["ok 1\n", "ok 2\n"]))
    assert [r.committed for r in results] == [0, 0], [r.message for r in results]
    assert (proj / "answer.txt").read_text() in ("ok 1\n", "ok 2\n")


def test_a_log_is_cut_to_its_tail(ws: Workspace, proj: Path, daemon: EmbeddedDaemon) -> None:
    v = verifier(proj, daemon, content="text",
                 test=["/bin/sh", "-c", "seq 1 5000; echo last"])
    [c] = verify(fixed("x"), v, 1).candidates
    assert c.passed and c.log_truncated and c.log.endswith("last\n")
    assert len(c.log.encode()) <= 4096


def test_an_unreachable_daemon_is_unavailable_and_n_is_bounded(proj: Path,
                                                                tmp_path: Path) -> None:
    v = parse_verifier("x", {"workspace": str(proj), "socket": str(tmp_path / "none.sock"),
                             "file": "a", "content": "text", "test": ["true"], "max_n": 2})
    with pytest.raises(VerifierUnavailable, match="verifier x"):
        verify(fixed("a"), v, 1)
    for n in (0, 3, True):
        with pytest.raises(ValueError, match="from 1 to 2"):
            verify(fixed(), v, n)  # refused before anything is generated


# --- the verifiers file ------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "v.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_verifiers_file_loads_with_its_defaults(tmp_path: Path, proj: Path) -> None:
    path = write(tmp_path, f"""
[verifiers.fix]
workspace = "{proj}"
socket = "/run/branchd/branchd.sock"
file = "src/answer.py"
test = ["python3", "-m", "pytest", "-x"]
limits = {{ memory = "512M", cpus = 1, pids = 128 }}
""")
    v = load_verifiers(path)["fix"]
    assert v.apply == "file" and v.content == "text" and v.timeout == 60
    assert v.limits.memory == 512 << 20 and v.run_limits().timeout == 60
    assert v.env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert verifiers_from_env({"BRANCHD_VERIFIERS": str(path)}) == {"fix": v}
    as_json = write(tmp_path, json.dumps({"verifiers": {"fix": {
        "workspace": str(proj), "socket": "/s", "file": "a", "test": ["true"]}}}), "v.json")
    assert load_verifiers(as_json)["fix"].test == ("true",)


@pytest.mark.parametrize(("spec", "message"), [
    ('test = ["true"]\nfile = "a"', "workspace is required"),
    ('workspace = "rel"\ntest = ["true"]\nfile = "a"', "workspace: 'rel' is not an absolute"),
    ('workspace = "/nonexistent/x"\ntest = ["true"]\nfile = "a"', "is not a directory"),
    ('workspace = "{proj}"\nfile = "a"', "test is required"),
    ('workspace = "{proj}"\ntest = "make test"\nfile = "a"', "test: expected a non-empty list"),
    ('workspace = "{proj}"\ntest = ["true"]', "file is required"),
    ('workspace = "{proj}"\ntest = ["true"]\nfile = "../x"', "file: '../x' must be relative"),
    ('workspace = "{proj}"\ntest = ["true"]\nfile = "a"\nlimits = {{ memory = "lots" }}',
     "limits: invalid size 'lots'"),
    ('workspace = "{proj}"\ntest = ["true"]\nfile = "a"\nlimits = {{ timeout = 3 }}',
     "the run's timeout is the verifier's timeout"),
    ('workspace = "{proj}"\ntest = ["true"]\napply = "git-apply"\ncontent = "token_ids"',
     "needs content = \"text\""),
    ('workspace = "{proj}"\ntest = ["true"]\nfile = "a"\nmax_n = 1000', "max_n: 1000 is not"),
    ('workspace = "{proj}"\ntest = ["true"]\nfile = "a"\ncommand = "rm -rf /"',
     "unknown key(s) command"),
    ('workspace = "{proj}"\ntest = ["true"]\nfile = "a"\nsocket = "x.sock"',
     "socket: 'x.sock' is not an absolute path"),
])
def test_a_bad_verifier_is_one_clear_line(tmp_path: Path, proj: Path, spec: str,
                                          message: str) -> None:
    socket = "" if "socket" in spec else 'socket = "/s"\n'
    path = write(tmp_path, "[verifiers.v]\n" + socket + spec.format(proj=proj))
    with pytest.raises(VerifierConfigError) as e:
        load_verifiers(path)
    text = str(e.value)
    assert message in text and "\n" not in text and f"verifiers file {path}" in text


@pytest.mark.parametrize(("text", "message"), [
    ("[verifiers", "not valid TOML"),
    ("[other]\nx = 1", "one table, 'verifiers'"),
    ("[verifiers]", "names no verifier"),
    ('[verifiers."a b"]\nx = 1', "verifier name 'a b'"),
])
def test_a_bad_verifiers_file_is_one_clear_line(tmp_path: Path, text: str,
                                                message: str) -> None:
    with pytest.raises(VerifierConfigError, match="verifiers file .*" + message):
        load_verifiers(write(tmp_path, text))
    with pytest.raises(VerifierConfigError, match="cannot read it"):
        load_verifiers(tmp_path / "missing.toml")


def test_a_server_reads_its_verifiers_file_again_when_it_changes(tmp_path: Path,
                                                                 proj: Path) -> None:
    from branching.kv.verifiers import VerifierFile

    one = f'[verifiers.a]\nworkspace = "{proj}"\nsocket = "/s"\nfile = "f"\ntest = ["true"]\n'
    path = write(tmp_path, one)
    held = VerifierFile(path)
    assert list(held.current()) == ["a"]
    write(tmp_path, one + one.replace("verifiers.a", "verifiers.b"))
    assert list(held.current()) == ["a", "b"]
    write(tmp_path, one + "oops = 1\n")
    with pytest.raises(VerifierConfigError, match="unknown key"):
        held.current()  # a broken file serves nothing (not the version before it)
    path.unlink()
    with pytest.raises(VerifierConfigError, match="cannot read it"):
        held.current()


# --- over HTTP: POST /v1/branchd/verified_completions on a real vllm serve ------------------

def set_verifiers(path: Path, text: str) -> None:
    """Replace the server's verifiers file (by rename: it sees a new file at once)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


def http_verifiers(proj: Path, daemon: EmbeddedDaemon, **more: str) -> str:
    common = f'workspace = "{proj}"\nsocket = "{daemon.socket}"\nfile = "answer.txt"\n'
    text = (f'[verifiers.preview]\n{common}test = ["true"]\n'
            f'[verifiers.check]\n{common}test = ["/bin/sh", "check.sh"]\nmax_n = 4\n'
            'limits = { memory = "256M", pids = 64 }\n')
    return text + "".join(f"[verifiers.{k}]\n{v}\n" for k, v in more.items())


WORDS = """\
first=$(awk '{print $1; exit}' answer.txt)
echo "first word $first"
[ "$first" = "$(cat want)" ] || { echo "wanted $(cat want)" >&2; exit 3; }
"""


@pytest.fixture
def served_verifiers(kv_server: Any, verifiers_file: Path, daemon: EmbeddedDaemon,
                     proj: Path) -> Iterator[Any]:
    import httpx

    (proj / "check.sh").write_text(WORDS)
    set_verifiers(verifiers_file, http_verifiers(proj, daemon))
    with httpx.Client(base_url=kv_server.url + "/v1/branchd", timeout=300) as client:
        yield client


@pytest.mark.slow
@pytest.mark.mount
@pytest.mark.timeout(900)
def test_over_http_the_passing_candidate_is_committed(served_verifiers: Any, ws: Workspace,
                                                      proj: Path) -> None:
    http = served_verifiers
    root = http.post("/snapshot", json={"prompt_token_ids": [(i * 5 + 1) % 500 + 7
                                                             for i in range(128)]}).json()
    body = {"n": 4, "handle_id": root["handle_id"], "prompt_token_ids": [11, 12, 13],
            "sampling": {"max_tokens": 5, "temperature": 1.0, "seed": 5, "ignore_eos": True}}
    preview = http.post("/verified_completions", json={**body, "verifier": "preview"})
    assert preview.status_code == 200, preview.text
    texts = {c["index"]: c["text"] for c in preview.json()["candidates"]}
    assert all(c["passed"] for c in preview.json()["candidates"])
    assert preview.json()["committed"] is None  # commit not asked
    firsts = [texts[i].split()[0] for i in range(4)]
    unique = [i for i, w in enumerate(firsts) if firsts.count(w) == 1]
    assert unique, f"seed 5 gives no candidate a first word of its own: {firsts}"
    winner = unique[-1]
    (proj / "want").write_text(firsts[winner] + "\n")

    r = http.post("/verified_completions", json={**body, "verifier": "check", "commit": True})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["cached_tokens"] == 128 and result["prompt_tokens"] == 131  # prefix once
    ranked = result["candidates"]
    assert {c["index"]: c["text"] for c in ranked} == texts  # same seed, same candidates
    assert [c["index"] for c in ranked if c["passed"]] == [winner] == [ranked[0]["index"]]
    assert result["committed"] == winner and ranked[0]["committed"]
    assert all(c["exit_code"] == 3 and "wanted" in c["log"] for c in ranked[1:])
    assert (proj / "answer.txt").read_text() == texts[winner]
    http.post("/release", json={"handle_id": root["handle_id"]})


@pytest.mark.slow
@pytest.mark.mount
@pytest.mark.timeout(900)
def test_over_http_a_request_names_a_verifier_never_a_command(
        served_verifiers: Any, ws: Workspace, proj: Path, verifiers_file: Path,
        daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    http = served_verifiers
    prompt = {"prompt_token_ids": [5, 6, 7], "sampling": {"max_tokens": 2}}

    def refused(status: int, body: Any, text: str, **kw: Any) -> None:
        r = http.post("/verified_completions", **({"content": body} if isinstance(body, str)
                                                   else {"json": body}), **kw)
        assert r.status_code == status, r.text
        assert text in r.json()["error"]["message"], r.text

    marker = tmp_path / "ran"
    for field in ("command", "test", "argv", "env", "limits", "workspace"):
        refused(422, {"verifier": "check", "n": 1, **prompt, field: ["touch", str(marker)]},
                f"{field}: Extra inputs are not permitted")
    refused(404, {"verifier": "rm-rf", "n": 1, **prompt}, "no verifier 'rm-rf' here")
    refused(413, {"verifier": "check", "n": 5, **prompt}, "max_n of verifier check")
    refused(422, {"verifier": "check", "n": 0, **prompt}, "n: ")
    refused(422, {"verifier": "check", "n": 1}, "give a prompt")
    refused(400, "{not json", "not JSON")
    set_verifiers(verifiers_file, http_verifiers(proj, daemon) + "oops = 1\n")
    refused(503, {"verifier": "check", "n": 1, **prompt}, "unknown key(s) oops")
    set_verifiers(verifiers_file, http_verifiers(proj, daemon, gone=(
        f'workspace = "{proj}"\nsocket = "{tmp_path / "none.sock"}"\nfile = "a"\n'
        'test = ["true"]')))
    refused(503, {"verifier": "gone", "n": 1, **prompt}, "verifier gone:")
    assert not marker.exists()
    ended = ws.client.call("list", workspace=ws.name, all=True)["branches"]
    assert ended == []  # nothing refused ever made a branch
