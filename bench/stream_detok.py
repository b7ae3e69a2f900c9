"""What streaming a long completion costs the server in detokenization: the whole text decoded again for every
token (the server before 2026-12-01) vs ``serve.streams.IncrementalText`` (a window per token).

    .venv/bin/python bench/stream_detok.py [--model runs/demo/grpo/model] [--tokens 4000]

A completion of ``--tokens`` tokens (the demo's trace repeated) is fed one token at a time, as the scheduler
emits them; both sides must end with the same text. Ends with:
RESULT stream_detok tokens=… full_ms=… incremental_ms=… speedup=…
"""
from __future__ import annotations

import argparse
import time

from thinkforge.models import char_tokenizer
from thinkforge.serve.streams import IncrementalText


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a model folder whose tokenizer to use (default: thinkforge's)")
    ap.add_argument("--tokens", type=int, default=4000)
    args = ap.parse_args()
    if args.model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        tok = char_tokenizer()
    trace = "<think>\n743*9=3213\n743*08=06772\n3213+06772=38803\n</think>\n<answer>30883</answer>\n"
    ids = tok.encode(trace * (args.tokens // len(tok.encode(trace, add_special_tokens=False)) + 1),
                     add_special_tokens=False)[: args.tokens]
    t = time.perf_counter()
    for k in range(1, len(ids) + 1):
        full = tok.decode(ids[:k])
    full_s = time.perf_counter() - t
    inc = IncrementalText(tok)
    t = time.perf_counter()
    for k in range(len(ids)):
        inc.add(ids[k : k + 1])
    inc_s = time.perf_counter() - t
    assert inc.text == full, "the incremental text differs from the full decode"
    print(f"{len(ids)} tokens streamed one at a time: full re-decode {full_s * 1e3:.0f} ms "
          f"({full_s / len(ids) * 1e3:.3f} ms per token), incremental {inc_s * 1e3:.0f} ms "
          f"({inc_s / len(ids) * 1e3:.3f} ms per token); texts equal")
    print(f"RESULT stream_detok tokens={len(ids)} full_ms={full_s * 1e3:.0f} incremental_ms={inc_s * 1e3:.0f} "
          f"speedup={full_s / inc_s:.1f}")


if __name__ == "__main__":
    main()
