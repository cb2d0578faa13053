"""`lofit serve`: a real server in a subprocess on 127.0.0.1, spoken to with the openai client and raw HTTP.

The served model is a tiny random Llama that never emits EOS (tests/serving_helpers.py), so
every answer runs to its max_tokens; each answer is compared with what lofit generates for
that prompt and adapter alone (greedy_completions on the adapter loaded by load_adapted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from lofit import cli  # noqa: E402
from lofit.models.loading import load_model  # noqa: E402

from .serving_helpers import (  # noqa: E402
    API_KEY,
    EXCLUSIVE_METHODS,
    LORAS,
    MIXED_METHODS,
    WORDS,
    Server,
    make_adapters,
    reference,
    save_base,
)

MAX_TOKENS = 64
MAX_PROMPT_TOKENS = 48


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serving")
    model = save_base(root / "model")
    (root / "adapters").mkdir()
    names = make_adapters(model, root / "adapters")
    return {"root": root, "model": model, "adapters": root / "adapters", "names": names}


@pytest.fixture(scope="module")
def local(folders) -> tuple:
    """The same base model and tokenizer in this process, for the single-adapter references."""
    return load_model(str(folders["model"]))


@pytest.fixture(scope="module")
def servers(folders):
    """The server most tests use, and one of one row per batch, two places in its queue and a
    4 s timeout; both started at once (their start-up is most of this file's time)."""
    main = Server(
        folders["model"],
        folders["adapters"],
        folders["root"] / "server.log",
        "--max-tokens",
        str(MAX_TOKENS),
        "--max-prompt-tokens",
        str(MAX_PROMPT_TOKENS),
        "--max-queue",
        "128",
    )
    slow = Server(
        folders["model"],
        folders["adapters"],
        folders["root"] / "slow.log",
        "--max-batch",
        "1",
        "--max-queue",
        "2",
        "--timeout",
        "4",
        "--max-tokens",
        "4000",
        api_key=None,
    )
    try:
        yield {"main": main.wait_ready(), "slow": slow.wait_ready()}
    finally:
        main.stop()
        slow.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"]


def folder_of(folders: dict, name: str) -> Path | None:
    if name in ("base", "model"):
        return None
    folder = folders["adapters"] / name
    return folder / "adapter" if (folder / "adapter").is_dir() else folder


def expected(local, folders, name: str, prompts: list[str], max_tokens: int) -> list[str]:
    model, tokenizer = local
    return reference(model, tokenizer, folder_of(folders, name), prompts, max_tokens)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS[6:]) for _ in range(count))


def test_the_model_list_names_the_base_and_every_adapter_it_could_load(server, folders):
    listed = {model.id: model for model in client(server).models.list()}
    assert set(listed) == {"model", *folders["names"]}  # not-an-adapter, other-weights, other-shape skipped
    raw = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]
    kinds = {entry["id"]: entry.get("served_as") for entry in raw}
    assert kinds["lofit-00"] == kinds["iti"] == "heads"
    assert (kinds["red"], kinds["repe"], kinds["lora"], kinds["lora-b"]) == ("feed_forward", "residual", "lora", "lora")
    assert kinds["reft"] == kinds["lora-dora"] == "exclusive"  # peft refuses DoRA in mixed batches: said, not silent
    reasons = {entry["id"]: entry.get("exclusive_reason") for entry in raw}
    assert "DoRA" in reasons["lora-dora"] and reasons["lora"] is None and reasons["reft"] is None
    log = (folders["root"] / "server.log").read_text()
    assert "skipped other-weights" in log and "fingerprint" in log and "skipped other-shape" in log
    assert "lora-dora is served in batches of its own" in log


def test_every_method_answers_as_lofit_does_with_that_adapter_alone(server, folders, local):
    openai_client = client(server)
    prompt = "w1 w2 w3 w4"
    answers = {}
    for name in ["model", "base", "lofit-00", "lofit-01", "lofit-15", *MIXED_METHODS, *EXCLUSIVE_METHODS, *LORAS]:
        completion = openai_client.completions.create(model=name, prompt=prompt, max_tokens=12)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 12 and completion.usage.prompt_tokens == 4
        answers[name] = completion.choices[0].text
        assert answers[name] == expected(local, folders, name, [prompt], 12)[0], name
    assert len(set(answers.values())) >= 5  # the adapters do change the answers


def test_chat_streaming_and_several_prompts(server, folders, local):
    openai_client = client(server)
    messages = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w5 w6 w7"}]
    rendered = local[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = expected(local, folders, "lofit-02", [rendered], 10)[0]
    chat = openai_client.chat.completions.create(model="lofit-02", messages=messages, max_tokens=10)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    pieces = openai_client.chat.completions.create(model="lofit-02", messages=messages, max_tokens=10, stream=True)
    chunks = list(pieces)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) > 3 and "".join(c.choices[0].delta.content or "" for c in chunks) == want
    streamed = openai_client.completions.create(model="red", prompt="w9 w8", max_tokens=9, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected(local, folders, "red", ["w9 w8"], 9)[0]
    several = openai_client.completions.create(model="repe", prompt=["w1", "w2 w3 w4 w5"], max_tokens=7)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == expected(
        local, folders, "repe", ["w1", "w2 w3 w4 w5"], 7
    )


def test_a_stop_string_ends_the_answer_before_it(server, folders, local):
    want = expected(local, folders, "lofit-04", ["w11 w12"], 20)[0].split(" ")
    stop = want[5]
    cut = " ".join(want[: want.index(stop)]).rstrip()
    body = {"model": "lofit-04", "prompt": "w11 w12", "max_tokens": 20, "stop": [stop]}
    answer = httpx.post(f"{server.url}/v1/completions", headers=server.headers, json=body).json()["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["text"].rstrip() == cut
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", headers=server.headers, json=body | {"stream": True}
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events).rstrip() == cut
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_64_concurrent_requests_over_16_adapters_share_batches_and_match_each_adapter_alone(server, folders, local):
    rng = random.Random(0)
    adapters = [*(f"lofit-{i:02d}" for i in range(14)), "lora", "lora-b"]  # LoRA rows mix with LoFiT rows
    requests = [(adapters[i % 16], words(rng, rng.randrange(2, 9)), rng.randrange(4, 12)) for i in range(64)]
    before = httpx.get(f"{server.url}/health").json()

    async def ask(http: httpx.AsyncClient, name: str, prompt: str, max_tokens: int) -> str:
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens}
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    async def ask_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
            return await asyncio.gather(*(ask(http, *request) for request in requests))

    start = time.monotonic()
    answers = asyncio.run(ask_all())
    assert time.monotonic() - start < 40
    after = httpx.get(f"{server.url}/health").json()
    assert after["mixed_batches"] > before["mixed_batches"] and after["largest_batch"] >= 4
    assert after["batches"] - before["batches"] < 64  # requests did share batches
    lora_mixed = after["mixed_batches_by_kind"].get("lora", 0) - before["mixed_batches_by_kind"].get("lora", 0)
    assert lora_mixed > 0  # LoRA rows shared batches with LoFiT rows (peft's mixed-adapter batches)
    for (name, prompt, max_tokens), answer in zip(requests, answers):
        assert answer == expected(local, folders, name, [prompt], max_tokens)[0], (name, prompt)


def test_adapters_load_and_unload_while_serving(server, folders, local):
    url, headers = server.url, server.headers
    loaded = httpx.post(f"{url}/v1/adapters", headers=headers, json={"name": "hot", "folder": "lofit-03"})
    assert loaded.status_code == 201 and loaded.json()["method"] == "lofit"
    run_folder = httpx.post(f"{url}/v1/adapters", headers=headers, json={"name": "hot-run", "folder": "lofit-01"})
    assert run_folder.status_code == 201
    ids = {m.id for m in client(server).models.list()}
    assert {"hot", "hot-run"} <= ids
    for name, source in (("hot", "lofit-03"), ("hot-run", "lofit-01")):
        text = client(server).completions.create(model=name, prompt="w20 w21", max_tokens=8).choices[0].text
        assert text == expected(local, folders, source, ["w20 w21"], 8)[0]
    assert httpx.delete(f"{url}/v1/adapters/hot", headers=headers).json() == {
        "id": "hot",
        "object": "model",
        "deleted": True,
    }
    gone = httpx.post(f"{url}/v1/completions", headers=headers, json={"model": "hot", "prompt": "w1"})
    assert gone.status_code == 404 and "hot" in gone.json()["error"]["message"]
    # The freed slot is reused by the next adapter, which answers as itself.
    assert httpx.post(f"{url}/v1/adapters", headers=headers, json={"name": "hot", "folder": "lofit-05"}).is_success
    text = client(server).completions.create(model="hot", prompt="w20 w21", max_tokens=8).choices[0].text
    assert text == expected(local, folders, "lofit-05", ["w20 w21"], 8)[0]
    # A LoRA loaded while serving joins the peft model beside the others, and leaves it again.
    lora = httpx.post(f"{url}/v1/adapters", headers=headers, json={"name": "hot-lora", "folder": "lora-b"})
    assert lora.status_code == 201 and lora.json()["served_as"] == "lora"
    text = client(server).completions.create(model="hot-lora", prompt="w20 w21", max_tokens=8).choices[0].text
    assert text == expected(local, folders, "lora-b", ["w20 w21"], 8)[0]
    assert httpx.delete(f"{url}/v1/adapters/hot-lora", headers=headers).status_code == 200
    text = client(server).completions.create(model="lora-b", prompt="w20 w21", max_tokens=8).choices[0].text
    assert text == expected(local, folders, "lora-b", ["w20 w21"], 8)[0]


def bad_requests(folders: dict) -> list[tuple]:
    """(method, path, keyword arguments for httpx, expected status, a word of the message)."""
    ok = {"model": "lofit-00", "prompt": "w1 w2"}
    chat = {"model": "lofit-00", "messages": [{"role": "user", "content": "w1"}]}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    long_prompt = " ".join(["w1"] * (MAX_PROMPT_TOKENS + 1))
    c, cc, a = "/v1/completions", "/v1/chat/completions", "/v1/adapters"
    return [
        ("POST", c, {"content": b"{not json"}, 400, "JSON"),
        ("POST", c, {"content": b"[1, 2]"}, 400, "object"),
        ("POST", c, {"content": b"\xff\xfe\x00"}, 400, "JSON"),
        ("POST", c, {"content": b""}, 400, "JSON"),
        ("POST", c, {"json": ok, "headers": {}}, 401, "key"),
        ("POST", c, {"json": ok, "headers": {"Authorization": "Bearer wrong"}}, 401, "key"),
        ("POST", c, {"json": ok, "headers": {"Authorization": f"Basic {API_KEY}"}}, 401, "key"),
        ("GET", "/v1/models", {"headers": {}}, 401, "key"),
        ("POST", c, {"json": ok | {"model": "nobody"}}, 404, "nobody"),
        ("POST", cc, {"json": chat | {"model": "nobody"}}, 404, "nobody"),
        ("POST", c, {"json": ok | {"prompt": long_prompt}}, 413, "tokens"),
        ("POST", c, {"json": ok | {"max_tokens": MAX_TOKENS + 1}}, 413, "max_tokens"),
        ("POST", cc, {"json": chat | {"max_tokens": MAX_TOKENS + 1}}, 413, "max_tokens"),
        ("POST", c, {"json": ok | {"prompt": "w1 " * 400_000}}, 413, "bytes"),
        ("POST", c, {"json": ok | {"prompt": ["w1"] * 17}}, 413, "prompts"),
        ("POST", c, {"json": ok | {"max_tokens": "5"}}, 422, "max_tokens"),
        ("POST", c, {"json": ok | {"max_tokens": 2.5}}, 422, "max_tokens"),
        ("POST", c, {"json": ok | {"max_tokens": 0}}, 422, "max_tokens"),
        ("POST", c, {"json": ok | {"max_tokens": -3}}, 422, "max_tokens"),
        ("POST", c, {"json": ok | {"prompt": 5}}, 422, "prompt"),
        ("POST", c, {"json": ok | {"prompt": [1, 2]}}, 422, "prompt"),
        ("POST", c, {"json": ok | {"stream": "yes"}}, 422, "stream"),
        ("POST", c, {"json": ok | {"model": None}}, 422, "model"),
        ("POST", c, {"json": ok | {"model": ["a"]}}, 422, "model"),
        ("POST", c, {"json": {"prompt": "w1"}}, 422, "model"),
        ("POST", c, {"json": {"model": "lofit-00"}}, 422, "prompt"),
        ("POST", c, {"json": ok | {"n": 2}}, 422, "n"),
        ("POST", c, {"json": ok | {"temperature": 5}}, 422, "temperature"),
        ("POST", c, {"json": ok | {"stop": 3}}, 422, "stop"),
        ("POST", c, {"json": ok | {"stop": ["w1"] * 5}}, 400, "stop"),
        ("POST", c, {"json": ok | {"stop": [""]}}, 400, "stop"),
        ("POST", c, {"json": ok | {"prompt": ""}}, 400, "empty"),
        ("POST", c, {"json": ok | {"prompt": []}}, 400, "empty"),
        ("POST", cc, {"json": chat | {"messages": "w1"}}, 422, "messages"),
        ("POST", cc, {"json": chat | {"messages": []}}, 422, "messages"),
        ("POST", cc, {"json": chat | {"messages": [{"role": "robot", "content": "w1"}]}}, 422, "role"),
        ("POST", cc, {"json": chat | {"messages": [{"role": "user", "content": 5}]}}, 422, "content"),
        ("POST", cc, {"json": chat | {"messages": [{"role": "user"}]}}, 422, "content"),
        ("GET", "/v1/nothing", {}, 404, "route"),
        ("GET", c, {}, 405, "Method"),
        ("DELETE", f"{a}/nobody", {}, 404, "nobody"),
        ("DELETE", f"{a}/base", {}, 400, "base"),
        ("POST", a, {"json": {"name": "x"}}, 400, "exactly one"),
        ("POST", a, {"json": {"name": "x", "folder": "lofit-00", "hub_id": "a/b"}}, 400, "exactly one"),
        ("POST", a, {"json": {"name": "x", "folder": "lofit-00", "force": True}}, 422, "force"),
        ("POST", a, {"json": {"name": "x", "folder": "../model"}}, 400, "inside"),
        ("POST", a, {"json": {"name": "x", "folder": str(folders["adapters"] / "lofit-00")}}, 400, "relative"),
        ("POST", a, {"json": {"name": "x", "folder": "lofit-00/../../model"}}, 400, "inside"),
        ("POST", a, {"json": {"name": "x", "folder": "missing"}}, 404, "missing"),
        ("POST", a, {"json": {"name": "x", "folder": "not-an-adapter"}}, 400, "no result"),
        ("POST", a, {"json": {"name": "bad name!", "folder": "lofit-00"}}, 400, "not allowed"),
        ("POST", a, {"json": {"name": "../../x", "folder": "lofit-00"}}, 400, "not allowed"),
        ("POST", a, {"json": {"name": "base", "folder": "lofit-00"}}, 400, "base model"),
        ("POST", a, {"json": {"name": "lofit-00", "folder": "lofit-00"}}, 409, "already"),
        ("POST", a, {"json": {"name": "x", "folder": "other-weights"}}, 400, "fingerprint"),
        ("POST", a, {"json": {"name": "x", "folder": "other-shape"}}, 400, "another model"),
        ("POST", a, {"json": {"name": "x", "hub_id": "nobody/no-such-adapter"}}, 404, "Hub"),
        ("POST", a, {"json": {"name": "x", "hub_id": "../etc"}}, 422, "hub_id"),
    ], auth


def random_bodies(rng: random.Random, count: int) -> list[dict]:
    """Completion requests whose every field is drawn from values of every JSON type, most of them wrong."""
    values = [None, True, 0, -1, 3, 10**12, 2.5, "", "w1 w2", "lofit-00", "\x00\ud7ff", [], ["w1"], [1, "a"], {"a": 1}]
    fields = ["model", "prompt", "max_tokens", "stream", "stop", "temperature", "n"]
    return [{field: rng.choice(values) for field in fields if rng.random() < 0.8} for _ in range(count)]


def test_every_bad_request_gets_a_clear_json_error_and_the_server_goes_on(server, folders, local):
    cases, auth = bad_requests(folders)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for method, path, options, status, word in cases:
            options = dict(options)
            headers = options.pop("headers", auth)
            response = http.request(method, path, headers=headers, **options)
            error = response.json()["error"]
            assert response.status_code == status, (method, path, options, response.text[:300])
            assert error["code"] == status and word.lower() in error["message"].lower(), (path, error)
        for body in random_bodies(random.Random(0), 60):
            response = http.post("/v1/completions", headers=auth, json=body)
            assert response.status_code in (200, 400, 404, 413, 422) and response.json(), body
        assert http.get("/health").json()["status"] == "ok"
        body = {"model": "lofit-00", "prompt": "w1 w2", "max_tokens": 6}
        text = http.post("/v1/completions", headers=auth, json=body).json()["choices"][0]["text"]
    assert text == expected(local, folders, "lofit-00", ["w1 w2"], 6)[0]
    assert len({(m, p, json.dumps(o, default=str)) for m, p, o, _, _ in cases}) == len(cases) >= 50


def test_queue_limit_disconnects_timeout_unload_in_flight_and_graceful_shutdown(servers, folders, local):
    """The server of one row per batch, two places in its queue and a 4 s timeout (stopped at the end)."""
    slow = servers["slow"]
    url = slow.url
    long_body = {"model": "base", "prompt": "w1", "max_tokens": 3900, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http, contextlib.ExitStack() as streams:
        first = streams.enter_context(http.stream("POST", "/v1/completions", json=long_body))
        second = streams.enter_context(http.stream("POST", "/v1/completions", json=long_body))
        first_lines = first.iter_lines()  # kept: a dropped iterator would close the stream
        next(first_lines)
        full = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "w1"})
        assert full.status_code == 429 and "queue is full" in full.json()["error"]["message"]
        assert full.headers["retry-after"] == "1"
        first.close()  # a client that goes away frees its place
        deadline = time.monotonic() + 3
        while httpx.get(f"{url}/health").json()["queued"] > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json()["queued"] == 1
        second.close()
    timed_out = httpx.post(f"{url}/v1/completions", json=long_body | {"stream": False}, timeout=30)
    assert timed_out.status_code == 504 and "timeout" in timed_out.json()["error"]["message"]
    # Unloading an adapter in use, then shutting down: the request in flight finishes with its adapter.
    body = {"model": "lofit-03", "prompt": "w5 w6", "max_tokens": 300, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        received = [next(lines)]
        assert httpx.delete(f"{url}/v1/adapters/lofit-03").status_code == 200
        assert httpx.post(f"{url}/v1/completions", json=body | {"stream": False}).status_code == 404
        assert httpx.get(f"{url}/health").json()["queued"] == 1  # still generating with the unloaded adapter
        slow.process.send_signal(15)
        received += list(lines)
    events = [json.loads(line[6:]) for line in received if line.startswith("data: {")]
    assert [line for line in received if line][-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == expected(local, folders, "lofit-03", ["w5 w6"], 300)[0]
    assert slow.process.wait(30) in (0, -15)  # uvicorn re-raises SIGTERM once it has finished


def test_the_table_holds_what_the_adapter_files_hold_and_keeps_a_removed_adapter_until_its_last_request(folders):
    from lofit.serving.adapters import AdapterRegistry

    model, _ = load_model(str(folders["model"]))
    registry = AdapterRegistry(model, folders["adapters"])
    for index in range(16):
        registry.add(f"a{index}", folder_of(folders, f"lofit-{index:02d}"), f"lofit-{index:02d}")
    first, last = registry.names()[0], registry.names()[-1]
    assert (first.nbytes, last.nbytes) == (2 * 5 * 8 * 4, 5 * 8 * 4)  # A and v, or v only: 5 heads x head_dim 8
    table = registry.tables["heads"]
    assert table.nbytes <= 2 * sum(adapter.nbytes for adapter in registry.names())
    used = registry.resolve("a3")
    rows = used.rows["bias"]
    registry.remove("a3")
    registry.collect()
    assert used.rows and table.tensors["bias"][rows].any()  # still in use: kept
    registry.release(used)
    registry.collect()
    assert not used.rows and not table.tensors["bias"][rows].any()
    again = registry.add("again", folder_of(folders, "lofit-03"), "lofit-03")
    assert sorted(again.rows["bias"].tolist()) == sorted(rows.tolist())  # the freed rows, reused
    with pytest.raises(KeyError):
        registry.resolve("a3")
    registry.close()
    assert not any(proj._forward_pre_hooks for proj in model.model.layers[0].self_attn.o_proj.modules())


def test_one_batch_mixes_two_loras_a_lofit_adapter_and_the_base_and_a_lora_in_use_outlives_its_unload(folders, local):
    """In-process engine: the five jobs are queued before the worker starts, so they are one batch."""
    from peft.tuners.lora import LoraLayer

    from lofit.serving.adapters import AdapterRegistry
    from lofit.serving.engine import Engine, Job

    model, tokenizer = load_model(str(folders["model"]))
    registry = AdapterRegistry(model, folders["adapters"])
    for name in ("lora", "lora-b", "lofit-00", "lora-dora"):
        registry.add(name, folder_of(folders, name), name)
    assert [a.kind for a in registry.names()] == ["lora", "lora", "heads", "exclusive"]
    engine = Engine(registry, tokenizer)
    prompt, rows = "w1 w2 w3", ["lora", "base", "lora-b", "lofit-00", "lora"]
    jobs = [Job(engine.encode(prompt), registry.resolve(name), 10) for name in rows]
    dora = Job(engine.encode(prompt), registry.resolve("lora-dora"), 10)  # a batch of its own, stack detached
    engine.submit([*jobs, dora])
    engine.start()
    engine.close(timeout=60)
    answers = {name: job.text for name, job in zip(rows, jobs)}
    for name, job in zip(rows, jobs):
        assert job.finished and job.text == expected(local, folders, name, [prompt], 10)[0], name
    assert dora.text == expected(local, folders, "lora-dora", [prompt], 10)[0]
    assert len(set(answers.values())) == 4  # every row got its own adapter, and they differ
    assert engine.stats.batches == 2 and engine.stats.largest_batch == 5
    assert engine.stats.mixed_batches_by_kind == {"lora": 1, "base": 1, "heads": 1}
    # A LoRA removed while a request uses it stays in the peft model until that request is over.
    in_use = registry.resolve("lora-b")
    peft_name = in_use.lora
    registry.remove("lora-b")
    registry.collect()
    assert peft_name in registry.lora.names()
    registry.release(in_use)
    registry.collect()
    assert peft_name not in registry.lora.names() and in_use.lora is None
    registry.remove("lora")
    registry.collect()  # the last LoRA: peft's layers leave the model
    assert registry.lora.peft is None and not any(isinstance(m, LoraLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    registry.close()


def test_serve_refuses_to_listen_beyond_this_machine_without_a_key(capsys, monkeypatch):
    monkeypatch.delenv("LOFIT_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--model", "nowhere"]) == 2
    assert "without an API key" in capsys.readouterr().err


@pytest.mark.integration
def test_the_embedded_model_serves_a_lofit_adapter(tmp_path):
    """SmolLM2-135M-Instruct with a random LoFiT adapter: the chat answer is lofit's own."""
    from lofit import get_lofit_model
    from lofit.evaluation.generation import greedy_completions

    from .conftest import randomize_adapter

    model, tokenizer = load_model("default")
    wrapped = get_lofit_model(model)
    randomize_adapter(wrapped, seed=1, scale=0.05)
    wrapped.set_active_heads([(layer, 0) for layer in range(0, 30, 3)])
    (tmp_path / "adapters").mkdir()
    wrapped.save_pretrained(tmp_path / "adapters" / "demo")
    messages = [{"role": "user", "content": "Name a colour."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = greedy_completions(wrapped, tokenizer, [rendered], 12, progress=False)[0]
    wrapped.unload()
    server = Server("default", tmp_path / "adapters", tmp_path / "server.log").wait_ready(timeout=300)
    try:
        answer = client(server).chat.completions.create(model="demo", messages=messages, max_tokens=12)
        assert answer.choices[0].message.content == want
    finally:
        server.stop()
