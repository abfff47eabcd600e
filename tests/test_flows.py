"""Prefect orchestration: a real `forge server`, `forge serve` in a subprocess, and flow runs
created, retried and cancelled through the REST API with the calls the UI makes.

One server serves the whole session. Each test serves its deployments under its own name, so
several serve processes (with different environments) can share it.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import DATA, REPO, small_config

from flows.common import artifact_prefix, resolve_config
from flows.deployments import all_flows
from flows.launcher import CommandError, run_command
from flows.stages import stage_cache_key
from pipeline.config import ConfigError, load_config
from pipeline.files import WorkFolder
from pipeline.registry import prepare_stages
from pipeline.shards import TokenDataset, verify
from pipeline.stats import dataset_stats

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# ---------------------------------------------------------------- the server and the API


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Busy(Exception):
    pass


class Api:
    """The REST calls the Prefect UI makes, on httpx (no Prefect client in the test process)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=60,
                                 event_hooks={"response": [self._note_busy]})

    @staticmethod
    def _note_busy(response: httpx.Response) -> None:
        if response.status_code == 503:  # SQLite busy: Prefect's clients retry these, so do we
            raise _Busy(response)

    def request(self, method: str, path: str, ok: tuple[int, ...] = (200, 201),
                **kwargs) -> httpx.Response:
        for attempt in range(8):
            try:
                reply = self.http.request(method, path, **kwargs)
            except _Busy:
                time.sleep(0.5 * 2 ** attempt)
                continue
            assert reply.status_code in ok, (reply.status_code, reply.text[:1000])
            return reply
        raise AssertionError(f"{method} {path}: the server stayed busy (503)")

    def post(self, path: str, json: dict) -> httpx.Response:
        return self.request("POST", path, json=json)

    def deployment(self, flow: str, name: str) -> dict | None:
        reply = self.request("GET", f"/deployments/name/{flow}/{name}", ok=(200, 404))
        return reply.json() if reply.status_code == 200 else None

    def run_deployment(self, flow: str, name: str, parameters: dict) -> str:
        """The UI's Run > Custom run: a flow run made from the deployment, with the form."""
        deployment = self.deployment(flow, name)
        assert deployment is not None, f"no deployment {flow}/{name}"
        reply = self.post(f"/deployments/{deployment['id']}/create_flow_run",
                          json={"parameters": parameters})
        return reply.json()["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.request("GET", f"/flow_runs/{run_id}").json()

    def wait(self, run_id: str, until: set[str] = TERMINAL, timeout_s: float = 500) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in until:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} still {run['state_type']} after {timeout_s} s")

    def set_state(self, run_id: str, type_: str, name: str, force: bool) -> None:
        reply = self.post(f"/flow_runs/{run_id}/set_state", json={
            "state": {"type": type_, "name": name, "message": f"{name} from the UI"},
            "force": force})
        assert reply.json()["status"] == "ACCEPT", reply.json()

    def retry(self, run_id: str) -> None:
        """The UI's Retry button on a failed run."""
        self.set_state(run_id, "SCHEDULED", "AwaitingRetry", force=False)

    def cancel(self, run_id: str) -> None:
        """The UI's Cancel button."""
        self.set_state(run_id, "CANCELLING", "Cancelling", force=True)

    def task_runs(self, run_id: str) -> list[dict]:
        return self.post("/task_runs/filter", json={
            "flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()

    def artifacts(self, run_id: str) -> list[dict]:
        return self.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [run_id]}}, "sort": "CREATED_DESC"}).json()

    def logs(self, run_id: str) -> list[str]:
        messages: list[str] = []
        while True:  # 200 at most per page
            reply = self.post("/logs/filter", json={
                "logs": {"flow_run_id": {"any_": [run_id]}}, "offset": len(messages),
                "sort": "TIMESTAMP_ASC"})
            page = [entry["message"] for entry in reply.json()]
            messages += page
            if not page:
                return messages


def _wait_until(check, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} after {timeout_s} s; its log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`forge server` on a free loopback port with its own PREFECT_HOME, for the session."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    log = home / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "server", "--port", str(port), "--home", str(home)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")})
    api = Api(f"http://127.0.0.1:{port}/api")

    def healthy() -> bool:
        assert process.poll() is None, f"forge server exited:\n{log.read_text()}"
        with contextlib.suppress(httpx.HTTPError, _Busy):
            return api.http.get("/health", timeout=2).status_code == 200
        return False

    try:
        _wait_until(healthy, 180, "the Prefect server is not healthy", log)
        yield {"api": api, "home": home, "port": port}
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def client_env(server: dict, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FORGE_FAIL"))}
    return {**env, "PREFECT_API_URL": server["api"].url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            **extra}


@contextlib.contextmanager
def serving(server: dict, name: str, log: Path, command: list[str] | None = None,
            flow: str = "prepare-data", **env: str) -> Iterator[None]:
    """`forge serve --name NAME` (or `command`) until its `flow` deployment is registered."""
    command = command or [sys.executable, "-m", "cli.main", "serve", "--name", name,
                          "--home", str(server["home"])]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env=client_env(server, **env))
    try:
        def registered() -> bool:
            assert process.poll() is None, f"serve exited:\n{log.read_text()}"
            return server["api"].deployment(flow, name) is not None

        _wait_until(registered, 180, f"no deployment {flow}/{name}", log)
        time.sleep(2)  # the deployments are made before the runner polls
        yield
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def form(config_path: Path) -> dict:
    """The config as the UI form sends it: the model's fields as JSON."""
    return {"config": yaml.safe_load(config_path.read_text())}


def fingerprint(work: Path) -> str:
    return TokenDataset(work / "tokenize" / "dataset.zarr").attrs["fingerprint"]


def mtimes(*folders: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the server's address


def test_the_ui_of_a_server_on_another_port_calls_that_port(prefect_server: dict) -> None:
    port = prefect_server["port"]
    settings = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=30).json()
    assert settings["api_url"] == f"http://127.0.0.1:{port}/api"


@pytest.mark.parametrize("host, ui_api", [("127.0.0.1", "http://127.0.0.1:4321/api"),
                                          ("10.1.2.3", "http://10.1.2.3:4321/api"),
                                          ("::1", "http://[::1]:4321/api"),
                                          ("0.0.0.0", "/api")])
def test_server_flags_set_the_server_s_address_and_its_ui_s_api(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path, host: str,
                                                               ui_api: str) -> None:
    from cli.main import build_parser
    from cli.orchestration import server_environment

    monkeypatch.delenv("PREFECT_UI_API_URL", raising=False)
    args = build_parser().parse_args(["server", "--host", host, "--port", "4321",
                                      "--home", str(tmp_path)])
    env = server_environment(args)
    assert (env["PREFECT_SERVER_API_HOST"], env["PREFECT_SERVER_API_PORT"]) == (host, "4321")
    assert env["PREFECT_UI_API_URL"] == ui_api


def test_serve_and_run_find_a_server_on_another_port_by_flag(prefect_server: dict) -> None:
    """Without PREFECT_API_URL, `--port` (and `--host`) say where the server is."""
    script = ("import argparse; from pathlib import Path; from cli.orchestration import _connect\n"
              f"args = argparse.Namespace(host='127.0.0.1', port={prefect_server['port']}, "
              f"home=Path({str(prefect_server['home'])!r}), quiet=True, debug=False)\n"
              "print(_connect(args, required=True))\n"
              "import prefect.settings as s; print(s.PREFECT_API_URL.value())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [prefect_server["api"].url] * 2


def chromium() -> str:
    """The headless browser of the UI tests; missing, the test fails (no skip)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is missing; install it (`apt-get install -y chromium`) to test "
                    "the Prefect UI in a real browser")
    return path


def render(url: str, tmp_path: Path, screenshot: Path) -> str:
    """The text of the page at `url` as headless Chromium renders it (scripts run, the API
    called), and its screenshot."""
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
               "--virtual-time-budget=20000", "--window-size=1280,1000"]
    for action in ([f"--screenshot={screenshot}"], ["--dump-dom"]):
        result = subprocess.run([*browser, *action, url], capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", result.stdout, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@pytest.mark.slow
def test_the_deployments_page_of_a_server_on_another_port_lists_them_in_chromium(
        prefect_server: dict, tmp_path: Path) -> None:
    """Issue 14.1 as a user sees it: the UI of `forge server --port P` calls the API on P, so
    its Deployments page lists what `forge serve` registered (not "Create a deployment")."""
    api: Api = prefect_server["api"]
    flows = [f.name for f in all_flows()]
    with serving(prefect_server, "browser", tmp_path / "serve.log"):
        _wait_until(lambda: all(api.deployment(f, "browser") for f in flows), 120,
                    "not every flow is deployed", tmp_path / "serve.log")
        count = api.post("/deployments/count", json={}).json()
        screenshot = tmp_path / "deployments.png"
        text = render(f"http://127.0.0.1:{prefect_server['port']}/deployments", tmp_path,
                      screenshot)
    assert screenshot.read_bytes()[:4] == b"\x89PNG"
    assert f"{count} Deployments" in text, text[:2000]
    for flow in flows:  # the newest first: this test's, on the first page
        assert f"browser {flow}" in text, text[:2000]


# ---------------------------------------------------------------- parameters and cache keys


def test_every_flow_takes_the_config_model_as_a_described_form() -> None:
    names = {f.name for f in all_flows()}
    assert names == {"download", "extract", "filter", "dedupe", "decontaminate", "tokenize",
                     "prepare-data", "pretrain", "finetune", "build-assistant"}
    for flow in all_flows():
        schema = flow.parameters.model_dump()
        config = schema["properties"]["config"]
        model = config["anyOf"][0]["$ref"].rsplit("/", 1)[1]
        assert model in ("ForgeConfig", "RunConfig")
        assert config["description"] and schema["properties"]["config_file"]["description"]
        fields = schema["definitions"]["TokenizeConfig"]["properties"]
        assert all(field.get("description") for field in fields.values())
        if model == "RunConfig":
            assert "pretrain" in schema["definitions"][model]["properties"]


def test_a_flow_takes_a_form_or_a_file_but_not_both(tmp_path: Path) -> None:
    path = small_config(tmp_path / "c.yaml", tmp_path / "work")
    cfg = resolve_config(None, str(path))
    assert cfg == resolve_config(load_config(path), None)
    assert Path(cfg.workdir).is_absolute()
    for both_or_neither in ((cfg, str(path)), (None, None)):
        with pytest.raises(ConfigError, match="either `config`"):
            resolve_config(*both_or_neither)


def test_cache_keys_follow_the_stage_config_its_input_and_the_work_folder(tmp_path: Path
                                                                          ) -> None:
    cfg = load_config(small_config(tmp_path / "c.yaml", tmp_path / "work"))

    def key(name: str, config=cfg) -> str | None:
        return stage_cache_key(None, {"name": name, "config": config})

    assert key("download") and key("extract") is None  # extract's input is not there yet
    upstream = tmp_path / "work" / "download" / "manifest.json"
    upstream.parent.mkdir(parents=True)
    upstream.write_text(json.dumps({"output_fingerprint": "a" * 64}))
    extract = key("extract")
    assert extract and extract.startswith("extract-") and extract == key("extract")
    assert key("extract", cfg.model_copy(update={"workers": 1})) == extract  # same output
    changed = cfg.model_copy(deep=True)
    changed.data.extract.max_doc_mb = 1.0
    assert key("extract", changed) != extract and key("download", changed) == key("download")
    assert key("extract", cfg.model_copy(update={"workdir": str(tmp_path / "w2")})) != extract
    upstream.write_text(json.dumps({"output_fingerprint": "b" * 64}))
    assert key("extract") != extract


def test_the_filter_cache_key_is_the_filter_stage_s_own_hash_rules_included(tmp_path: Path
                                                                           ) -> None:
    """Changing a filter rule changes the flow's cache key exactly as it changes the config
    hash the filter stage runs under, so the flow reruns the filter; the same config keeps
    both (and the manifest the stage wrote carries that hash)."""
    from pipeline.filter import filter_fingerprint, run_filter
    from pipeline.registry import stage_function

    cfg = load_config(small_config(tmp_path / "c.yaml", tmp_path / "work"))
    for name in ("download", "extract"):
        stage_function(name)(cfg)

    def key(config) -> str | None:
        return stage_cache_key(None, {"name": "filter", "config": config})

    manifest = run_filter(cfg)
    assert manifest["config_hash"] == filter_fingerprint(cfg) and key(cfg) == key(cfg)
    stricter = cfg.model_copy(deep=True)
    stricter.data.filter.gopher_quality.min_words = 80
    assert filter_fingerprint(stricter) != manifest["config_hash"]
    assert key(stricter) != key(cfg)  # the flow's cache misses: the filter runs again
    rerun = run_filter(stricter, overwrite=True)
    assert rerun["config_hash"] == filter_fingerprint(stricter)
    assert rerun["dropped"] != manifest["dropped"] or rerun["docs_out"] <= manifest["docs_out"]


# ---------------------------------------------------------------- data stages through the UI


@pytest.mark.slow
def test_prepare_data_run_from_the_deployment_writes_shards_and_artifacts(
        prefect_server: dict, prepared: Path, tmp_path: Path) -> None:
    api: Api = prefect_server["api"]
    config = small_config(tmp_path / "c.yaml", tmp_path / "work")
    with serving(prefect_server, "integration", tmp_path / "serve.log"):
        run_id = api.run_deployment("prepare-data", "integration", form(config))
        run = api.wait(run_id)
        assert run["state_type"] == "COMPLETED", (run["state"]["message"],
                                                  (tmp_path / "serve.log").read_text()[-3000:])
        work = tmp_path / "work"
        assert verify(work / "tokenize" / "dataset.zarr") == []
        assert fingerprint(work) == fingerprint(prepared)  # the same as `forge prepare`

        artifacts = {a["key"]: a for a in api.artifacts(run_id) if a["key"]}
        stages = [t["name"] for t in api.task_runs(run_id)]
        assert stages == prepare_stages(load_config(config))
        prefix = artifact_prefix(work)
        assert set(artifacts) == {f"{prefix}-{k}" for k in [*stages, "shards", "dataset"]}
        for name in stages:
            manifest = json.loads((work / name / "manifest.json").read_text())
            rows = {r["measure"].strip(): r["value"]
                    for r in json.loads(artifacts[f"{prefix}-{name}"]["data"])}
            unit = manifest.get("count_unit", "docs")
            assert rows[f"{unit} in"] == manifest["docs_in"]
            assert rows[f"{unit} out"] == manifest["docs_out"]
            for reason, count in manifest["dropped"].items():
                assert rows[f"dropped: {reason}"] == count
            assert rows["MB out"] == round(manifest["bytes_out"] / 1e6, 2)
        stats = dataset_stats(work / "tokenize" / "dataset.zarr")
        shard_rows = json.loads(artifacts[f"{prefix}-shards"]["data"])
        by_name = {r["shard"]: r for r in shard_rows}
        for split, info in stats["splits"].items():
            assert by_name[f"{split} total"]["tokens"] == info["tokens"]
            for shard in info["shards"]:
                assert by_name[f"{split}/{shard['name']}"]["docs"] == shard["docs"]
        assert stats["fingerprint"] in artifacts[f"{prefix}-dataset"]["data"]
        progress = [a for a in api.artifacts(run_id) if a["type"] == "progress"]
        assert len(progress) == len(stages) and all(a["data"] == 100 for a in progress)

        # the same run again: every stage cached, not a file of the work folder rewritten
        before = mtimes(work)
        again = api.wait(api.run_deployment("prepare-data", "integration", form(config)))
        assert again["state_type"] == "COMPLETED"
        assert {t["state_name"] for t in api.task_runs(again["id"])} == {"Cached"}
        assert mtimes(work) == before

        # a cached result whose output was deleted since is not trusted: the stage runs again
        shutil.rmtree(work / "tokenize")
        third = api.wait(api.run_deployment("prepare-data", "integration", form(config)))
        assert third["state_type"] == "COMPLETED", third["state"]["message"]
        states = [(t["name"], t["state_name"]) for t in api.task_runs(third["id"])]
        assert states[-2:] == [("tokenize", "Cached"), ("tokenize", "Completed")]
        assert fingerprint(work) == fingerprint(prepared)


@pytest.mark.slow
def test_ui_retry_of_a_failed_run_skips_finished_stages(prefect_server: dict, prepared: Path,
                                                       tmp_path: Path) -> None:
    """The filter stage fails after 3 units (FORGE_FAIL_AFTER with a marker file: the first run
    only); Retry resumes it without running download and extract again."""
    api: Api = prefect_server["api"]
    config = small_config(tmp_path / "c.yaml", tmp_path / "work")
    work = tmp_path / "work"
    with serving(prefect_server, "retry", tmp_path / "serve.log",
                 FORGE_FAIL_AFTER=f"filter:3:{tmp_path / 'fired'}"):
        run_id = api.run_deployment("prepare-data", "retry", form(config))
        failed = api.wait(run_id)
        assert failed["state_type"] == "FAILED"
        assert "injected failure after 3 units" in failed["state"]["message"]
        committed = len(list((work / "filter" / "units").glob("*.json")))
        assert 3 <= committed < len(json.loads(
            (work / "extract" / "manifest.json").read_text())["parts"])
        finished = mtimes(work / "download", work / "extract")

        api.retry(run_id)
        retried = api.wait(run_id)
        assert retried["state_type"] == "COMPLETED", retried["state"]["message"]
        assert retried["run_count"] == 2
        attempts = [(t["name"], t["state_name"]) for t in api.task_runs(run_id)]
        later = prepare_stages(load_config(config))[3:]
        assert attempts == [("download", "Completed"), ("extract", "Completed"),
                            ("filter", "Failed"),
                            ("download", "Cached"), ("extract", "Cached"),
                            ("filter", "Completed"), *((name, "Completed") for name in later)]
        assert mtimes(work / "download", work / "extract") == finished
        assert any(f"{committed} of" in line and "already committed" in line
                   for line in api.logs(run_id))  # the stage resumed after its committed units
        assert fingerprint(work) == fingerprint(prepared)  # as an uninterrupted run


@pytest.mark.slow
def test_a_stage_s_log_lines_land_in_the_flow_run_s_logs(prefect_server: dict,
                                                          tmp_path: Path) -> None:
    """The stage's summary (what `forge prepare` prints) and a worker process's warning are in
    the run's logs, where the UI shows them."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "workers": 2, "data": {
        "sources": [{"uri": str(DATA / "books" / "the-verdict.txt")},
                    {"uri": str(DATA / "books" / "pg11.txt.gz")},
                    {"uri": str(tmp_path / "absent" / "*.txt"), "optional": True}]}}))
    script = (
        "import sys; from pathlib import Path\n"
        "from flows.settings import apply_environment, prefect_environment\n"
        f"apply_environment(prefect_environment(Path({str(prefect_server['home'])!r}), "
        f"{prefect_server['api'].url!r}))\n"
        "from flows.stages import STAGE_FLOWS\n"
        f"state = STAGE_FLOWS['download'](config_file={str(config)!r}, return_state=True)\n"
        "print(state.type.value, state.state_details.flow_run_id)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, env=client_env(prefect_server), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state, run_id = result.stdout.split()[-2:]
    assert state == "COMPLETED"
    api: Api = prefect_server["api"]
    expected = ("download: 3 files in, 2 out, 1 dropped (no_matching_files: 1)",
                f"{tmp_path / 'absent' / '*.txt'} matches no file")  # logged by a worker
    deadline = time.monotonic() + 30
    while not all(any(e in line for line in api.logs(run_id)) for e in expected):
        assert time.monotonic() < deadline, api.logs(run_id)
        time.sleep(1)


# ---------------------------------------------------------------- the trainer as a child


def test_launcher_streams_lines_and_reports_a_failing_exit(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    script = "import sys\nprint('one')\nprint('two', file=sys.stderr)\nsys.exit(3)"
    seen: list[str] = []
    with caplog.at_level(logging.INFO), pytest.raises(CommandError, match="code 3") as error:
        run_command([sys.executable, "-c", script], logging.getLogger("t"), on_line=seen.append)
    assert seen == ["one", "two"]
    assert "two" in str(error.value)
    assert {"one", "two"} <= {r.getMessage() for r in caplog.records}


CHILD = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(signum, frame):
    print("SIGTERM: saving a checkpoint", flush=True)
    (out / "checkpoint").write_text("kept")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(out / "pid").write_text(str(os.getpid()))
step = 0
while True:
    step += 1
    print(f"step {step}", flush=True)
    time.sleep(0.2)
"""

SERVE_CHILD = """
import sys
from prefect import flow, get_run_logger
from flows.launcher import run_command

@flow(name="forge-test-child")
def child(script: str, out: str) -> None:
    run_command([sys.executable, script, out], get_run_logger(), stop_grace_s=10)

if __name__ == "__main__":
    child.serve(name="cancel")
"""


@pytest.mark.slow
def test_cancelling_from_the_ui_stops_the_child_with_sigterm(prefect_server: dict,
                                                             tmp_path: Path) -> None:
    api: Api = prefect_server["api"]
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "serve_child.py").write_text(SERVE_CHILD)
    command = [sys.executable, str(tmp_path / "serve_child.py")]
    with serving(prefect_server, "cancel", tmp_path / "serve.log", command=command,
                 flow="forge-test-child", PYTHONPATH=str(REPO)):
        run_id = api.run_deployment("forge-test-child", "cancel", {
            "script": str(tmp_path / "child.py"), "out": str(tmp_path)})
        deadline = time.monotonic() + 120
        while not any(line == "step 3" for line in api.logs(run_id)):
            assert time.monotonic() < deadline, api.flow_run(run_id)["state"]
            time.sleep(1)  # the child's lines stream into the run's logs
        pid = int((tmp_path / "pid").read_text())
        api.cancel(run_id)
        cancelled = api.wait(run_id, timeout_s=120)
        assert cancelled["state_type"] == "CANCELLED"
        assert (tmp_path / "checkpoint").read_text() == "kept"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


TINY_PRETRAIN = dict(preset="tiny", block_size=64, micro_batch_size=4, total_batch_tokens=256,
                     max_steps=6, warmup_steps=2, eval_every=3, eval_batches=2,
                     checkpoint_every=3, num_threads=1, sample_every=3, sample_tokens=8,
                     device="cpu")


TINY_FINETUNE = dict(data=[str(DATA / "instruct" / "rasbt-instruction-data.json")],
                     max_steps=3, micro_batch_size=4, eval_every=0, checkpoint_every=0,
                     num_threads=1, test_limit=2, test_max_new_tokens=8, device="cpu")


@pytest.mark.slow
def test_a_pretraining_cancelled_from_the_ui_ends_cancelled_with_its_loss_curve(
        prefect_server: dict, prepared: Path, tmp_path: Path) -> None:
    """The UI's Cancel during pretraining: the task shows Cancelled (not Crashed), the trainer
    checkpointed the step in flight, the report draws the loss curve of the steps trained, and
    no cached result claims the unfinished pretraining is done."""
    api: Api = prefect_server["api"]
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    config = small_config(tmp_path / "c.yaml", work)
    raw = yaml.safe_load(config.read_text())
    raw["pretrain"] = {**TINY_PRETRAIN, "max_steps": 100_000, "checkpoint_every": 0,
                       "eval_every": 5, "sample_every": 0}
    config.write_text(yaml.safe_dump(raw))
    with serving(prefect_server, "cancel-pretrain", tmp_path / "serve.log", flow="pretrain"):
        run_id = api.run_deployment("pretrain", "cancel-pretrain", {"config_file": str(config)})
        deadline = time.monotonic() + 180
        while not any("step 8/" in line for line in api.logs(run_id)):
            assert time.monotonic() < deadline, api.flow_run(run_id)["state"]
            time.sleep(1)
        api.cancel(run_id)
        cancelled = api.wait(run_id, timeout_s=120)
    assert cancelled["state_type"] == "CANCELLED", cancelled["state"]["message"]
    assert [(t["name"], t["state_name"]) for t in api.task_runs(run_id)] == [
        ("pretrain", "Cancelled")]
    out = work / "pretrain"
    assert not (out / "manifest.json").exists()
    assert list((out / "checkpoints").glob("ckpt-*.pt"))  # the stop's checkpoint
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    (report,) = [a for a in api.artifacts(run_id) if a["type"] == "markdown"]
    assert "data:image/png;base64" in report["data"]
    assert "Stopped by cancellation after step" in report["data"]
    cache = WorkFolder(work).prefect_cache
    assert not cache.exists() or not list(cache.glob("pretrain-*"))  # a rerun resumes training


@pytest.mark.slow
def test_forge_run_builds_on_the_server_then_reruns_cached_on_an_embedded_one(
        prefect_server: dict, prepared: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    config = small_config(tmp_path / "c.yaml", work)
    raw = yaml.safe_load(config.read_text())
    raw["pretrain"] = TINY_PRETRAIN
    raw["finetune"] = TINY_FINETUNE
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "cli.main", "run", "--config", str(config),
               "--home", str(prefect_server["home"])]
    result = subprocess.run(command, cwd=REPO, env=client_env(prefect_server),
                            capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "forge: done" in result.stdout
    manifest = json.loads((work / "pretrain" / "manifest.json").read_text())
    assert manifest["steps"] == 6 and manifest["dataset_fingerprint"] == fingerprint(prepared)

    api: Api = prefect_server["api"]
    (pretrain_run,) = api.post("/flow_runs/filter", json={
        "flows": {"name": {"any_": ["pretrain"]}}, "sort": "START_TIME_DESC", "limit": 1}).json()
    logs = api.logs(pretrain_run["id"])
    assert any("step 6/6" in line for line in logs)  # the trainer's lines, streamed
    artifacts = api.artifacts(pretrain_run["id"])
    report = next(a for a in artifacts if a["type"] == "markdown")
    assert "val loss" in report["data"] and "data:image/png;base64" in report["data"]
    assert "Step 6" in report["data"]  # the final sample
    assert [a["data"] for a in artifacts if a["type"] == "progress"] == [100]
    tuned = json.loads((work / "finetune" / "manifest.json").read_text())
    assert tuned["steps"] == 3
    assert "Instruction:" in result.stdout and "Assistant:" in result.stdout
    (finetune_run,) = api.post("/flow_runs/filter", json={
        "flows": {"name": {"any_": ["finetune"]}}, "sort": "START_TIME_DESC", "limit": 1}).json()
    (answers,) = [a for a in api.artifacts(finetune_run["id"]) if a["type"] == "markdown"]
    assert "Answers to held-out instructions" in answers["data"] and "**Model:**" in answers["data"]

    no_server = client_env(prefect_server)
    del no_server["PREFECT_API_URL"]
    embedded = subprocess.run(
        [*command[:-2], "--home", str(tmp_path / "home"), "--port", str(free_port())],
        cwd=REPO, env=no_server, capture_output=True, text=True, timeout=500)
    assert embedded.returncode == 0, embedded.stdout[-3000:] + embedded.stderr[-3000:]
    assert "embedded" in embedded.stdout
    assert (tmp_path / "home" / "prefect.db").exists()
    assert embedded.stdout.count("Cached") + embedded.stderr.count("Cached") >= 5
