"""PG-TD (arXiv:2303.05510) on the default model: hidden-test pass rate of planning-guided decoding versus sampling +
filtering at the same number of program evaluations, on the committed toy coding tasks (test split).

For every task (chat prompt: complete the function, code only; the program is the answer's first code block):

* greedy: one greedy completion;
* sampling + filtering (official ``--alg sample``: top-k sampling with k = width = 3): ``n`` samples, programs run on
  the public tests in sample order (each distinct program once) until one passes them all; the first program with
  the best public reward is kept; several seeds;
* PG-TD: ``PlanningGuidedTransformerDecoding`` with ``max_program_runs = n`` (and at most 256 iterations,
  the paper's rollout count; iterations along cached paths run no model), early stop on a program passing every
  public test.

The kept program is then run on the task's hidden tests (a task counts as solved when every hidden assert passes).
Writes ``results/pg_td_eval.json`` and prints the summary.

    python scripts/eval_pg_td.py            # test split, n = 4 and 8, 3 sampling seeds (~22 min on a busy 2-core CPU)
    python scripts/eval_pg_td.py --split dev --n 4 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

from hf_decoding_ext.core.models import encode_prompts, load_model
from hf_decoding_ext.core.sandbox import Sandbox
from hf_decoding_ext.search.pg_td import (
    ClosedCodeBlockCriteria,
    PlanningGuidedTransformerDecoding,
    code_task_prompt,
    extract_program,
    load_code_tasks,
)

MAX_NEW = 48


def hidden_result(box: Sandbox, program: str | None, task) -> dict:
    if program is None:
        return {"hidden_fraction": 0.0, "hidden_pass": False}
    r = box.run(program, task["hidden_tests"])
    return {"hidden_fraction": r.fraction, "hidden_pass": r.all_passed}


def greedy(model, tok, enc, box, task):
    plen = enc["input_ids"].shape[1]
    crit = StoppingCriteriaList([ClosedCodeBlockCriteria(tok, plen)])
    out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, stopping_criteria=crit)
    program = extract_program(tok.decode(out[0, plen:], skip_special_tokens=True))
    pub = box.run(program, task["public_tests"]).fraction
    return {"program": program, "public": pub, "program_runs": 1, "generated_tokens": int(out.shape[1] - plen),
            **hidden_result(box, program, task)}


def draw_samples(model, tok, enc, n, seed):
    """``n`` top-k (k = 3) samples in one batch (official sampling baseline: ``top_k = width``)."""
    plen = enc["input_ids"].shape[1]
    crit = StoppingCriteriaList([ClosedCodeBlockCriteria(tok, plen)])
    torch.manual_seed(seed)
    out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=True, top_k=3, num_return_sequences=n,
                         stopping_criteria=crit, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    eos = {tok.eos_token_id, tok.pad_token_id}
    samples = []
    for i in range(n):
        ids = out[i, plen:].tolist()
        length = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
        samples.append((extract_program(tok.decode(ids[:length], skip_special_tokens=True)), length))
    return samples


def sample_filter(box, task, samples, n):
    """Sampling + filtering over the first ``n`` samples: run each distinct program on the public tests in sample
    order until one passes them all; keep the first program with the best public reward."""
    rewards: dict[str, float] = {}
    order: list[str] = []
    tokens = 0
    for program, length in samples[:n]:
        tokens += length
        order.append(program)
        if program not in rewards:
            rewards[program] = box.run(program, task["public_tests"]).fraction
            if rewards[program] >= 1.0:
                break
    best = max(rewards.values())
    program = next(p for p in order if rewards[p] == best)
    return {"program": program, "public": best, "program_runs": len(rewards), "samples": len(order),
            "generated_tokens": tokens, **hidden_result(box, program, task)}


def pg_td(model, tok, enc, box, task, n):
    loop = PlanningGuidedTransformerDecoding(tokenizer=tok, tests=task["public_tests"], rollouts=256,
                                             max_program_runs=n, sandbox=box)
    out = model.generate(**enc, custom_generate=loop, max_new_tokens=MAX_NEW, do_sample=False,
                         return_dict_in_generate=True)
    program = out.best_programs[0]
    stats = out.search_stats[0]
    return {"program": program, "public": out.best_rewards[0], "program_runs": stats["program_runs"],
            "generated_tokens": stats["generated_tokens"], "model_calls": stats["model_calls"],
            "cache_hits": stats["cache_hits"], "detail": out.pg_td[0], **hidden_result(box, program, task)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="results/pg_td_eval.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model()
    box = Sandbox(timeout=10.0, per_test_timeout=2.0)
    tasks = load_code_tasks(args.split)[:args.limit]
    items = []
    t0 = time.time()
    for task in tasks:
        enc = encode_prompts(tok, code_task_prompt(task))
        item = {"id": task["id"], "entry_point": task["entry_point"], "greedy": greedy(model, tok, enc, box, task)}
        draws = [draw_samples(model, tok, enc, max(args.n), seed) for seed in range(args.seeds)]
        for n in args.n:
            item[f"sample_filter@{n}"] = [sample_filter(box, task, samples, n) for samples in draws]
            item[f"pg_td@{n}"] = pg_td(model, tok, enc, box, task, n)
        items.append(item)
        print(f"[{time.time() - t0:6.0f}s] {task['id']} greedy pub/hid {item['greedy']['public']:.2f}/"
              f"{item['greedy']['hidden_pass']:d} " + " ".join(
                  f"SF@{n} {statistics.mean(r['hidden_pass'] for r in item[f'sample_filter@{n}']):.2f} "
                  f"PGTD@{n} {item[f'pg_td@{n}']['hidden_pass']:d}" for n in args.n), flush=True)

    def rate(key, field="hidden_pass"):
        return statistics.mean(float(it[key][field]) for it in items)

    summary = {"tasks": len(items), "greedy": {"hidden_pass_rate": rate("greedy"),
                                                "public_pass_rate": statistics.mean(
                                                    float(it["greedy"]["public"] >= 1.0) for it in items),
                                                "mean_generated_tokens": rate("greedy", "generated_tokens")}}
    for n in args.n:
        per_seed = [statistics.mean(float(it[f"sample_filter@{n}"][s]["hidden_pass"]) for it in items)
                    for s in range(args.seeds)]
        summary[f"sample_filter@{n}"] = {
            "hidden_pass_rate_mean": statistics.mean(per_seed),
            "hidden_pass_rate_std": statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0,
            "hidden_pass_rate_per_seed": per_seed,
            "public_pass_rate_mean": statistics.mean(float(r["public"] >= 1.0) for it in items
                                                     for r in it[f"sample_filter@{n}"]),
            "mean_program_runs": statistics.mean(r["program_runs"] for it in items for r in it[f"sample_filter@{n}"]),
            "mean_generated_tokens": statistics.mean(r["generated_tokens"] for it in items
                                                     for r in it[f"sample_filter@{n}"])}
        key = f"pg_td@{n}"
        summary[key] = {"hidden_pass_rate": rate(key),
                        "public_pass_rate": statistics.mean(float(it[key]["public"] >= 1.0) for it in items),
                        "mean_program_runs": rate(key, "program_runs"),
                        "mean_generated_tokens": rate(key, "generated_tokens"),
                        "mean_model_calls": rate(key, "model_calls"), "mean_cache_hits": rate(key, "cache_hits")}
        summary[f"pg_td_minus_sample_filter@{n}"] = (summary[key]["hidden_pass_rate"]
                                                     - summary[f"sample_filter@{n}"]["hidden_pass_rate_mean"])
    largest = max(args.n)
    diff = summary[f"pg_td_minus_sample_filter@{largest}"]
    summary["reproduced"] = bool(diff > 0)
    summary["verdict"] = (f"PG-TD hidden pass rate {summary[f'pg_td@{largest}']['hidden_pass_rate']:.3f} vs sampling "
                          f"+ filtering {summary[f'sample_filter@{largest}']['hidden_pass_rate_mean']:.3f} "
                          f"(mean of {args.seeds} seeds) at <= {largest} program evaluations per task: "
                          + ("reproduced (PG-TD higher)" if diff > 0 else
                             "not reproduced (tie)" if diff == 0 else "not reproduced (PG-TD lower)"))
    settings = {"model": "SmolLM2-135M-Instruct", "split": args.split, "n": args.n, "seeds": args.seeds,
                "max_new_tokens": MAX_NEW, "pg_td": {"rollouts": 256, "max_program_runs": "n", "width": 3,
                                                     "uct_alg": "var_p_uct", "ucb_constant": 4.0, "ucb_base": 10.0,
                                                     "early_stop": True},
                "sample_filter": {"top_k": 3, "temperature": 1.0, "early_stop_on_public_pass": True,
                                  "samples": "the first n of max(n) samples drawn per seed"},
                "torch_threads": 1, "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "summary": summary, "items": items}, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
