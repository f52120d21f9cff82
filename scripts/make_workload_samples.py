"""Write the small workload samples that ship in prompts/workloads/ (no downloaded data): seeded, so the same
files come out on every machine.

    python scripts/make_workload_samples.py [--out prompts/workloads]

- sharegpt-sample.json: 48 conversations in the ShareGPT layout (`conversations`: turns `{from, value}`), of
  one to four exchanges, some opened by a system turn, a few without an answer (as real exports have), with
  questions and answers of varied lengths.
- mooncake-sample.jsonl: 60 requests of Mooncake's trace layout over about nine seconds (`timestamp` in ms,
  `input_length`, `output_length`, `hash_ids` of 512-token blocks): four shared prefixes of one or two blocks,
  each request's own blocks after them.
- azure-sample.csv: 200 requests of the Azure LLM inference trace layout (`TIMESTAMP` with seven fractional
  digits, `ContextTokens`, `GeneratedTokens`), bursts and lulls.
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBJECTS = ["the cluster", "a pipeline stage", "the scheduler", "the KV cache", "a tensor-parallel group", "the model",
            "the prompt", "the node", "the queue", "the benchmark", "a micro-batch", "the network", "the GPU",
            "the batch", "the server", "the job"]
VERBS = ["holds", "sends", "waits for", "measures", "splits", "stores", "reads", "answers", "schedules", "reuses",
         "streams", "counts", "drops", "fills", "checks", "starts"]
OBJECTS = ["every token", "the hidden states", "its layers", "a request", "the attention keys", "the next step",
           "the output", "a longer context", "the shared prefix", "the time limit", "its memory", "the answer",
           "the first byte", "each rank", "the whole study", "the reference"]
QUESTIONS = ["Why does {s} {v} {o}?", "How often does {s} {v} {o}?", "Can {s} {v} {o} faster?",
             "What happens if {s} does not {v} {o}?", "Explain why {s} should {v} {o}.", "Should {s} {v} {o} at all?"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."


def text(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def question(rng: random.Random) -> str:
    verb, *rest = rng.choice(VERBS).split()  # the base form after does/can/should: "waits for" -> "wait for"
    q = rng.choice(QUESTIONS).format(s=rng.choice(SUBJECTS), v=" ".join([verb[:-1], *rest]), o=rng.choice(OBJECTS))
    return q if rng.random() < 0.5 else f"{text(rng, rng.randint(1, 6))} {q}"


def sharegpt(rng: random.Random, count: int) -> list[dict]:
    records = []
    for index in range(count):
        turns = []
        if rng.random() < 0.25:
            turns.append({"from": "system", "value": "You are a careful assistant for HPC users."})
        for _ in range(rng.randint(1, 4)):
            turns.append({"from": "human", "value": question(rng)})
            turns.append({"from": "gpt", "value": text(rng, max(1, round(rng.lognormvariate(1.2, 0.8))))})
        if index % 16 == 15:
            turns = [t for t in turns if t["from"] != "gpt"]  # an unanswered conversation: skipped when read
        records.append({"id": f"conv-{index:03d}", "conversations": turns})
    return records


def mooncake(rng: random.Random, count: int) -> list[dict]:
    prefixes = [[0], [1, 2], [3], [4, 5]]  # hash ids of shared blocks (system prompts, documents)
    records, now, own = [], 0.0, 100
    for _ in range(count):
        now += rng.expovariate(1 / 150)  # ms
        shared = rng.choice(prefixes)
        extra = rng.randint(0, 1)
        hashes = shared + list(range(own, own + extra + 1))
        own += extra + 1
        length = 512 * (len(hashes) - 1) + rng.randint(40, 512)
        records.append({"timestamp": round(now), "input_length": length, "output_length": rng.randint(8, 64),
                        "hash_ids": hashes})
    return records


def azure(rng: random.Random, count: int) -> str:
    lines, now = ["TIMESTAMP,ContextTokens,GeneratedTokens"], 1_700_158_546.0  # 2023-11-16 18:15:46 UTC
    for index in range(count):
        now += rng.expovariate(1 / (0.05 if index % 20 < 6 else 0.25))  # bursts, then lulls
        stamp = datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") + str(rng.randint(0, 9))
        lines.append(f"{stamp},{rng.randint(50, 900)},{rng.randint(5, 60)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "prompts" / "workloads")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sharegpt-sample.json"
    path.write_text(json.dumps(sharegpt(random.Random(0), 48), indent=1) + "\n")
    trace = args.out / "mooncake-sample.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in mooncake(random.Random(1), 60)))
    csv_file = args.out / "azure-sample.csv"
    csv_file.write_text(azure(random.Random(2), 200))
    for written in (path, trace, csv_file):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
