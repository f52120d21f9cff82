"""Write the small workload samples that ship in prompts/workloads/ (no downloaded data): seeded, so the same
files come out on every machine.

    python scripts/make_workload_samples.py [--out prompts/workloads]

- sharegpt-sample.json: 48 conversations in the ShareGPT layout (`conversations`: turns `{from, value}`), of
  one to four exchanges, some opened by a system turn, a few without an answer (as real exports have), with
  questions and answers of varied lengths.
"""

from __future__ import annotations

import argparse
import json
import random
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "prompts" / "workloads")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sharegpt-sample.json"
    path.write_text(json.dumps(sharegpt(random.Random(0), 48), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
