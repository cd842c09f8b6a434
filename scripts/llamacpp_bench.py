#!/usr/bin/env python3
"""llama.cpp baseline for the Rust benchmark, via llama-cpp-python.

Measures, on the same GGUF file and the exact same token ids as the Rust side:
  * prefill_s: wall time of one llm.eval(ids) over the whole prompt from an
    empty KV cache (n_batch = n_ubatch = 512, llama.cpp's default; no
    tokenization, no BOS added);
  * decode_ms_per_token: mean wall time of `decode_tokens` greedy steps, each
    one llm.eval([tok]) with tok the argmax of the previous logits;
  * first_token: the argmax after prefill (to cross-check against Rust).

The Rust benchmark runs it with the venv made by scripts/setup-llamacpp.sh:
    .venv-llamacpp/bin/python scripts/llamacpp_bench.py REQUEST.json   (or "-" for stdin)
REQUEST: {"model": "/path/file.gguf", "threads": 2, "decode_tokens": 32,
          "flash_attn": false, "prompts": [{"n": 256, "ids": [1, 2, ...]}, ...]}
It prints one JSON line per prompt on stdout,
    {"n": 256, "prefill_s": 0.53, "decode_ms_per_token": 7.1, "first_token": 1234},
and nothing else there: fd 1 points at stderr while llama.cpp runs.
"""
import json
import os
import sys
import time

import numpy as np


def main() -> None:
    src = sys.stdin if sys.argv[1:] == ["-"] else open(sys.argv[1])
    req = json.load(src)
    # Results go to the real stdout; everything else (llama.cpp's C logging included) to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import llama_cpp

    threads = int(req.get("threads", 2))
    decode_tokens = int(req.get("decode_tokens", 32))
    prompts = req["prompts"]
    llm = None

    def last_argmax() -> int:
        # Logits of the last evaluated token (the only output row, since logits_all=False).
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        return int(np.argmax(logits))

    def clear() -> None:
        llm.reset()  # n_tokens = 0
        llm._ctx.kv_cache_clear()  # and an empty KV cache

    for p in prompts:
        ids = [int(t) for t in p["ids"]]
        need = len(ids) + decode_tokens + 8
        if llm is None or llm.n_ctx() < need:
            llm = None  # free the old context first
            llm = llama_cpp.Llama(
                model_path=req["model"],
                n_ctx=need,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=512,
                n_ubatch=512,
                logits_all=False,
                flash_attn=bool(req.get("flash_attn", False)),
                verbose=False,
            )
            # Untimed warm-up: a short prefill and one decode step.
            clear()
            llm.eval(ids[:8])
            llm.eval([last_argmax()])

        clear()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill_s = time.perf_counter() - t0
        first = tok = last_argmax()

        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([tok])
            tok = last_argmax()
        decode_s = time.perf_counter() - t0

        out.write(json.dumps({
            "n": p.get("n", len(ids)),
            "prefill_s": round(prefill_s, 6),
            "decode_ms_per_token": round(1000 * decode_s / max(decode_tokens, 1), 4),
            "first_token": first,
        }) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
