"""The MLflow UI as users see it: two trained methods, `vlcl ui`, Debian's Chromium via Playwright.

Trains two methods on a two-task digits stream (Ray Train, CPU), starts `vlcl ui` on a free port,
opens the link it prints and checks that both runs and their per-task metric charts are there,
then opens one run and checks that matrix.png is displayed among its artifacts. Screenshots go
under the test's tmp_path; their paths are printed (`pytest -s` shows them).

The MLflow UI polls the server forever, so pages are loaded with wait_until="load" and the test
then waits for the elements it needs; it never depends on dismissing first-visit pop-ups.
"""
import importlib.util
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("finetune", "lwf")
UI_TIMEOUT_MS = 90_000

pytestmark = [
    pytest.mark.browser, pytest.mark.slow, pytest.mark.ray,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is missing: apt-get install -y chromium"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="Playwright is missing: pip install playwright (the `test` extra); never `playwright install`"),
]


@pytest.fixture(scope="module")
def trained_runs(ray_session, digits_manifest, tmp_path_factory):
    """Two methods, one seed each, on the first two digit tasks, in a private sqlite store."""
    from orchestrator.config import load_run_config
    from orchestrator.run import run_sequence
    from streams.manifest import load_stream, write_manifest

    spec = load_stream(digits_manifest)
    manifest = write_manifest(spec.model_copy(update={"name": "digits2", "tasks": spec.tasks[:2]}),
                              digits_manifest.parent / "digits2.yaml")
    root = tmp_path_factory.mktemp("ui-runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    results = []
    for method in METHODS:
        config = load_run_config(None, [
            f"stream={manifest}", f"method.name={method}", f"output_dir={root / 'runs'}", f"tracking.uri={uri}",
            "train.batch_size=32", "train.max_steps_per_task=3", "train.cpus_per_worker=0.5",
            "train.shuffle_buffer=64", "tracking.checkpoints=none"])
        results.append(run_sequence(config, quiet=True))
    assert len({r.experiment_id for r in results}) == 1
    return {"uri": uri, "results": results, "run_names": [f"{m}-digits2-s0" for m in METHODS]}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class UIProcess:
    """`vlcl ui` as a user runs it; its stdout lines are read on a thread so waits can time out."""

    def __init__(self, tracking_uri: str, port: int, cwd: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port), "--tracking-uri", tracking_uri],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_line(self, needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"`vlcl ui` printed no line with {needle!r}; output so far:\n" + "\n".join(self.seen))

    def server_pid(self) -> int | None:
        for line in self.seen:
            if line.startswith("MLflow server pid "):
                return int(line.split()[3])
        return None

    def interrupt(self) -> int:
        """Ctrl-C, as a user stops it; returns the exit code."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        pid = self.server_pid()
        if self.process.poll() is None:
            self.process.kill()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)  # the server leads its own process group
            except ProcessLookupError:
                pass


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def test_runs_and_charts_in_the_mlflow_ui(trained_runs, tmp_path):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    ui = UIProcess(trained_runs["uri"], port, tmp_path)
    screenshots = []
    try:
        link = ui.wait_for_line("/#/experiments/", timeout_s=240).split(": ", 1)[1].strip()
        experiment_id = trained_runs["results"][0].experiment_id
        assert link == (f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
                        "?workflowType=machine_learning&compareRunsMode=CHART")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(UI_TIMEOUT_MS)
                try:
                    _check_pages(page, link, trained_runs, tmp_path, screenshots)
                except Exception:
                    page.screenshot(path=tmp_path / "failure.png")
                    (tmp_path / "failure.txt").write_text(page.url + "\n" + page.inner_text("body"))
                    print(f"UI check failed; page saved to {tmp_path / 'failure.png'} and failure.txt")
                    raise
            finally:
                browser.close()
        for path in screenshots:
            assert path.stat().st_size > 10_000
            print(f"screenshot: {path}")

        # Ctrl-C stops the UI and its server.
        assert ui.interrupt() == 0
        assert not _answers(f"http://127.0.0.1:{port}/health")
    finally:
        ui.kill()


def _check_pages(page, link: str, trained_runs: dict, tmp_path: Path, screenshots: list) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)  # its own default is 5 s; the first render is slower here
    first_task = trained_runs["results"][0].tasks[0]
    page.goto(link, wait_until="load")
    # Both runs in the runs table.
    for name in trained_runs["run_names"]:
        expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()
    # Per-task charts, one curve (legend entry) per run. Sections below the fold render lazily, so
    # each chart is brought up the way a user finds it: through the chart search box.
    for metric in (f"eval/{first_task}/score", "cl/seen_avg"):
        page.get_by_placeholder("Search metric charts").fill(metric)
        expect(page.get_by_text(metric, exact=True).first).to_be_visible()
        for name in trained_runs["run_names"]:
            expect(page.get_by_text(f"{name} ({metric})").first).to_be_visible()
        screenshots.append(tmp_path / f"runs_chart_{metric.replace('/', '_')}.png")
        page.screenshot(path=screenshots[-1])

    # One run's page: matrix.png among its artifacts, displayed as an image.
    run_name = trained_runs["run_names"][0]
    page.get_by_role("link", name=run_name, exact=True).first.click()
    page.get_by_role("tab", name="Artifacts").or_(page.get_by_text("Artifacts", exact=True)).first.click()
    page.get_by_text("matrix.png", exact=True).first.click()
    image = page.locator('img[alt="matrix.png"]').first
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=image.element_handle())
    assert trained_runs["results"][0].run_id in page.url
    screenshots.append(tmp_path / "run_artifacts_matrix_png.png")
    page.screenshot(path=screenshots[-1])
