"""The labelling app in a real browser (Debian's chromium, headless, through selenium): name yourself, open a
queue, rank 4 completions with the keyboard (a tie included), undo, rank again, export, and read the export
as a preference file. UPDATE_SCREENSHOTS=1 writes the screenshots the README shows (docs/ui-*.png)."""
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import free_port

from thinkforge.preferences import read_preferences
from thinkforge.ui import UIConfig, create_app

# make test installs chromium when it can (as root); on CI a missing browser is a failure, not a skip
pytestmark = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")) and not os.environ.get("CI"),
                                reason="needs chromium and chromedriver (make test installs them as root)")
EVIL = "<script>document.title='pwned'</script>"
ITEMS = [{"prompt": f"What is {a}*3?", "completions": [
    f"<think>\n{a}*3 = {3 * a}\n</think>\n<answer>{3 * a}</answer>", f"<answer>{3 * a + 1}</answer>",
    f"<think>\n{a} times 3 {EVIL}\n</think>\n<answer>{3 * a}</answer>", "<answer>no idea</answer>"]} for a in (12, 47)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import uvicorn

    base = tmp_path_factory.mktemp("ui")
    db, runs = base / "labels.sqlite", base / "runs"
    (runs / "grpo").mkdir(parents=True)
    (runs / "grpo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "reward": 0.1 * i, "loss": 1 / (i + 1), "seen_tokens": 512, "step_time": 1.0}) + "\n"
        for i in range(5)))
    (runs / "grpo" / "traces.jsonl").write_text("".join(json.dumps({
        "batch": 0, "problem_id": "p1", "question": "What is 12*3?", "gold": "36", "sample": i, "completion": c,
        "thinking": c.split("</think>")[0].removeprefix("<think>\n") if "</think>" in c else None,
        "answer": c.split("<answer>")[1].split("</answer>")[0], "correct": i in (0, 2), "majority": "36",
        "finish_reason": "stop", "tokens": 20, "thinking_tokens": 8, "forced_tokens": 0,
        "reward": float(i in (0, 2)), "rewards": {"accuracy": float(i in (0, 2))}}) + "\n"
        for i, c in enumerate(ITEMS[0]["completions"])))
    app = create_app(UIConfig(db=str(db), runs=str(runs)))
    app.state.runs = runs
    app.state.store.add_items("mul", ITEMS)
    app.state.store.add_items("steps", [{"question": "What is 47*3?", "completion":
                                         "<think>\n47*3 = 40*3 + 7*3\n= 120 + 24\n= 144\n</think>\n<answer>144</answer>"}],
                              mode="steps")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.store, runs
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1300"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield driver
    driver.quit()


def shot(driver, name, tmp_path):
    folder = Path(__file__).parent.parent / "docs" if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    driver.save_screenshot(str(folder / f"ui-{name}.png"))


def wait_for(driver, css, timeout=10):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def test_rank_with_the_keyboard_undo_and_export(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, store, _ = site
    browser.get(url + "/")
    wait_for(browser, "#labeller").send_keys("ana")
    shot(browser, "queues", tmp_path)
    browser.find_element(By.CSS_SELECTOR, "a.open").click()
    wait_for(browser, "#item")
    first = int(browser.find_element(By.ID, "item").get_attribute("data-item"))
    assert browser.title != "pwned"  # the completion's <script> is text on the page, not a script
    assert EVIL in browser.find_element(By.CSS_SELECTOR, ".card[data-k='2'] details").get_attribute("textContent")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("1", "3", "=", "2", "4")  # 1 best, then 3 and 2 tied, then 4
    assert browser.find_element(By.ID, "order-text").text == "1 > 3=2 > 4"
    shot(browser, "ranking", tmp_path)
    body.send_keys(Keys.ENTER)
    wait_for(browser, f"#item:not([data-item='{first}'])")
    labels = store.labels("mul")
    assert [(x["labeller"], x["item_id"], x["ranking"]) for x in labels] == [("ana", first, [0, 1, 1, 2])]
    browser.find_element(By.TAG_NAME, "body").send_keys("u")  # undo: back to the first item, label gone
    wait_for(browser, f"#item[data-item='{first}']")
    assert store.labels("mul") == []
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("2", "1", "3", "4", Keys.BACKSPACE, Keys.BACKSPACE, "4", "3")  # 2 > 1 > 4 > 3
    assert browser.find_element(By.ID, "order-text").text == "2 > 1 > 4 > 3"
    body.send_keys(Keys.ENTER)
    wait_for(browser, f"#item:not([data-item='{first}'])")
    browser.find_element(By.TAG_NAME, "body").send_keys("s")  # skip the second item
    wait_for(browser, "#done")
    browser.get(url + "/")
    link = wait_for(browser, "a[href*='format=rankings']").get_attribute("href")  # a download: fetch it as the page would
    text = browser.execute_async_script("fetch(arguments[0]).then(r => r.text()).then(arguments[1])", link)
    rows = [json.loads(x) for x in text.splitlines()]
    assert rows == [{"prompt": ITEMS[0]["prompt"], "completions": ITEMS[0]["completions"], "ranking": [1, 0, 3, 2],
                     "labeller": "ana"}]
    path = tmp_path / "export.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_preferences(path)[0].ranks == [1, 0, 3, 2]


def test_rank_by_dragging_cards(site, browser, tmp_path):
    """Real pointer drags (selenium's mouse actions): onto the order line = next rank, onto a ranked card = a tie,
    elsewhere = out of the order; the submitted ranking is what the line showed."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, store, _ = site
    browser.get(url + "/label/mul?labeller=ben")
    wait_for(browser, "#item")
    first = int(browser.find_element(By.ID, "item").get_attribute("data-item"))
    card = lambda k: browser.find_element(By.CSS_SELECTOR, f".card[data-k='{k}'] pre.answer")  # noqa: E731
    line = lambda: browser.find_element(By.ID, "order-text").text  # noqa: E731

    def drag(k, target):
        ActionChains(browser).move_to_element(card(k)).click_and_hold().move_by_offset(0, 12) \
            .move_to_element(target).release().perform()

    drag(2, browser.find_element(By.ID, "order"))
    assert line() == "3"
    drag(0, browser.find_element(By.ID, "order"))
    drag(3, card(0))  # onto a ranked card: tied with it
    assert line() == "3 > 1=4"
    drag(1, browser.find_element(By.ID, "order"))
    drag(2, browser.find_element(By.ID, "prompt"))  # dropped outside: out of the order
    assert line() == "1=4 > 2"
    drag(2, browser.find_element(By.ID, "order"))
    assert line() == "1=4 > 2 > 3"
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)
    wait_for(browser, f"#item:not([data-item='{first}'])")
    assert [x["ranking"] for x in store.labels("mul") if x["labeller"] == "ben"] == [[0, 1, 2, 0]]


def test_a_run_curve_updates_live(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, runs = site
    browser.get(url + "/runs")
    wait_for(browser, "a[href='/run/grpo']").click()
    curve = wait_for(browser, "polyline.curve")
    assert browser.find_element(By.ID, "metric").get_attribute("value") == "reward"
    assert len(curve.get_attribute("points").split()) == 5
    shot(browser, "run", tmp_path)
    with (runs / "grpo" / "metrics.jsonl").open("a") as f:  # the run goes on: two more steps
        for i in (5, 6):
            f.write(json.dumps({"step": i, "reward": 0.1 * i, "loss": 1 / (i + 1), "seen_tokens": 512, "step_time": 1.0}) + "\n")
    WebDriverWait(browser, 15).until(
        lambda d: len(d.find_element(By.CSS_SELECTOR, "polyline.curve").get_attribute("points").split()) == 7)
    assert browser.find_element(By.ID, "live").text == "live"


def test_a_trace_page_folds_thinking_and_shows_scripts_as_text(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _, _ = site
    browser.get(url + "/run/grpo")
    wait_for(browser, "a[href='/traces/grpo']").click()
    wait_for(browser, "a.problem").click()
    cards = wait_for(browser, ".card") and browser.find_elements(By.CSS_SELECTOR, ".card")
    assert len(cards) == 4 and [("right" in c.get_attribute("class")) for c in cards] == [True, False, True, False]
    thinking = cards[2].find_element(By.CSS_SELECTOR, "pre.thinking")
    assert not thinking.is_displayed()  # folded until asked
    cards[2].find_element(By.TAG_NAME, "summary").click()
    assert thinking.is_displayed() and EVIL in thinking.text and browser.title != "pwned"
    shot(browser, "trace", tmp_path)


def test_mark_steps_and_the_first_error(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, store, _ = site
    browser.get(url + "/label/steps?labeller=bo")
    wait_for(browser, ".step")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".step")) == 4
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("g", "b", "b")  # 7*3 is 21, not 24: the second step is the first error
    browser.find_element(By.CSS_SELECTOR, "button.m[data-i='3'][data-m='-1']").click()  # the answer, by mouse
    assert browser.find_element(By.ID, "first-error").text == "step 2"
    shot(browser, "steps", tmp_path)
    body.send_keys(Keys.ENTER)
    wait_for(browser, "#done")
    (x,) = [x for x in store.labels("steps")]
    assert (x["labeller"], x["kind"], x["ranking"]) == ("bo", "steps", [1, -1, -1, -1])
