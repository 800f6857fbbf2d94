"""The HTTP service over a tiny run: answers equal the Retriever's, every bad input is a 4xx naming its
field, a fault is a 500 without its traceback, concurrent requests answer as sequential ones, SIGTERM
stops it cleanly, and the page works in headless Chromium."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from pipeline import Retriever  # noqa: E402
from pipeline.serve import ServeConfig, create_app  # noqa: E402
from tests.conftest import PASSAGES, QUERIES, copy_tiny_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIMITS = ServeConfig(max_k=20, max_depth=6, max_query_chars=200, max_batch=3, max_body_bytes=2048, warmup=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, built_tiny_run) -> Path:
    return copy_tiny_run(built_tiny_run, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def retriever(tiny_run) -> Retriever:
    return Retriever(tiny_run, latency_budget_ms=60_000)  # no deadline cuts: answers are comparable


@pytest.fixture(scope="module")
def client(retriever) -> TestClient:
    return TestClient(create_app(retriever, LIMITS), raise_server_exceptions=False)


def ranked(payload: dict) -> list[tuple[str, float]]:
    return [(r["document_id"], round(r["score"], 5)) for r in payload["results"]]


def test_get_and_post_answer_what_the_retriever_answers(client, retriever):
    query = QUERIES["q1"]
    expected = [(r.document_id, round(r.score, 5)) for r in retriever.search_detailed(query, 4).results]
    got = client.get("/search", params={"q": query, "k": 4})
    assert got.status_code == 200
    body = got.json()
    assert ranked(body) == expected and len(expected) == 4
    assert body["results"][0]["document_text"] == PASSAGES[body["results"][0]["document_id"]]
    assert body["reranked"] == 3 and body["cut_by_deadline"] is False
    assert {"encode", "ann", "fetch", "rerank", "total"} <= set(body["timings_ms"])
    posted = client.post("/search", json={"query": query, "k": 4})
    assert posted.status_code == 200 and ranked(posted.json()) == expected
    shallow = client.get("/search", params={"q": query, "k": 4, "depth": 0}).json()
    assert shallow["reranked"] == 0 and shallow["depth"] == 0


def test_a_batch_answers_each_query_in_order(client, retriever):
    queries = [QUERIES["q1"], QUERIES["q2"], QUERIES["q3"]]
    got = client.post("/search", json={"queries": queries, "k": 2})
    assert got.status_code == 200
    responses = got.json()["responses"]
    assert len(responses) == 3
    for query, response in zip(queries, responses):
        assert ranked(response) == [(r.document_id, round(r.score, 5)) for r in retriever.search(query, 2)]


def test_concurrent_requests_give_the_sequential_answers(client):
    queries = list(QUERIES.values()) * 4
    sequential = [ranked(client.get("/search", params={"q": q, "k": 5}).json()) for q in queries]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda q: ranked(client.get("/search", params={"q": q, "k": 5}).json()), queries))
    assert concurrent == sequential


BAD_GET = [
    ({"q": ""}, 422, "q"), ({"q": "   \t"}, 422, "q"), ({}, 422, "q"),
    ({"q": "x" * 201}, 422, "q"), ({"q": "ok", "k": 0}, 422, "k"), ({"q": "ok", "k": 21}, 422, "k"),
    ({"q": "ok", "k": "ten"}, 422, "k"), ({"q": "ok", "depth": -1}, 422, "depth"),
    ({"q": "ok", "depth": 7}, 422, "depth"), ({"q": "ok", "depth": "1.5"}, 422, "depth"),
]


@pytest.mark.parametrize("params,status,field", BAD_GET)
def test_bad_get_requests_are_4xx_naming_the_field(client, params, status, field):
    got = client.get("/search", params=params)
    assert got.status_code == status, got.text
    assert got.json()["field"] == field and got.json()["error"]


BAD_POST = [
    ({"query": "ok", "k": 1.5}, 422, "k"), ({"query": "ok", "k": True}, 422, "k"), ({"query": "ok", "k": "3"}, 422, "k"),
    ({"query": "ok", "colour": "red"}, 422, "colour"), ({}, 422, "query"),
    ({"query": "ok", "queries": ["ok"]}, 422, "query"), ({"query": 3}, 422, "query"),
    ({"queries": []}, 422, "queries"), ({"queries": ["a", "b", "c", "d"]}, 422, "queries"),
    ({"queries": ["fine", " "]}, 422, "queries[1]"), ({"queries": "not a list"}, 422, "queries"),
    ({"query": "ok", "depth": 99}, 422, "depth"), ([1, 2], 422, "body"),
]


@pytest.mark.parametrize("body,status,field", BAD_POST)
def test_bad_post_bodies_are_4xx_naming_the_field(client, body, status, field):
    got = client.post("/search", json=body)
    assert got.status_code == status, got.text
    assert got.json()["field"] == field and got.json()["error"]


def test_malformed_json_and_oversized_bodies_are_refused(client):
    got = client.post("/search", content=b'{"query": "ok",', headers={"content-type": "application/json"})
    assert got.status_code == 400 and got.json()["field"] == "body" and "malformed JSON" in got.json()["error"]
    big = json.dumps({"query": "ok", "pad": "x" * 3000}).encode()
    got = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert got.status_code == 413 and got.json()["field"] == "body"

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(5):
            yield b" " * 1000

    got = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert got.status_code == 413


def test_a_server_fault_is_logged_and_answered_500_without_the_traceback(tiny_run, caplog):
    class Broken:
        record = None

        def search_detailed(self, query, k, depth=None):
            raise RuntimeError("index exploded: secret detail")

    client = TestClient(create_app(Broken(), LIMITS), raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="pipeline.serve"):
        got = client.get("/search", params={"q": "ok"})
    assert got.status_code == 500
    assert "secret" not in got.text and "Traceback" not in got.text
    assert any("index exploded" in (r.exc_text or "") or r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)
    assert any(" /search 500 " in r.getMessage() for r in caplog.records)


def test_health_page_and_openapi(client, tiny_run):
    health = client.get("/health").json()
    assert health["corpus"]["passages"] == len(PASSAGES) and health["run_dir"] == str(tiny_run)
    assert set(health["fingerprints"]) == {"biencoder", "crossencoder"} and health["serving"]["depth"] == 3
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: nothing fetched elsewhere
    assert "/search" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """A real `python -m pipeline.serve` on a loopback port; yields (url, process, log path)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    out = open(log, "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--run", str(tiny_run), "--port", str(port),
                             "serve.warmup=1"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            pytest.fail(f"pipeline.serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"pipeline.serve did not answer within 60 s:\n{log.read_text()}")
    yield url, proc, log
    if proc.poll() is None:
        proc.kill()
    out.close()


def test_the_load_benchmark_drives_the_service_over_http(server):
    from benchmarks.load import HttpSearcher, load_table, load_test
    from tests.conftest import QRELS

    url, _, _ = server
    queries = list(QUERIES.items()) * 3
    one = load_test(HttpSearcher(url), queries, 1, k=5, qrels=QRELS)
    four = load_test(HttpSearcher(url), queries, 4, k=5, qrels=QRELS)
    assert one["errors"] == four["errors"] == 0 and one["queries"] == four["queries"] == 12
    assert one["recall@1"] == four["recall@1"]  # no deadline cuts on the tiny run: the same answers
    assert one["cut_share"] == four["cut_share"] == 0 and one["reranked_mean"] == four["reranked_mean"] > 0
    assert load_table([one]).splitlines()[2].endswith(f"| {one['reranked_mean']:.1f} | 0% |")
    refused = load_test(HttpSearcher(url), queries[:2], 2, k=0)  # k=0 is a 422: counted, not raised
    assert refused["errors"] == 2 and "422" in refused["first_errors"][0]
    texts = list(QUERIES.values())  # the depth reaches the service: without reranking, other scores
    assert [HttpSearcher(url, depth=0).search(q, 5) for q in texts] != [HttpSearcher(url).search(q, 5) for q in texts]


def test_the_real_service_answers_logs_each_request_and_stops_on_sigterm(server):
    url, proc, log = server
    with urllib.request.urlopen(url + "/search?q=do+goldfish+grow&k=2", timeout=30) as response:
        body = json.loads(response.read())
    assert len(body["results"]) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "GET /search 200" in text and "shut down cleanly" in text


def _chromium() -> tuple[str, str] | None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.mark.skipif(_chromium() is None, reason="Chromium and chromedriver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
def test_the_page_in_headless_chromium(tiny_run, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--run", str(tiny_run), "--port", str(port),
                             "serve.warmup=0"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "pipeline.serve exited"
                time.sleep(0.1)
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        browser.get(url)
        box = browser.find_element(By.ID, "q")
        box.send_keys("capital of australia")
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys("4")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "li.result")) > 0)
        results = browser.find_elements(By.CSS_SELECTOR, "li.result")
        assert len(results) == 4
        marks = [m.text.lower() for m in browser.find_elements(By.CSS_SELECTOR, "li.result mark")]
        assert marks and set(marks) <= {"capital", "of", "australia"}
        assert "australia" in marks
        assert len(browser.find_elements(By.CSS_SELECTOR, ".tag.reranked")) == 3  # the run reranks 3
        assert "reranked 3 of 3" in browser.find_element(By.ID, "timings").text
        browser.save_screenshot(str(tmp_path / "results.png"))
        box.clear()
        box.send_keys(" ")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
        assert browser.find_element(By.ID, "error").text.startswith("q: ")
        assert not browser.find_elements(By.CSS_SELECTOR, "li.result")
        browser.save_screenshot(str(tmp_path / "error.png"))
        assert (tmp_path / "results.png").stat().st_size > 5000
    finally:
        if browser is not None:
            browser.quit()
        proc.terminate()
        proc.wait(timeout=30)


# Fuzzing (Hypothesis) of the three ways a query reaches the model: `Retriever.search_detailed`, the search
# CLI and the HTTP service: 550 cases here, 600 more in tests/test_fuzz.py.
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FUZZ_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
ODD_TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),            # any Unicode: NUL, controls
    st.sampled_from(["\u202egoldfish", "🐟🐠 fish", "e\u0301\u0301\u0301", "  \t\n ", "\x00", "a" * 100_000,
                     "goldfish\x00grow", "ﷺ" * 50, "\ufeffquery"]),
    st.sampled_from(list(QUERIES.values())))
ANY_NUMBER = st.one_of(st.integers(-5, 30), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                       st.text(max_size=5), st.just([3]))


@settings(max_examples=150, **FUZZ_SETTINGS)
@given(query=ODD_TEXT, k=st.one_of(st.integers(1, 25), ANY_NUMBER),
       depth=st.one_of(st.none(), st.integers(0, 8), st.sampled_from([10**6, 10**18]), ANY_NUMBER))
def test_fuzzed_searches_answer_or_name_the_argument(retriever, query, k, depth):
    try:
        response = retriever.search_detailed(query, k, depth)
    except (TypeError, ValueError) as error:
        named = [name for name in ("query", "k", "depth") if str(error).startswith(name)]
        assert named, f"unnamed error for {query[:20]!r}, {k!r}, {depth!r}: {error}"
        return
    assert isinstance(k, int) and k > 0 and query.strip()
    assert len(response.results) <= k
    ids = [r.document_id for r in response.results]
    assert len(set(ids)) == len(ids) and all(r.document_text == PASSAGES[r.document_id] for r in response.results)


CLI_NUMBER = st.one_of(st.integers(-3, 30).map(str), st.integers().map(str), st.text(max_size=6),
                       st.sampled_from(["1e3", "nan", "0x10", " 5", "٣", "10" * 20]))


@settings(max_examples=150, **FUZZ_SETTINGS)
@given(query=ODD_TEXT, k=st.one_of(st.none(), CLI_NUMBER), depth=st.one_of(st.none(), CLI_NUMBER))
def test_fuzzed_search_cli_arguments_answer_or_name_the_argument(retriever, tiny_run, monkeypatch, capsys,
                                                                 query, k, depth):
    """`python -m pipeline.search QUERY -k K --depth D` in-process, with one loaded Retriever standing in for
    the one main() would load: 0 with at most k results, or 2 with a message naming the query or option."""
    import pipeline.retriever
    from pipeline.search import main

    monkeypatch.setattr(pipeline.retriever, "Retriever",
                        lambda run, depth=None: retriever if depth is None else retriever.reconfigured(depth=depth))
    argv = [query, "--run", str(tiny_run), "--json", *(["-k", k] if k is not None else []),
            *(["--depth", depth] if depth is not None else [])]
    try:
        code = main(argv)
    except SystemExit as refused:  # argparse: a value that is no int, a query that looks like an option
        err = capsys.readouterr().err
        assert refused.code == 2 and any(name in err for name in ("-k", "--depth", "argument", "query")), err
        return
    captured = capsys.readouterr()
    if code == 2:
        assert not query.strip() and "the query is empty" in captured.err
        return
    assert code == 0 and query.strip(), captured.err
    results = json.loads(captured.out.splitlines()[-1])["results"]
    assert len(results) <= (int(k) if k is not None else 10)
    assert all(r["document_text"] == PASSAGES[r["document_id"]] for r in results)


JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ODD_TEXT,
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=4), max_leaves=8)
BODY = st.one_of(
    st.fixed_dictionaries({"query": ODD_TEXT}, optional={"k": ANY_NUMBER, "depth": ANY_NUMBER}),
    st.fixed_dictionaries({"queries": st.lists(ODD_TEXT, max_size=5)}, optional={"k": ANY_NUMBER}),
    st.dictionaries(st.sampled_from(["query", "queries", "k", "depth", "extra"]), JSON_VALUE, max_size=4),
    JSON_VALUE)


@settings(max_examples=150, **FUZZ_SETTINGS)
@given(body=BODY, raw=st.one_of(st.none(), st.binary(max_size=80)))
def test_fuzzed_post_bodies_are_answered_or_refused_naming_the_field(client, body, raw):
    got = client.post("/search", content=raw if raw is not None else json.dumps(body).encode(),
                      headers={"content-type": "application/json"})
    assert got.status_code in (200, 400, 413, 422), (body, raw, got.status_code, got.text[:300])
    payload = got.json()
    if got.status_code == 200:
        assert "results" in payload or "responses" in payload
    else:
        assert payload["error"] and "field" in payload, payload


@settings(max_examples=100, **FUZZ_SETTINGS)
@given(params=st.dictionaries(st.sampled_from(["q", "k", "depth", "x"]), ODD_TEXT.filter(lambda s: len(s) < 3000)
                              | st.integers().map(str), max_size=4))
def test_fuzzed_get_parameters_are_answered_or_refused_naming_the_field(client, params):
    got = client.get("/search", params=params)
    assert got.status_code in (200, 400, 413, 422), (params, got.status_code, got.text[:300])
    if got.status_code != 200:
        assert got.json()["error"] and "field" in got.json()
