#!/usr/bin/env python3
"""llama.cpp's answers on Gemma 3 270M, for tests/gemma3.rs (tests/data/gemma3-llamacpp.json).

CI cannot build llama.cpp in its time, so its outputs are recorded once with this script
and the Rust tests compare against the record:
  * tokens: llama.cpp's tokenization (BOS added, special tokens parsed) of
    tests/data/prose.txt, of each of its paragraphs, and of a few short cases;
  * greedy: for short prompts, the prompt ids, the first greedy tokens and each step's ten
    largest logits (where another engine's greedy text may part from llama.cpp's only at
    a near tie);
  * logits: the full last-position logits' top 40 for one prompt, with their values.
Run with the venv made by scripts/setup-llamacpp.sh:
    .venv-llamacpp/bin/python scripts/gemma3_reference.py models/gemma-3-270m-q4_k_m.gguf \
        > tests/data/gemma3-llamacpp.json
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
    "Hello world",
    " leading space and trailing space ",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "naïve café, Œuvre, 東京, emoji 🙂 and a rare glyph \u2e3b.",
    "\n\n\n\ttabbed\t\t\t line",
]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n",
    "The three primary colours are",
]
GREEDY_TOKENS = 16


def main() -> None:
    model = sys.argv[1]
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=2048, n_threads=2, verbose=False)
    tok = lambda text: llm.tokenize(text.encode(), add_bos=True, special=True)
    prose = open(os.path.join(ROOT, "tests/data/prose.txt"), encoding="utf-8").read()
    texts = [prose] + [p for p in prose.split("\n\n") if p.strip()] + SHORT

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()

    greedy = []
    for prompt in PROMPTS:
        ids = tok(prompt)
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(ids)
        gen, steps = [], []
        for _ in range(GREEDY_TOKENS):
            step = logits()
            top = np.argsort(-step)[:10]
            t = int(top[0])
            gen.append(t)
            steps.append([[int(i), float(step[i])] for i in top])
            if t == llm.token_eos():
                break
            llm.eval([t])
        greedy.append({"prompt": prompt, "ids": ids, "tokens": gen, "steps": steps})

    ids = tok(PROMPTS[0])
    llm.reset()
    llm._ctx.kv_cache_clear()
    llm.eval(ids)
    last = logits()
    top = np.argsort(-last)[:40]
    json.dump(
        {
            "llama_cpp_python": llama_cpp.__version__,
            "model": os.path.basename(model),
            "tokens": [{"text": t, "ids": tok(t)} for t in texts],
            "greedy": greedy,
            "logits": {"ids": ids, "top": [[int(i), float(last[i])] for i in top]},
        },
        out,
        ensure_ascii=False,
        indent=1,
    )
    out.write("\n")


if __name__ == "__main__":
    main()
