"""The board in a real browser (headless Chromium through Selenium): the runs list, two runs'
curves, the chat playground, and our error text for a bad config in the launch form."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import board_page, click, missing, wait_for
from fake_runs import fake_run, tiny_trained_run

from tunelab.board.app import create_app

REPO = Path(__file__).resolve().parents[2]
TOKEN = "browser-token"

pytestmark = [pytest.mark.skipif(missing() is not None, reason=f"no browser test: {missing()}"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_model_dir):
    runs = tmp_path_factory.mktemp("runs")
    fake_run(runs / "lr-1e-4", lr=1e-4, rate=0.05)
    fake_run(runs / "lr-5e-4", lr=5e-4, rate=0.2)
    tiny_trained_run(tiny_model_dir, tmp_path_factory.mktemp("data"), runs / "tiny")
    with board_page(create_app(runs, token=TOKEN)) as (driver, url):
        driver.get(url + f"?token={TOKEN}")
        yield driver


def by(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def test_runs_list_renders(page):
    rows = wait_for(page, "tr.run", count=3)
    assert {r.get_attribute("data-run") for r in rows} == {"lr-1e-4", "lr-5e-4", "tiny"}
    assert all(r.text.split()[1] == "finished" for r in rows)


def test_selecting_two_runs_draws_both_curves(page):
    wait_for(page, "tr.run", count=3)
    click(page, ".tab[data-view=curves]")
    for run in ("lr-1e-4", "lr-5e-4"):
        click(page, f"tr.run[data-run='{run}'] input.pick")
    curves = wait_for(page, "svg#curves path.curve", count=4)  # train + eval loss of each
    assert {c.get_attribute("data-run") for c in curves} == {"lr-1e-4", "lr-5e-4"}
    assert len({c.get_attribute("stroke") for c in curves}) == 2  # one colour a run
    by(page, ".tab[data-view=compare]").click()
    diff = wait_for(page, "#config-diff")[0]
    assert "learning_rate" in diff.text and "lora_rank" not in diff.text


def test_chat_playground_returns_an_answer(page):
    wait_for(page, "tr.run", count=3)
    by(page, ".tab[data-view=chat]").click()
    from selenium.webdriver.support.ui import Select

    Select(by(page, "#chat-run")).select_by_value("tiny")
    by(page, "#chat-tokens").clear()
    by(page, "#chat-tokens").send_keys("5")
    by(page, "#chat-input").send_keys("Hello!")
    by(page, "#chat-send").click()
    answer = wait_for(page, "#chat-log .msg.assistant", timeout=120)[0]
    assert answer.text.startswith("assistant:")
    assert "error" not in by(page, "#chat-log").get_attribute("innerHTML")


def test_a_bad_config_in_the_launch_form_shows_our_error(page):
    wait_for(page, "tr.run", count=3)
    by(page, ".tab[data-view=launch]").click()
    box = by(page, "#config-text")
    box.clear()
    box.send_keys(f"{REPO / 'examples' / 'quickstart.yaml'}\nlora_rnak=16\n")
    for button in ("#btn-check", "#btn-launch"):
        by(page, button).click()
        error = wait_for(page, "#form-error")[0]
        assert "unknown key 'lora_rnak'" in error.text and "did you mean 'lora_rank'?" in error.text
    assert "training into" not in by(page, "#form-result").text
