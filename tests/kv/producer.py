"""Producer engine for the cross-process kv tests: run as a child process.

    producer.py MODEL STORE OUT

Snapshots PREFIX into STORE, resumes one branch from its own prefix cache (the
reference output), writes {"handle", "logprobs", "tokens", "cached"} to OUT, then
waits to be killed: the consumer must not depend on this process being alive.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PREFIX = [(i * 11 + 5) % 500 + 3 for i in range(256)]
NEW = [7, 8, 9, 10, 11]


def main() -> None:
    from branching.kv.fork import make_engine, resume, snapshot

    model, store, out = sys.argv[1:4]
    engine = make_engine(model, store=store, dtype="float32", max_model_len=4096,
                         enforce_eager=True)
    handle = snapshot(engine, PREFIX)
    own = resume(engine, handle, NEW, greedy())
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"handle": handle.to_json(), "logprobs": own.logprobs,
                   "tokens": own.token_ids, "cached": own.cached_tokens, "new": NEW}, f)
    os.replace(tmp, out)
    time.sleep(600)


def greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0,
                          detokenize=False)


if __name__ == "__main__":
    main()
