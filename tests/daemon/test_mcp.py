"""``branchctl mcp`` driven by the real MCP client over stdio, as an agent would."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from branching import EmbeddedDaemon

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]


def server(daemon: EmbeddedDaemon, *workspaces: Path) -> StdioServerParameters:
    args = ["-m", "branching.cli", "--socket", str(daemon.socket), "mcp"]
    for w in workspaces:
        args += ["--workspace", str(w)]
    return StdioServerParameters(command=sys.executable, args=args,
                                 env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                                 cwd=str(Path(__file__).parents[2]))


async def call(client: Client, tool: str, **args: Any) -> Any:
    """The tool's result, or the text of its error (is_error) as an AssertionError."""
    result = await client.call_tool(tool, args)
    text = "".join(getattr(c, "text", "") for c in result.content)
    if result.is_error:
        raise AssertionError(text)
    if result.structured_content is not None:
        value = result.structured_content
        return value.get("result", value) if set(value) == {"result"} else value
    return json.loads(text) if text[:1] in "[{" else text


async def error(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, result
    return "".join(getattr(c, "text", "") for c in result.content)


def test_a_branch_from_create_to_commit(daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "app.py").write_text("print('v1')\n")
    (tmp_path / "secret").write_text("outside\n")

    async def scenario() -> None:
        async with Client(server(daemon, ws)) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"create_branch", "list_branches", "branch_info", "read_file", "write_file",
                    "exec_command", "diff", "commit", "discard", "rebase", "resolve",
                    "speculate", "best_of_n"} <= names
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert tools["exec_command"].input_schema["required"] == ["branch", "command"]

            made = await call(client, "create_branch", name="m1")
            assert made["name"] == "m1"
            await call(client, "write_file", branch="m1", path="src/new.py", content="x = 1\n")
            assert await call(client, "read_file", branch="m1", path="src/new.py") == "x = 1\n"
            run = await call(client, "exec_command", branch="m1",
                             command="pwd; cat src/new.py; echo err >&2; exit 3")
            assert run["exit_code"] == 3 and not run["ok"]
            assert run["stdout"].splitlines() == [str(ws), "x = 1"]  # at the workspace path
            assert run["stderr"] == "err\n" and Path(run["stdout_path"]).is_absolute()
            d = await call(client, "diff", branch="m1", patch=True)
            assert [c["path"] for c in d["changes"]] == ["src", "src/new.py"]
            assert "+x = 1" in d["patch"]
            assert [b["name"] for b in await call(client, "list_branches")] == ["m1"]
            assert not (ws / "src").exists()
            await call(client, "commit", branch="m1")
            assert (ws / "src" / "new.py").read_text() == "x = 1\n"

            # two sub-agents on one file: the second carries on, resolves, commits
            for name in ("p1", "p2"):
                await call(client, "create_branch", name=name)
                await call(client, "write_file", branch=name, path="app.py",
                           content=f"print('{name}')\n")
            await call(client, "commit", branch="p1")
            assert (await call(client, "rebase", branch="p2"))["conflicts"] == ["app.py"]
            text = await error(client, "commit", branch="p2")
            assert "conflict:" in text and "app.py" in text, text
            await call(client, "resolve", branch="p2", path="app.py", how="markers")
            marked = await call(client, "read_file", branch="p2", path="app.py")
            assert "<<<<<<< branch" in marked and "print('p1')" in marked
            await call(client, "write_file", branch="p2", path="app.py", content="print(3)\n")
            assert (await call(client, "resolve", branch="p2", path="app.py"))["conflicts"] == []
            await call(client, "commit", branch="p2")
            assert (ws / "app.py").read_text() == "print(3)\n"

            # refusals: one line each, nothing outside the workspace reached
            await call(client, "create_branch", name="m2")
            for path in ("../secret", "/etc/passwd", "a/../../secret"):
                text = await error(client, "read_file", branch="m2", path=path)
                assert "bad-request:" in text, text
            os.symlink(tmp_path / "secret", ws / "link")
            text = await error(client, "read_file", branch="m2", path="link")
            assert "permission:" in text and "outside" not in text
            text = await error(client, "create_branch", name="x",
                               workspace=str(tmp_path))
            assert "permission:" in text, text
            text = await error(client, "commit", branch="nope")
            assert "not-found:" in text, text
            text = await error(client, "exec_command", branch="nope", command="true")
            assert "not-found:" in text, text  # the async tool maps errors as the others do
            await call(client, "discard", branch="m2")

    anyio.run(scenario)


def test_speculate_and_best_of_n_tools(daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "n.txt").write_text("0\n")

    async def scenario() -> None:
        async with Client(server(daemon, ws)) as client:
            out = await call(client, "speculate", in_order=True,
                             commands=["echo bad > n.txt; exit 1", "echo 7 > n.txt"])
            assert out["committed"] and out["winner"] == "echo 7 > n.txt"
            assert [c["success"] for c in out["candidates"]] == [False, True]
            out = await call(client, "best_of_n", n=3,
                             command='echo "$BRANCHING_ATTEMPT" > n.txt; '
                                     'echo "$BRANCHING_ATTEMPT" >&3')
            assert out["committed"]

    anyio.run(scenario)
    assert (ws / "n.txt").read_text() == "3\n"  # the best score: attempt 3
