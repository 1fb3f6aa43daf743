"""The K-Sort Arena web server as users run it (`dilatequant arena serve` in its own process, over loopback):
voting, bad input, concurrent voters, a SIGKILL mid-vote, variants whose files changed, export, metric judges,
and a real browser (headless Chromium from Debian, driven by Selenium) voting in both modes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.engines.config import BuildConfig
from dilatequant.engines.engine import build
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export
from dilatequant.tools.arena.leaderboard import replay
from dilatequant.tools.arena.ratings import RATING_MODELS
from dilatequant.tools.arena.store import ArenaStore
from dilatequant.tools.cli import cli

TINY = {"samples": 16, "trajectories": 8, "steps": 4}
IMAGES = ["--images", "8", "--steps", "4"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "arena"  # screenshots, kept after the run


@pytest.fixture(scope="module")
def variants(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """One variant of each kind the loader takes: the FP model, two calibrations, ONNX Runtime engines."""
    root = tmp_path_factory.mktemp("arena-variants")
    model = tiny_model_dirs["unet"]
    w8a8 = calibrate(model, CalibConfig.from_bits("W8A8", method="minmax", **TINY), root / "w8a8", progress=False)
    w4a4 = calibrate(model, CalibConfig.from_bits("W4A4", method="minmax", **TINY), root / "w4a4", progress=False)
    engines = build(export(w8a8, ExportConfig(buckets=2, profile="ort-cpu"), root / "export", progress=False),
                    BuildConfig(fidelity="off"), root / "engines")  # fmt: skip
    return {"fp": model, "w8a8": w8a8, "w4a4": w4a4, "engines": engines}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Image options with one cache for the module's arenas (each has its own vote log): images are made once."""
    return [*IMAGES, "--gallery", str(tmp_path_factory.mktemp("arena-gallery"))]


def variant_args(variants: dict[str, Path]) -> list[str]:
    return [arg for name, path in variants.items() for arg in ("--variant", f"{name}={path}")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict | bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type()
    return status, json.loads(raw) if kind == "application/json" else raw


@contextmanager
def arena_server(variants: dict[str, Path], db: Path, images: list[str], *extra: str):
    """`dilatequant arena serve` in a subprocess; yields (base URL, process) once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "dilatequant.tools.cli", "arena", "serve", *variant_args(variants), "--db", str(db),
               "--reference", "fp", "--port", str(port), "--device", "cpu", *images, *extra]  # fmt: skip
    log = db.with_suffix(".log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise AssertionError(f"arena serve exited {process.returncode}: {db.with_suffix('.log').read_text()}")
            try:
                urllib.request.urlopen(base + "/api/leaderboard", timeout=5)
                break
            except OSError:
                time.sleep(0.2)
        yield base, process
    finally:
        process.kill()
        process.wait()
        log.close()


def vote_once(base: str, voter: str, rng: random.Random) -> tuple[str, int]:
    """Fetch a match and vote on it (best or rank at random); returns (match id, HTTP status)."""
    _, match = request(base + "/api/match")
    k = match["k"]
    if rng.random() < 0.5:
        body = {"match_id": match["match_id"], "mode": "best", "voter": voter, "best": [rng.randrange(k)]}
    else:
        places = list(range(k))
        rng.shuffle(places)
        body = {"match_id": match["match_id"], "mode": "rank", "voter": voter, "places": places}
    status, _ = request(base + "/api/vote", body)
    return match["match_id"], status


def replayed_mus(db: Path, rating: str = "k-sort") -> dict[str, float]:
    store = ArenaStore(db)
    try:
        ratings, _ = replay(store.votes(), list(store.variants()), RATING_MODELS[rating])
    finally:
        store.close()
    return {name: r.mu for name, r in ratings.items()}


def served_mus(base: str) -> dict[str, float]:
    return {row["name"]: row["mu"] for row in request(base + "/api/leaderboard")[1]["rows"]}


def test_a_vote_reveals_the_names_and_bad_votes_are_refused_with_nothing_recorded(variants, tmp_path, images):
    db = tmp_path / "arena.sqlite"
    with arena_server(variants, db, images) as (base, _):
        status, match = request(base + "/api/match")
        assert status == 200 and match["k"] == 4 and len(match["images"]) == 4
        assert not any(name in json.dumps(match) for name in ("w8a8", "w4a4", "engines"))  # anonymous until voted
        assert request(base + match["images"][0])[1][:8] == b"\x89PNG\r\n\x1a\n"
        body = {"match_id": match["match_id"], "mode": "best", "voter": "v-1", "best": [2]}
        status, reveal = request(base + "/api/vote", body)
        assert status == 200 and sorted(reveal["names"]) == sorted(variants) and reveal["places"][2] == 0
        _, other = request(base + "/api/match")
        good = {"match_id": other["match_id"], "mode": "rank", "voter": "v-1", "places": [0, 1, 2, 3]}
        refused = {
            "replayed": (body, 409, "voted already"),
            "unknown match": ({**good, "match_id": "0" * 32}, 404, "No match"),
            "place out of range": ({**good, "places": [0, 1, 2, 7]}, 422, "one place 0..3"),
            "too few places": ({**good, "places": [0, 1]}, 422, "4 in all"),
            "all tied": ({**good, "places": [1, 1, 1, 1]}, 422, "no order"),
            "best position out of range": ({**good, "mode": "best", "places": None, "best": [4]}, 422, "distinct positions"),
            "best and places": ({**good, "mode": "best", "best": [0]}, 422, "names the best"),
            "unknown mode": ({**good, "mode": "worst"}, 422, "Malformed vote"),
            "unknown field": ({**good, "extra": 1}, 422, "Extra inputs"),
            "bad voter id": ({**good, "voter": "../x"}, 422, "Malformed vote"),
            "not JSON": (b"{votes", 422, "JSON decode"),
            "oversized": (b"[" + b"0," * 4000 + b"0]", 413, "over 4096 bytes"),
        }
        for case, (payload, expected, words) in refused.items():
            status, answer = request(base + "/api/vote", payload)
            assert (status, words in answer.get("error", "")) == (expected, True), (case, status, answer)
        for path in ("/images/../../etc/passwd", "/images/%2e%2e/%2e%2e/etc/passwd", f"/images/{other['match_id']}/9.png",
                     f"/images/{other['match_id']}/..%2F..%2Fpyproject.png", "/images/zz/0.png"):  # fmt: skip
            status, answer = request(base + path)
            assert status == 404 and b"root:" not in (answer if isinstance(answer, bytes) else b""), path
    assert len(ArenaStore(db).votes()) == 1  # only the good vote


def test_twenty_concurrent_voters_lose_no_vote_and_count_none_twice(variants, tmp_path, images):
    """1,000 votes from 20 threads over loopback, each replayed once more: every acknowledged vote is in the log
    exactly once, every replay refused, and the live ratings equal a replay of the log."""
    db = tmp_path / "arena.sqlite"
    acknowledged: list[str] = []
    replays: list[int] = []
    lock = threading.Lock()

    def voter(index: int, base: str) -> None:
        rng = random.Random(index)
        for _ in range(50):
            match_id, status = vote_once(base, f"load-{index}", rng)
            assert status == 200
            again, _ = request(base + "/api/vote", {"match_id": match_id, "mode": "best", "voter": "x", "best": [0]})
            with lock:
                acknowledged.append(match_id)
                replays.append(again)

    with arena_server(variants, db, images, "--bootstrap", "0") as (base, _):
        threads = [threading.Thread(target=voter, args=(i, base)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        live = served_mus(base)
    logged = [vote.match_id for vote in ArenaStore(db).votes()]
    assert len(acknowledged) == 1000 and sorted(logged) == sorted(acknowledged) and len(set(logged)) == 1000
    assert set(replays) == {409}
    assert live == pytest.approx(replayed_mus(db), rel=1e-12)


def test_a_kill_during_voting_loses_no_acknowledged_vote_and_a_restart_replays_the_same_ratings(variants, tmp_path, images):
    db = tmp_path / "arena.sqlite"
    acknowledged: list[str] = []
    stop = threading.Event()

    def voter(index: int, base: str) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            try:
                match_id, status = vote_once(base, f"kill-{index}", rng)
            except OSError:
                return  # the server is gone
            if status == 200:
                acknowledged.append(match_id)

    with arena_server(variants, db, images) as (base, process):
        threads = [threading.Thread(target=voter, args=(i, base)) for i in range(4)]
        for thread in threads:
            thread.start()
        while len(acknowledged) < 40:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # mid-vote: four voters are posting
        process.wait()
        stop.set()
        for thread in threads:
            thread.join()
    logged = {vote.match_id for vote in ArenaStore(db).votes()}
    assert set(acknowledged) <= logged and len(logged) <= len(acknowledged) + 4  # at most the in-flight ones more
    with arena_server(variants, db, images) as (base, _):
        assert served_mus(base) == pytest.approx(replayed_mus(db), rel=1e-12)


def test_export_writes_every_vote_as_csv_and_json(variants, tmp_path, images):
    db = tmp_path / "arena.sqlite"
    with arena_server(variants, db, images) as (base, _):
        rng = random.Random(0)
        ids = [vote_once(base, "export", rng)[0] for _ in range(5)]
    runner = CliRunner()
    for suffix in ("csv", "json"):
        result = runner.invoke(cli, ["arena", "export", "--db", str(db), "--out", str(tmp_path / f"votes.{suffix}")])
        assert result.exit_code == 0, result.output
    lines = (tmp_path / "votes.csv").read_text().splitlines()
    assert lines[0].startswith("seq,match_id,shown,item,mode,places,voter,time") and len(lines) == 6
    exported = json.loads((tmp_path / "votes.json").read_text())
    assert [row["match_id"] for row in exported["votes"]] == ids
    assert set(exported["variants"]) == set(variants) and all(len(v["sha256"]) == 64 for v in exported["variants"].values())
    result = runner.invoke(cli, ["arena", "export", "--db", str(db), "--out", str(tmp_path / "votes.txt")])
    assert result.exit_code == 1 and ".csv or .json" in result.output


def test_a_variant_whose_files_changed_is_refused_and_a_public_address_needs_public(variants, tmp_path, images):
    db = tmp_path / "arena.sqlite"
    changed = shutil.copytree(variants["w4a4"], tmp_path / "w4a4")
    runner = CliRunner()
    args = ["arena", "judge", "--judge", "psnr", "--votes", "3", "--db", str(db), "--reference", "fp", *images]
    first = {**variants, "w4a4": changed}
    assert runner.invoke(cli, [*args, *variant_args(first), "--out", str(tmp_path / "board.json")]).exit_code == 0
    board = json.loads((tmp_path / "board.json").read_text())
    assert board["votes"] == 3 and {row["name"] for row in board["rows"]} == set(variants)
    shutil.rmtree(changed)
    shutil.copytree(variants["w8a8"], changed)  # recalibrated: valid, other files
    result = runner.invoke(cli, [*args, *variant_args(first)])
    assert result.exit_code == 1 and "Variant 'w4a4'" in result.output and "must not mix" in result.output
    assert len(ArenaStore(db).votes()) == 3  # the refused run added nothing, and generated no image:
    assert "generating" not in result.output
    result = runner.invoke(cli, ["arena", "serve", *variant_args(variants), "--db", str(tmp_path / "public.sqlite"),
                                 "--host", "0.0.0.0", "--images", "8", "--steps", "4"])  # fmt: skip
    assert result.exit_code == 1 and "Refusing to serve the arena on 0.0.0.0" in result.output and "--public" in result.output
    assert not (tmp_path / "public.sqlite.images").exists()  # refused before any image was generated


def test_metric_judges_rank_the_fp_reference_first_and_agree_with_a_human_who_votes_like_them(tmp_path):
    """On the bundled digits: the psnr judge ranks FP over a W4A4 minmax calibration; a simulated human voting by
    PSNR gives Spearman 1 with that judge (every K = 2 match is a full order); the classifier judge applies."""
    from dilatequant.core.sampling import SamplerConfig
    from dilatequant.tools.arena.gallery import Gallery, parse_variant
    from dilatequant.tools.arena.judges import PsnrJudge, places_from_scores
    from dilatequant.tools.arena.service import Arena, ArenaConfig

    w4a4 = calibrate("digits", CalibConfig.from_bits("W4A4", method="minmax", **TINY), tmp_path / "w4a4", progress=False)
    parsed = [parse_variant("fp=digits"), parse_variant(f"w4a4={w4a4}")]
    gallery = Gallery(tmp_path / "gallery", 6, SamplerConfig(steps=4), "cpu")
    gallery.ensure(parsed, progress=lambda line: None)
    arena = Arena(ArenaStore(tmp_path / "arena.sqlite"), gallery, parsed, ArenaConfig(k=2, reference="fp", bootstrap=50, seed=0))
    assert arena.judge("psnr", 20) == 20  # every K = 2 match of FP against W4A4 has an order
    board = arena.leaderboard()
    assert [row["name"] for row in board["rows"]] == ["fp", "w4a4"] and board["votes"] == 20
    assert board["rows"][1]["tied_with_reference"] is False
    judge = PsnrJudge(gallery, "fp")
    for _ in range(5):
        match, _ = arena.new_match()
        arena.vote(match.id, "rank", "human-1", places=places_from_scores(judge.scores(match.shown, gallery.pool[match.item])))
    agreement = arena.leaderboard()["judges"]
    assert agreement["psnr"] == {"applies": True, "votes": 5, "spearman": pytest.approx(1.0)}
    assert agreement["classifier"]["applies"] and agreement["classifier"]["votes"] == 5


def chromium() -> tuple[str, str] | None:
    found = shutil.which("chromium"), shutil.which("chromedriver")
    return found if all(found) else None


@pytest.fixture
def browser():
    """Headless Chromium. CI installs it (.ci/run): there a missing browser fails; elsewhere it skips, saying why."""
    found = chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        found = None
    if found is None:
        message = "needs chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium"
        if os.environ.get("DILATEQUANT_CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    yield driver
    driver.quit()


def test_a_real_browser_votes_in_both_modes_sees_the_reveal_and_the_leaderboard_change(variants, tmp_path, browser, images):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # the page replaces its candidates on every match: an element found just before may be gone when read, so retry
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))

    def revealed() -> list[str]:
        return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".candidate .name")]

    def board_votes() -> list[int]:
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#board tbody tr")) == 4)
        return [int(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#board td.votes")]

    with arena_server(variants, tmp_path / "arena.sqlite", images) as (base, _):
        browser.get(base + "/leaderboard")
        assert board_votes() == [0, 0, 0, 0]
        browser.get(base + "/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".candidate img")) == 4)
        wait.until(lambda d: all(img.get_property("naturalWidth") > 0 for img in d.find_elements(By.CSS_SELECTOR, ".candidate img")))
        assert browser.find_element(By.ID, "prompt").text.startswith("class ") and not any(revealed())
        browser.save_screenshot(str(ARTIFACTS / "vote.png"))
        browser.find_elements(By.CSS_SELECTOR, ".candidate img")[1].click()  # best mode: image 2 is best
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: all(revealed()))
        names = revealed()
        assert sorted(n.split(" ")[0] for n in names) == sorted(variants) and "(place 1)" in names[1]
        browser.save_screenshot(str(ARTIFACTS / "reveal-best.png"))
        browser.find_element(By.ID, "next").click()
        wait.until(lambda d: not any(revealed()) and len(d.find_elements(By.CSS_SELECTOR, "select.rank")) == 4)
        browser.find_element(By.ID, "mode-rank").click()
        for position, select in enumerate(browser.find_elements(By.CSS_SELECTOR, "select.rank")):
            Select(select).select_by_value(str(3 - position))  # the reverse of the shown order
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: all(revealed()))
        assert "(place 1)" in revealed()[3] and "(place 4)" in revealed()[0]
        browser.save_screenshot(str(ARTIFACTS / "reveal-rank.png"))
        browser.get(base + "/leaderboard")
        assert sum(board_votes()) == 8 and "2 votes (2 human)" in browser.find_element(By.ID, "summary").text
        browser.save_screenshot(str(ARTIFACTS / "leaderboard.png"))
    logged = ArenaStore(tmp_path / "arena.sqlite").votes()
    assert [v.mode for v in logged] == ["best", "rank"] and logged[1].places == (3, 2, 1, 0)
