"""What users look at, in a real headless Chromium: the MLflow UI over a store with two tiny runs, and the HTML page
of `dvc plots diff`. Nothing is fetched beyond 127.0.0.1 (the browser resolves no other host). Screenshots are kept
in each test's temporary folder. Skipped, with the line that installs it, where there is no Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, copy_tiny_data, mlflow_server, write_params

from flannel_repro.core.config import load_params
from flannel_repro.tracking.mlflow_store import training_runs_url
from flannel_repro.training.loop import train
from flannel_repro.training.stage import run_train_stage, write_reports

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
INSTALL = "no Chromium here: install it with `apt-get install -y chromium chromium-driver` (Debian; .ci/run does)"
DRIFT_TITLE = "Token drift: mean ||W_t - W_initial|| of live and dead tokens"  # dvc.yaml


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Debian's chromedriver (named explicitly: Selenium downloads nothing)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(INSTALL)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--window-size=1500,1000",
                # every host but 127.0.0.1 fails to resolve: the pages must work offline, and nothing leaves
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # MLflow's assistant panel opens itself on a first visit and covers the charts; mark it as already shown.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
        "source": "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"})
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, what: str, check: Callable[[], object], timeout: float = 30):
    """Poll `check` until it returns something truthy; fail naming `what`, with the page's text, if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            text = driver.execute_script("return document.body ? document.body.innerText : ''")
            pytest.fail(f"{what} not shown within {timeout} s at {driver.current_url}; the page reads:\n{text[:2000]}")
        time.sleep(0.25)


def page_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def test_mlflow_opens_on_the_training_runs_with_loss_and_drift_charts(browser, tmp_path, tiny_data):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By

    # Two tiny runs (seeds 42 and 43) in a project's SQLite store, seed 42's audited, then `mlflow server` over it.
    project = tmp_path / "project"
    copy_tiny_data(tiny_data, project)
    run_ids = []
    for seed in (42, 43):
        write_params(project, {"train": {"train_seed": seed}, "tracking": {"enabled": True, "uri": "sqlite:///mlflow.db"}})
        run_ids.append(run_train_stage(load_params(project / "params.yaml"), project, progress=False)[1])
        if seed == 42:
            audit = subprocess.run([sys.executable, "-m", "flannel_repro", "verify"], cwd=project,
                                   capture_output=True, text=True, timeout=600)
            assert audit.returncode == 0, audit.stdout + audit.stderr
    run_id = run_ids[-1]
    with mlflow_server(tmp_path, f"sqlite:///{project / 'mlflow.db'}") as uri:
        client = MlflowClient(uri)
        runs = tuple(client.get_run(i).info.run_name for i in run_ids)
        # Each name says what differs: the seed, the steps, the device, a short digest of the recorded numbers.
        assert [name.rsplit("-", 1)[0] for name in runs] == ["flannel7-seed42-6steps-cpu", "flannel7-seed43-6steps-cpu"]
        [audit_run] = client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{run_ids[0]}'")
        # The page `flannel-repro train` prints: the experiment, on its training runs (not the GenAI overview).
        browser.get(training_runs_url(uri, run_id))
        wait_for(browser, "both runs", lambda: all(name in page_text(browser) for name in runs))
        assert "/#/experiments/1/runs" in browser.current_url
        mode = browser.find_element(By.CSS_SELECTOR, "input[name=runs-view-mode][value=TABLE]")
        assert mode.get_attribute("checked"), "the runs table is the view shown"
        text = page_text(browser)
        assert "Model training" in text and "Token Usage" not in text and "Usage" not in text.split()
        assert audit_run.info.run_name not in text, "the audit is nested under its run, not a sibling in the table"
        browser.save_screenshot(str(tmp_path / "mlflow_runs.png"))

        # The chart view: loss and drift of live and of dead tokens, one curve per run.
        browser.execute_script("document.querySelector('input[name=runs-view-mode][value=CHART]').click()")
        search = wait_for(browser, "the chart search box", lambda: browser.find_elements(
            By.CSS_SELECTOR, "input[placeholder='Search metric charts']"))[0]
        search.send_keys("^(loss|drift)")  # a regular expression over the metric names
        legends = [f"{run} ({chart})" for chart in ("loss", "drift_live", "drift_dead") for run in runs]
        wait_for(browser, "the loss and drift charts of both runs",
                 lambda: all(legend in page_text(browser) for legend in legends))
        assert "Model metrics (3)" in page_text(browser).replace("\n", " ")  # those three charts, no other
        browser.save_screenshot(str(tmp_path / "mlflow_charts.png"))

        # The audited run's page shows its verdict as a tag; the audit's page names the run it audited as parent.
        browser.get(f"{uri}/#/experiments/1/runs/{run_ids[0]}")
        wait_for(browser, "the verdict tag", lambda: "flannel.verdict" in page_text(browser)
                 and "identical" in page_text(browser))
        browser.save_screenshot(str(tmp_path / "mlflow_audited_run.png"))
        browser.get(f"{uri}/#/experiments/1/runs/{audit_run.info.run_id}")
        wait_for(browser, "the audit's parent run", lambda: "Parent run" in page_text(browser)
                 and runs[0] in page_text(browser))
        browser.save_screenshot(str(tmp_path / "mlflow_audit_run.png"))


def vega_bundle(out: Path) -> None:
    """Vega, Vega-Lite and Vega-Embed as one local script (the page's own copies come from a CDN, unreachable here),
    drawing SVG so the page's text (titles, legends) can be read back."""
    vl_convert = pytest.importorskip("vl_convert", reason="pip install -e '.[test]' (vl-convert-python)")
    snippet = "window.vegaEmbed = (el, spec, opts) => vegaEmbed(el, spec, {renderer: 'svg', ...opts});"
    out.write_text(vl_convert.javascript_bundle(snippet), encoding="utf-8")


def dvc(*args: str, cwd: Path) -> str:
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def git(*args: str, cwd: Path) -> None:
    ident = ["-c", "user.name=Flannel Tests", "-c", "user.email=tests@flannel.invalid"]
    subprocess.run(["git", *ident, *args], cwd=cwd, check=True, capture_output=True)


def test_dvc_plots_draw_live_against_dead_drift_for_two_experiments(browser, tmp_path, tiny_data):
    from selenium.webdriver.common.by import By

    # The project's dvc.yaml with the per-step CSV of seed 42 committed and seed 43's in the workspace.
    project = tmp_path / "project"
    copy_tiny_data(tiny_data, project)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    git("init", "-q", cwd=project)
    dvc("init", "-q", cwd=project)
    for seed in (42, 43):
        params = load_params(write_params(project, {"train": {"train_seed": seed}}))
        write_reports(params, train(params, project, progress=False), project)
        if seed == 42:
            git("add", "dvc.yaml", "params.yaml", ".dvc", params.paths.loss_curve, cwd=project)
            git("commit", "-qm", "seed 42", cwd=project)

    template = tmp_path / "offline.html"  # DVC's page, with the scripts from beside it instead of the CDN
    template.write_text('<!DOCTYPE html><html><head><title>DVC Plot</title><script src="vega.js"></script></head>'
                        "<body>{plot_divs}</body></html>")
    out = tmp_path / "plots"
    dvc("plots", "diff", "HEAD", "--html-template", str(template), "-o", str(out), cwd=project)
    vega_bundle(out / "vega.js")

    browser.get((out / "index.html").as_uri())
    drift = "#token_drift svg"
    wait_for(browser, "the drift plot", lambda: browser.find_elements(By.CSS_SELECTOR, drift))
    texts = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' text')).map(t => t.textContent)", drift)
    assert DRIFT_TITLE in texts
    # Legends: the colour is the revision (seed 42 committed, seed 43 in the workspace), the dash the token kind.
    assert {"HEAD", "workspace", "drift_live", "drift_dead"} <= set(texts), texts
    # DVC's first layer draws the curves: one per revision and token kind, each its own colour and dash.
    lines = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' .layer_0_layer_0_marks path'))"
        ".map(p => [p.getAttribute('stroke'), p.getAttribute('stroke-dasharray'), p.getAttribute('d')])", drift)
    assert len(lines) == 4 and len({(stroke, dash) for stroke, dash, _ in lines}) == 4, lines
    assert len({d for *_, d in lines}) == 4, "four different curves"
    browser.find_element(By.CSS_SELECTOR, "#token_drift").screenshot(str(tmp_path / "dvc_drift.png"))
