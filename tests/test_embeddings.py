"""Embeddings with the official SDK and LangChain, through a real gateway to a real worker.

The gateway fronts the session's llama worker (the bundled SmolLM2, whose GGUF declares no
pooling: mean pooling) and a sim worker serving the same model name, which cannot embed:
every embeddings request must reach the llama worker, every input must come back in order
and from few llama_decode calls (counted in the worker's /status).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from conftest import MODEL, caps_for, client_for, require_backend, status
from procs import Gateway, Worker, metric, start_gateway, start_worker, wait_for

HEADER = "x-corral-worker"
KEY, USER = "sk-embed", "embedder"
_THINGS = ("cup book lamp phone key pen plate bowl box bag hat shoe sock coin card map ball "
           "toy fork knife spoon glass bottle jar vase clock watch ring chain leaf shell stone")
TEXTS = [f"Note {i}: the {w} is on the table." for i, w in enumerate(_THINGS.split(" "))]
assert len(TEXTS) == 32


@pytest.fixture(scope="module")
def sim_twin() -> Iterator[Worker]:
    """A worker serving the same model name with the sim backend: it cannot embed."""
    w = start_worker("--model", MODEL, "--sim-tokens-per-second", "200", backend="sim")
    yield w
    w.proc.stop()


@pytest.fixture(scope="module")
def gw(llama_worker: Worker, sim_twin: Worker, tmp_path_factory) -> Iterator[Gateway]:
    conf = tmp_path_factory.mktemp("embed") / "corral.toml"
    conf.write_text(f'[[api_keys]]\nkey = "{KEY}"\nuser = "{USER}"\ntpm = 1000000\n')
    g = start_gateway("--worker", llama_worker.url, "--worker", sim_twin.url,
                      "--config", str(conf))
    wait_for(lambda: sum(w["state"] in ("ready", "busy") for w in _cluster(g)["workers"]) == 2,
             60, 0.05, "both workers ready")
    yield g
    sim_twin.proc.stop()  # before the gateway, which would otherwise not see it leave
    g.proc.stop()


def _cluster(g: Gateway) -> dict:
    return httpx.get(f"{g.url}/cluster", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=5).json()


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    return client_for(gw.url, api_key=KEY, timeout=180)


def embed(client: openai.OpenAI, inputs, **kw) -> np.ndarray:
    r = client.embeddings.create(model=MODEL, input=inputs, **kw)
    return np.array([d.embedding for d in r.data], dtype=np.float32)


def test_single_input_is_a_unit_vector_from_the_llama_worker(client, llama_worker) -> None:
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=TEXTS[0],
                                                     encoding_format="float")
    r = raw.parse()
    assert raw.headers[HEADER] == llama_worker.id
    assert r.model == MODEL and len(r.data) == 1 and r.data[0].index == 0
    v = np.array(r.data[0].embedding)
    assert v.shape == (576,)
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-4  # L2-normalised, like llama-server
    assert r.usage.prompt_tokens == r.usage.total_tokens
    assert r.usage.prompt_tokens == len(caps_for("llama").tokenize(TEXTS[0]))


def test_batch_of_32_in_order_and_in_few_decodes(client, llama_worker) -> None:
    before = status(llama_worker)["embeddings"]
    r = client.embeddings.create(model=MODEL, input=TEXTS)
    after = status(llama_worker)["embeddings"]
    assert [d.index for d in r.data] == list(range(32))
    # One llama_decode carries many inputs (214 tokens fit the 512-token window at once).
    assert after["inputs"] - before["inputs"] == 32
    assert after["decodes"] - before["decodes"] <= 2
    tok = caps_for("llama").tokenize
    assert r.usage.prompt_tokens == sum(len(tok(t)) for t in TEXTS)
    batch = np.array([d.embedding for d in r.data], dtype=np.float32)
    for i in (0, 13, 31):  # each vector belongs to its own input
        alone = embed(client, TEXTS[i])[0]
        sims = batch @ alone
        assert int(np.argmax(sims)) == i and sims[i] > 0.999


def test_base64_equals_float(client) -> None:
    floats = client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float")
    b64 = client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="base64")
    for f, b in zip(floats.data, b64.data, strict=True):
        assert isinstance(b.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        assert np.array_equal(decoded, np.array(f.embedding, dtype=np.float32))
    # The SDK's default (it asks for base64 and decodes) gives the same numbers.
    default = embed(client, TEXTS[:3])
    assert np.array_equal(default, np.array([f.embedding for f in floats.data], np.float32))


def test_same_text_twice_gives_the_same_vector(client) -> None:
    assert np.array_equal(embed(client, "The weather is lovely today."),
                          embed(client, "The weather is lovely today."))


def test_related_texts_are_closer_than_unrelated(client) -> None:
    a, a2, other = embed(client, ["The cat sat on the mat.", "A cat is sitting on the mat.",
                                  "Quarterly tax filings are due in April."])
    assert float(a @ a2) > float(a @ other)


def test_token_arrays_embed_like_their_text(client) -> None:
    tokens = caps_for("llama").tokenize(TEXTS[5])
    text_v = embed(client, [TEXTS[5]])
    r = client.embeddings.create(model=MODEL, input=[tokens, tokens[:3]])
    assert r.usage.prompt_tokens == len(tokens) + 3
    assert np.array_equal(np.array(r.data[0].embedding, np.float32)[None, :], text_v) or \
        float(np.array(r.data[0].embedding) @ text_v[0]) > 0.9999
    one = client.embeddings.create(model=MODEL, input=tokens)  # a single token array
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(tokens)


BAD = [
    ({"input": ""}, "input", None),
    ({"input": []}, "input", None),
    ({"input": ["fine", ""]}, "input", None),
    ({"input": [[]]}, "input", None),
    ({"input": 5}, "input", None),
    ({"input": [1, "a"]}, "input", None),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", None),
    ({"input": "x", "dimensions": 64}, "dimensions", "unsupported_parameter"),
    ({"input": [10**8]}, "input", None),
    ({"input": [-1, 2]}, "input", None),
    ({"input": "word " * 700}, "input", "context_length_exceeded"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD, ids=[str(b)[:40] for b, _, _ in BAD])
def test_bad_input_is_an_openai_400(gw, body, param, code) -> None:
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": MODEL, **body},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    if code:
        assert err["code"] == code


def test_routes_only_to_workers_that_embed(client, gw, llama_worker, sim_twin) -> None:
    for _ in range(6):
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=["a", "b"])
        assert raw.headers[HEADER] == llama_worker.id
    # Chat still goes to both (the sim is the lighter box for it).
    served = {client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
    ).headers[HEADER] for _ in range(8)}
    assert sim_twin.id in served
    cards = client.models.list().model_dump()["data"]
    assert cards[0]["capabilities"] == ["chat", "completions", "embeddings"]
    cl = _cluster(gw)
    caps = {w["id"]: w["capabilities"] for w in cl["workers"]}
    assert caps[llama_worker.id] == ["chat", "completions", "embeddings"]
    assert caps[sim_twin.id] == ["chat", "completions"]
    assert cl["models"] == [{"id": MODEL, "capabilities": ["chat", "completions", "embeddings"],
                             "workers": sorted([llama_worker.id, sim_twin.id])}]


def test_a_model_no_worker_can_embed_is_a_400(gateway_factory, sim_twin) -> None:
    g = gateway_factory("--worker", sim_twin.url)
    wait_for(lambda: httpx.get(f"{g.url}/readyz", timeout=5).status_code == 200, 30, 0.05,
             "the sim worker")
    c = client_for(g.url)
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model=MODEL, input="hello")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "embeddings_unsupported"
    assert c.models.list().model_dump()["data"][0]["capabilities"] == ["chat", "completions"]
    # The sim worker itself refuses too, OpenAI-shaped.
    r = httpx.post(f"{sim_twin.url}/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_usage_is_counted_for_the_key_user(client, gw) -> None:
    before = metric(gw.url, "corral_user_tokens_total", user=USER, kind="prompt")
    r = client.embeddings.create(model=MODEL, input=TEXTS[:4])
    wait_for(lambda: metric(gw.url, "corral_user_tokens_total", user=USER, kind="prompt")
             - before == r.usage.prompt_tokens, 10, 0.05, "usage recorded")


def test_status_says_how_embeddings_are_made(llama_worker) -> None:
    st = status(llama_worker)
    assert st["capabilities"]["embeddings"] is True
    e = st["embeddings"]
    assert e["pooling"] == "mean" and e["dimensions"] == 576 and e["normalized"] == "l2"
    assert "declares no pooling" in e["pooling_note"]


def test_embeddings_beside_generation(client, llama_worker) -> None:
    """Embeddings while a completion is generating: both finish, the vectors stay the same."""
    idle = embed(client, TEXTS)
    direct = client_for(llama_worker.url, timeout=180)
    out: dict[str, str | None] = {}

    def generate() -> None:
        r = direct.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=48,
                                      temperature=0)
        out["finish"] = r.choices[0].finish_reason

    t = threading.Thread(target=generate)
    t.start()
    wait_for(lambda: status(llama_worker)["slots_busy"] >= 1 or "finish" in out, 60, 0.01,
             "generation started")
    busy = embed(client, TEXTS)
    t.join(180)
    assert out.get("finish") == "length"
    assert (np.sum(busy * idle, axis=1) > 0.999).all()


def test_langchain_openai_embeddings(gw) -> None:
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model=MODEL, base_url=f"{gw.url}/v1", api_key=KEY,
                          check_embedding_ctx_length=False, max_retries=0)
    docs = lc.embed_documents(["Paris is in France.", "Bananas are yellow."])
    query = lc.embed_query("Paris is in France.")
    assert len(docs) == 2 and len(query) == 576
    assert float(np.dot(docs[0], query)) > float(np.dot(docs[1], query))


def test_openvino_worker_refuses_embeddings_clearly(openvino_api_worker) -> None:
    require_backend("openvino")
    st = status(openvino_api_worker)
    assert not st["capabilities"].get("embeddings") and st.get("embeddings") is None
    r = httpx.post(f"{openvino_api_worker.url}/v1/embeddings",
                   json={"model": MODEL, "input": "hello"}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "embeddings_unsupported"
    assert "IR" in err["message"]
