"""The official `openai` package against lazyserve's HTTP API, unchanged but for base_url.

  openai_client.py suite BASE_URL MODEL   runs every case, prints one JSON object
  openai_client.py hold BASE_URL          streams, prints "streaming" after 3 chunks, waits
                                          for a line on stdin, then disconnects
  openai_client.py give-up BASE_URL       a long request, not streamed, given up after 1 s
  openai_client.py status BASE_URL        one request; prints the HTTP status and error
  openai_client.py raw BASE_URL           what plain HTTP gets for a few malformed calls
"""
import json
import sys
import urllib.error
import urllib.request

import openai

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(base):
    # No retries: a status is what the test wants to see.
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)


def streamed(chunks, chat):
    text, usage, finish, ext = "", None, None, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage.model_dump()
        for ch in c.choices:
            piece = ch.delta.content if chat else ch.text
            text += piece or ""
            finish = ch.finish_reason or finish
        extra = getattr(c, "model_extra", None) or {}
        ext = extra.get("lazyserve", ext)
    return {"text": text, "usage": usage, "finish_reason": finish, "lazyserve": ext}


def error(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {"status": e.status_code, "body": e.body}
    return {"status": 200}


def suite(base, model):
    c = client(base)
    out = {"models": [m.id for m in c.models.list().data]}
    r = c.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    out["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                         "usage": r.usage.model_dump(), "lazyserve": r.model_extra.get("lazyserve")}
    out["completion_stream"] = streamed(c.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}), chat=False)
    r = c.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0)
    out["chat"] = {"text": r.choices[0].message.content, "role": r.choices[0].message.role,
                   "finish_reason": r.choices[0].finish_reason, "usage": r.usage.model_dump()}
    out["chat_stream"] = streamed(c.chat.completions.create(
        model=model, messages=QUESTION, max_completion_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}), chat=True)
    out["chat_stream_no_usage"] = streamed(c.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, temperature=0, stream=True), chat=True)
    r = c.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[" Paris"])
    out["stop"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}
    r = c.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0.8, seed=7,
                             extra_body={"prune": "off"})
    r2 = c.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0.8, seed=7,
                              extra_body={"prune": "off"})
    out["seeded"] = [r.choices[0].text, r2.choices[0].text]
    out["bad_max_tokens"] = error(lambda: c.completions.create(model=model, prompt=PROMPT, max_tokens=0))
    out["bad_temperature"] = error(lambda: c.chat.completions.create(model=model, messages=QUESTION, temperature=-1))
    out["bad_n"] = error(lambda: c.completions.create(model=model, prompt=PROMPT, n=2))
    out["unknown_model"] = error(lambda: c.completions.create(model="gpt-17", prompt=PROMPT, max_tokens=4))
    out["no_messages"] = error(lambda: c.chat.completions.create(model=model, messages=[]))
    print(json.dumps(out))


def hold(base):
    stream = client(base).completions.create(model="", prompt="Once upon a time", max_tokens=400,
                                             temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    print("streaming", flush=True)
    sys.stdin.readline()
    stream.close()
    print("closed", flush=True)


def give_up(base):
    c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=1.0)
    try:
        c.completions.create(model="", prompt="Once upon a time", max_tokens=4000, temperature=0)
        print("finished")
    except openai.APITimeoutError:
        print("gave up")


def status(base):
    print(json.dumps(error(lambda: client(base).completions.create(model="", prompt=PROMPT, max_tokens=4))))


def raw(base):
    def call(method, path, body=None):
        req = urllib.request.Request(base + path, data=body, method=method,
                                     headers={"content-type": "application/json", "x-request-id": "raw-1"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return {"status": r.status, "body": json.loads(r.read()), "request_id": r.headers.get("x-request-id")}
        except urllib.error.HTTPError as e:
            return {"status": e.code, "body": json.loads(e.read())}
    print(json.dumps({
        "health": call("GET", "/health"),
        "models": call("GET", "/v1/models"),
        "unknown_model": call("GET", "/v1/models/gpt-17"),
        "no_route": call("GET", "/v1/nothing"),
        "bad_json": call("POST", "/v1/completions", b"{not json"),
        "no_prompt": call("POST", "/v1/completions", b"{}"),
        "token_prompt": call("POST", "/v1/completions", json.dumps({"prompt": [[1, 2, 3]]}).encode()),
        "ok": call("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()),
    }))


if __name__ == "__main__":
    {"suite": lambda: suite(sys.argv[2], sys.argv[3]), "hold": lambda: hold(sys.argv[2]),
     "give-up": lambda: give_up(sys.argv[2]),
     "status": lambda: status(sys.argv[2]), "raw": lambda: raw(sys.argv[2])}[sys.argv[1]]()
