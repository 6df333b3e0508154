"""Screenshots of the board's main views for docs/board.md, from real run folders.

    python tests/board/screenshots.py runs docs/board [RUN ...]

RUNS_DIR is what `tunelab board --runs-dir` would show; the RUNs (ids as the board lists them,
default: the first two) are ticked for the curves and the comparison, and the first one answers
in the chat. Needs selenium, chromium and chromedriver (see browser.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from browser import board_page, click, missing, wait_for

from tunelab.board.app import create_app
from tunelab.board.runs import find_runs

REPO = Path(__file__).resolve().parents[2]


def shoot(driver, out: Path, name: str) -> None:
    time.sleep(0.5)  # let the last fetch paint
    driver.save_screenshot(str(out / f"{name}.png"))
    print(f"wrote {out / name}.png")


def main(runs_dir: str, out_dir: str, picked: list[str]) -> int:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    if missing():
        print(missing(), file=sys.stderr)
        return 2
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    picked = picked or [r.name for r in find_runs(Path(runs_dir)) if r.status == "finished"][:2]
    with board_page(create_app(Path(runs_dir))) as (driver, url):
        driver.set_window_size(1500, 950)
        driver.get(url)
        wait_for(driver, "tr.run", count=len(picked))
        for run in picked:
            click(driver, f"tr.run[data-run='{run}'] input.pick")
        wait_for(driver, "svg#curves path.curve", count=len(picked))
        shoot(driver, out, "curves")
        click(driver, ".tab[data-view=compare]")
        wait_for(driver, "#config-diff")
        shoot(driver, out, "compare")
        click(driver, ".tab[data-view=examples]")
        wait_for(driver, "#examples-table, #examples-out p", timeout=60)
        shoot(driver, out, "examples")
        click(driver, ".tab[data-view=chat]")
        Select(driver.find_element(By.CSS_SELECTOR, "#chat-run")).select_by_value(picked[0])
        driver.find_element(By.CSS_SELECTOR, "#chat-input").send_keys("Convert 12 inches to centimetres.")
        click(driver, "#chat-send")
        wait_for(driver, "#chat-log .msg.assistant", timeout=600)
        shoot(driver, out, "chat")
        click(driver, ".tab[data-view=launch]")
        box = driver.find_element(By.CSS_SELECTOR, "#config-text")
        box.clear()
        box.send_keys("examples/quickstart.yaml\nlearning_rate=2e-4\noutput_dir=runs/from-board\n")
        click(driver, "#btn-preview")
        wait_for(driver, "#sample", timeout=300)
        shoot(driver, out, "preview")
        click(driver, "#btn-estimate")
        wait_for(driver, "#estimate-total", timeout=120)
        shoot(driver, out, "estimate")
        box.send_keys("lora_rnak=16\n")
        click(driver, "#btn-launch")
        wait_for(driver, "#form-error")
        shoot(driver, out, "launch-error")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
