"""JupyterLab as a person uses it: `python lab.py`, double-click a notebook, Run All Cells, read the outputs.

Drives Debian's Chromium with Selenium (apt: chromium chromium-driver; .ci/run installs them). The server
is the project's own command (lab.py: its settings, jupytext's notebook viewer), on 127.0.0.1 and a free
port with a token, serving a copy of notebooks/ so the repository is never written; Jupyter's config,
data, runtime, settings and workspace folders, HOME and TMPDIR all point into pytest's tmp_path.
Only generic notebook behaviour is checked, never what a cell says.
"""

from __future__ import annotations

import difflib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip("needs Debian's /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("selenium", reason="needs selenium (requirements.txt; or pip install -e '.[test]')")
pytest.importorskip("jupyterlab", reason="needs JupyterLab (requirements.txt; or pip install -e '.[lab]')")

from html_scripts import script_srcs  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

pytestmark = pytest.mark.slow

SERVER_START_S = 120  # a cold start of the server on a busy 2-core machine
PAGE_S = 120  # JupyterLab's page up to a populated file browser
OPEN_S = 60  # double-click to a notebook with its kernel idle
RUN_S = {"01_data.py": 300, "03_training.py": 600}  # Run All Cells on the CPU: typically ~10 s and ~30 s
SAVE_S = 60
NOTEBOOKS = list(RUN_S)
# As run_all.py does through papermill: a cell after the one tagged "parameters" overrides some of them.
# 03's defaults train a whole epoch (62 steps of 2048 tokens, minutes on a 2-core CPU); a few steps show the
# same thing. Should the name change, the override is an unused variable and the test is only slower.
# The cell is deleted again before the save, so the saved file must equal the committed one.
INJECTED = {"03_training.py": "max_steps = 4  # injected by tests/test_jupyterlab.py"}


# ------------------------------------------------------------------ helpers --

def wait_for(check, what: str, timeout: float, interval: float = 0.25):
    """check() until it returns something truthy; WebDriver hiccups (stale nodes, a click that landed
    on an overlay) count as 'not yet'. Fails naming what it waited for and the last error."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            result = check()
            if result:
                return result
        except WebDriverException as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f" (last WebDriver error: {type(last).__name__}: {str(last).splitlines()[0]})"
                                    if last else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """`python lab.py` on 127.0.0.1 with a throwaway home; stopped through its own shutdown API."""

    def __init__(self, base: Path):
        self.base = base
        self.root = base / "notebooks"  # a copy: saving must not touch the repository
        self.root.mkdir()
        self.originals = {}
        for nb in sorted((REPO / "notebooks").glob("*.py")):
            shutil.copy2(nb, self.root / nb.name)
            self.originals[nb.name] = nb.read_text()
        self.tmp = base / "tmp"
        self.tmp.mkdir()
        self.token = secrets.token_hex(16)
        self.log_path = base / "lab.log"
        env = dict(os.environ)
        for var, sub in [("HOME", "home"), ("TMPDIR", "tmp"), ("JUPYTER_CONFIG_DIR", "jupyter/config"),
                         ("JUPYTER_DATA_DIR", "jupyter/data"), ("JUPYTER_RUNTIME_DIR", "jupyter/runtime"),
                         ("JUPYTERLAB_SETTINGS_DIR", "jupyter/lab-user-settings"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "jupyter/lab-workspaces"), ("IPYTHONDIR", "ipython"),
                         ("XDG_CONFIG_HOME", "xdg/config"), ("XDG_DATA_HOME", "xdg/data"),
                         ("XDG_CACHE_HOME", "xdg/cache"), ("LORALAB_OUTPUTS", "outputs")]:
            (base / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(base / sub)
        env.pop("JUPYTER_PATH", None)
        env.pop("JUPYTER_CONFIG_PATH", None)
        self.env = env  # the notebooks write their outputs under LORALAB_OUTPUTS, not the repository's outputs/
        self.proc = None
        for _ in range(3):  # a free port can be taken between asking and binding: try another
            self.port = free_port()
            self._start()
            if self._wait_ready():
                return
            self.stop()
        raise AssertionError(f"JupyterLab did not start; its log ends:\n{self.log_tail()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self) -> None:
        cmd = [sys.executable, str(REPO / "lab.py"), "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--LabApp.expose_app_in_browser=True"]  # lets the test read cells' state from the page
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.base, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.3)
        return False

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:  # shuts its kernels down too
            req = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(req, timeout=10).close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - then by its id
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.log.close()


def chromium(user_data_dir: Path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={user_data_dir}", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the pages make
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(PAGE_S)
    driver.set_script_timeout(60)
    return driver


def outside_requests(driver, allowed_prefixes: tuple[str, ...]) -> list[str]:
    """Network requests the pages made since the last call that leave the machine's allowed origins."""
    bad = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            if url.split(":", 1)[0] in ("http", "https", "ws", "wss") and not url.startswith(allowed_prefixes):
                bad.append(url[:200])
    return bad


# The page's own view of a document, through window.jupyterapp (--LabApp.expose_app_in_browser).
JS_DOC_STATE = """
const [name] = arguments;
const app = window.jupyterapp;
if (!app) return null;
for (const w of app.shell.widgets('main')) {
  if (!w.context || w.context.path.split('/').pop() !== name) continue;
  const nb = w.content && w.content.model && w.content.model.cells ? w.content : null;
  const cells = nb ? Array.from({length: nb.model.cells.length}, (_, i) => nb.model.cells.get(i)) : [];
  const kernel = w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return {
    id: w.id, current: app.shell.currentWidget === w, dirty: w.context.model.dirty,
    notebookPanel: w.node.classList.contains('jp-NotebookPanel'),
    kernel: kernel ? kernel.status : null,
    cells: cells.map(c => ({
      type: c.type,
      blank: c.sharedModel.getSource().trim() === '',
      count: c.type === 'code' ? c.executionCount : null,
      running: c.type === 'code' ? c.executionState === 'running' : false,
      outputs: c.type === 'code' ? c.outputs.toJSON().map(o => ({
        type: o.output_type, name: o.name || null, text: [].concat(o.text || []).join('').slice(-2000),
        ename: o.ename || null, evalue: o.evalue || null,
        plotly: !!(o.data && o.data['application/vnd.plotly.v1+json'])})) : [],
    })),
  };
}
return null;
"""

JS_DOM_STATE = """
const [id] = arguments;
const panel = document.getElementById(id);
if (!panel) return null;
const q = s => Array.from(panel.querySelectorAll(s));
return {
  cells: q('.jp-Cell').length,
  editors: q('.jp-FileEditor').length,
  prompts: q('.jp-CodeCell .jp-InputArea-prompt').map(e => e.textContent.trim()),
  stderr: q('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').map(e => e.textContent.slice(-2000)),
  plotlyOutputs: q('.jp-OutputArea-output.jp-RenderedPlotly').length,  // drawn by plotly's lab extension
  plotlyRendered: q('.jp-OutputArea-output.jp-RenderedPlotly.js-plotly-plot')
      .filter(e => e.querySelector('.plot-container svg.main-svg')).length,
  plotlyFromHtml: q('.jp-OutputArea-output.jp-RenderedHTML .plotly-graph-div').length,
};
"""


JS_INJECT = """
const [name, source] = arguments;
for (const w of window.jupyterapp.shell.widgets('main')) {
  if (!w.context || w.context.path.split('/').pop() !== name) continue;
  const model = w.content.model;
  for (let i = 0; i < model.cells.length; i++) {
    if ((model.cells.get(i).getMetadata('tags') || []).includes('parameters')) {
      model.sharedModel.insertCell(i + 1, {cell_type: 'code', source: source,
                                           metadata: {tags: ['injected-parameters']}});
      return i + 1;
    }
  }
  return -1;
}
return null;
"""

JS_REMOVE_INJECTED = """
const [name] = arguments;
for (const w of window.jupyterapp.shell.widgets('main')) {
  if (!w.context || w.context.path.split('/').pop() !== name) continue;
  const model = w.content.model;
  for (let i = model.cells.length - 1; i >= 0; i--)
    if ((model.cells.get(i).getMetadata('tags') || []).includes('injected-parameters')) model.sharedModel.deleteCell(i);
  return true;
}
return false;
"""


# ----------------------------------------------------------------- fixtures --

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = Lab(tmp_path_factory.mktemp("jupyterlab"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def browser(lab, chrome):
    chrome.get(f"{lab.url}/lab?token={lab.token}")
    wait_for(lambda: chrome.find_elements(By.CSS_SELECTOR, ".jp-DirListing-item"),
             "JupyterLab's file browser to list the notebooks", PAGE_S)
    return chrome


@pytest.fixture(scope="module")
def repo_untouched():
    """JupyterLab must leave nothing in the repository: no .ipynb, no .ipynb_checkpoints/ (it serves a copy)."""
    def litter():
        return sorted(p.relative_to(REPO).as_posix() for pattern in ("*.ipynb", ".ipynb_checkpoints")
                      for base in (REPO, REPO / "notebooks") for p in base.glob(pattern))
    before = litter()
    yield
    assert litter() == before, f"left in the repository: {sorted(set(litter()) - set(before))}"


# -------------------------------------------------------------------- tests --

def open_by_double_click(driver, name: str) -> dict:
    """Double-click the file in the file browser (again if the click got lost) until a document opens."""
    xpath = (f"//li[contains(@class,'jp-DirListing-item')]"
             f"[.//span[contains(@class,'jp-DirListing-itemText')]//*[normalize-space(text())='{name}']]")

    def attempt():
        state = driver.execute_script(JS_DOC_STATE, name)
        if state:
            return state
        item = driver.find_element(By.XPATH, xpath)
        ActionChains(driver).move_to_element(item).double_click(item).perform()
        return wait_for_quietly(lambda: driver.execute_script(JS_DOC_STATE, name), 10)

    return wait_for(attempt, f"{name} to open on a double-click", OPEN_S, interval=1)


def wait_for_quietly(check, timeout: float):
    try:
        return wait_for(check, "", timeout)
    except AssertionError:
        return None


def run_all_cells(driver, name: str, doc_id: str) -> None:
    """Run > Run All Cells from the menu bar, with the notebook as the current tab."""
    def attempt():
        driver.find_element(By.CSS_SELECTOR, f"li.lm-TabBar-tab[data-id='{doc_id}']").click()
        if not driver.execute_script(JS_DOC_STATE, name)["current"]:
            return False
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()  # close any menu left open
        driver.find_element(By.XPATH, "//li[contains(@class,'lm-MenuBar-item')]"
                                      "[.//div[contains(@class,'lm-MenuBar-itemLabel') and text()='Run']]").click()
        item = wait_for(lambda: driver.find_element(
            By.XPATH, "//ul[contains(@class,'lm-Menu-content')]/li[contains(@class,'lm-Menu-item')]"
                      "[not(contains(@class,'lm-mod-disabled'))]"
                      "[.//div[contains(@class,'lm-Menu-itemLabel') and text()='Run All Cells']]"),
            "the Run menu's 'Run All Cells'", 10)
        item.click()
        return wait_for_quietly(lambda: any(c["running"] or c["count"] is not None
                                            for c in driver.execute_script(JS_DOC_STATE, name)["cells"])
                                or "[*]:" in driver.execute_script(JS_DOM_STATE, doc_id)["prompts"], 30)

    wait_for(attempt, f"Run All Cells to start in {name}", 90, interval=1)


def finished(driver, name: str):
    """A check: the kernel idle and no cell queued or running, seen on two polls in a row."""
    seen = []

    def check():
        state = driver.execute_script(JS_DOC_STATE, name)
        done = state["kernel"] == "idle" and not any(c["running"] for c in state["cells"])
        seen.append(done)
        return state if seen[-2:] == [True, True] else None

    return check


def save(driver, name: str, doc_id: str, path: Path) -> None:
    """Ctrl+S in the notebook, as a person saves (autosave goes through the same save)."""
    before = path.stat().st_mtime_ns

    def attempt():
        driver.find_element(By.CSS_SELECTOR, f"li.lm-TabBar-tab[data-id='{doc_id}']").click()
        driver.find_element(By.CSS_SELECTOR, f"#{doc_id} .jp-Cell .jp-InputArea-prompt").click()  # command mode
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
        return wait_for_quietly(lambda: path.stat().st_mtime_ns != before
                                and not driver.execute_script(JS_DOC_STATE, name)["dirty"], 10)

    wait_for(attempt, f"{name} to be saved", SAVE_S, interval=1)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_runs_and_saves_in_jupyterlab(lab, browser, repo_untouched, name):
    t0 = time.monotonic()
    doc = open_by_double_click(browser, name)
    assert doc["notebookPanel"], f"{name} opened as a text editor, not as a notebook (lab/overrides.json)"
    dom = wait_for(lambda: (d := browser.execute_script(JS_DOM_STATE, doc["id"])) and d["cells"] and d,
                   f"{name}'s cells on the page", OPEN_S)
    assert dom["editors"] == 0
    wait_for(lambda: browser.execute_script(JS_DOC_STATE, name)["kernel"] == "idle",
             f"{name}'s kernel to start", OPEN_S)

    if name in INJECTED:
        assert browser.execute_script(JS_INJECT, name, INJECTED[name]) is not None
    t_run = time.monotonic()
    run_all_cells(browser, name, doc["id"])
    state = wait_for(finished(browser, name), f"Run All Cells to finish in {name}", RUN_S[name], interval=1)
    code = [c for c in state["cells"] if c["type"] == "code" and not c["blank"]]
    assert code, f"{name} has no code cells"

    errors = [f"cell {i}: {o['ename']}: {o['evalue']}" for i, c in enumerate(code) for o in c["outputs"]
              if o["type"] == "error"]
    errors += [f"cell {i}: {o['text'][-600:]}" for i, c in enumerate(code) for o in c["outputs"]
               if o["type"] == "stream" and o["name"] == "stderr" and "Traceback (most recent call last)" in o["text"]]
    assert not errors, f"{name}: error outputs:\n" + "\n".join(errors)
    not_run = [i for i, c in enumerate(code) if c["count"] is None]
    assert not not_run, f"{name}: code cells {not_run} of {len(code)} have no execution count after Run All"

    n_plotly = sum(o["plotly"] for c in code for o in c["outputs"])
    dom = wait_for(lambda: (d := browser.execute_script(JS_DOM_STATE, doc["id"]))["plotlyRendered"] >= n_plotly and d,
                   f"{name}'s {n_plotly} plotly figure(s) to render", 60)
    executed = [p for p in dom["prompts"] if p.startswith("[") and p.endswith("]:") and p[1:-2].isdigit()]
    assert len(executed) >= len(code), f"{name}: execution counts on the page: {dom['prompts']}"
    assert not [t for t in dom["stderr"] if "Traceback" in t], dom["stderr"]
    assert dom["plotlyOutputs"] == n_plotly and dom["plotlyFromHtml"] == 0, \
        f"{name}: figures drawn from their HTML, not by plotly's JupyterLab extension: {dom}"
    outside = outside_requests(browser, (lab.url, lab.url.replace("http", "ws", 1)))
    assert not outside, f"{name}: the page reached outside the machine: {outside[:10]}"

    t_ran = time.monotonic()
    if name in INJECTED:
        assert browser.execute_script(JS_REMOVE_INJECTED, name)
    save(browser, name, doc["id"], lab.root / name)
    saved, committed = (lab.root / name).read_text(), lab.originals[name]
    assert saved == committed, (f"saving {name} in JupyterLab changes it (header or jupytext round trip):\n"
                                + "".join(difflib.unified_diff(committed.splitlines(True), saved.splitlines(True),
                                                               "committed", "saved by JupyterLab")))
    assert not list(lab.root.rglob("*.ipynb")), "JupyterLab wrote an .ipynb beside the notebook"
    assert not (lab.root / ".ipynb_checkpoints").exists(), "checkpoints landed beside the notebooks"
    assert list(lab.tmp.glob(f"loralab-lab-checkpoints-*/{Path(name).stem}-checkpoint.py")), \
        "lab.py's checkpoint folder (in the system's temporary directory) holds no checkpoint"

    browser.execute_script("""const [name] = arguments;
        for (const w of window.jupyterapp.shell.widgets('main'))
          if (w.context && w.context.path.split('/').pop() === name) { w.sessionContext.shutdown(); w.close(); }""", name)
    print(f"{name}: opened in {t_run - t0:.0f} s, ran {len(code)} code cells ({n_plotly} plotly figures) in "
          f"{t_ran - t_run:.0f} s, saved; {time.monotonic() - t0:.0f} s in all")


# ------------------------------------------------- the HTML report, offline --

@pytest.fixture(scope="module")
def report_01(tmp_path_factory):
    """Notebook 01 as run_all.py runs it (papermill, then nbconvert's HTML)."""
    from loralab.notebooks import execute
    from loralab.run_folder import RunFolder

    run_dir = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:  # the kernel's connection file and profile: not in the user's home
        mp.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
        mp.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        record = execute("01", RunFolder(run_dir), {"run_dir": str(run_dir)})
    assert record["status"] == "ok", record
    return run_dir


def test_html_report_figures_render_offline(chrome, report_01):
    """plotly.js travels inside the report: the figures draw from a file:// page with no network."""
    chrome.get((report_01 / "01_data.html").as_uri())
    counts = wait_for(lambda: (c := chrome.execute_script(
        "const d = [...document.querySelectorAll('.plotly-graph-div')];"
        "return [d.length, d.filter(e => e.querySelector('svg.main-svg')).length];")) and c[0] and c[0] == c[1] and c,
        "the report's plotly figures to draw", 60)
    nb = json.loads((report_01 / "01_data.ipynb").read_text())
    html_outputs = [o["data"]["text/html"] for c in nb["cells"] for o in c.get("outputs", [])
                    if "text/html" in o.get("data", {})]
    html_outputs = ["".join(h) if isinstance(h, list) else h for h in html_outputs]
    srcs = [src for h in html_outputs for src in script_srcs(h)]
    assert not srcs, f"outputs load scripts from elsewhere (plotly's stock renderer adds MathJax from a CDN): {srcs}"
    chrome.get_log("performance")  # drop this page's entries
    print(f"01_data.html: {counts[1]} of {counts[0]} plotly figures drawn offline")


def test_html_report_page_reaches_nothing_outside(chrome, report_01):
    """notebooks.to_html drops the scripts nbconvert's lab template fetches from a CDN (require.js, MathJax, ...)."""
    chrome.get_log("performance")
    chrome.get((report_01 / "01_data.html").as_uri())
    time.sleep(1)
    outside = outside_requests(chrome, ("file://",))
    assert not outside, f"the report's page asks for {outside}"
