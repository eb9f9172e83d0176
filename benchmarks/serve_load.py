"""`kvtier serve` under concurrent OpenAI clients vs the same requests through offline `LLM.generate`.

U users hold multi-turn conversations (token-id prompts through /v1/completions, so the
server and the offline engine see exactly the same tokens): each turn appends a user
message to the history, all users send their turn at once (one thread each, streaming, so
TTFT and inter-token latency are measured at the client), and the answer is appended for the
next turn. The offline run (a process of its own, as the server is) sends each turn's
prompts as one `LLM.generate` batch and goes first; the server's histories append the
offline answers' token ids, and its answers' text must equal theirs (greedy). Streaming
clients read the events through the OpenAI client's raw response (`--parsed-events`: as the
SDK's objects). Both run with and without a CPU tier, `--repeats` times in alternating order
(offline first, then server first); the ratios are of the median throughputs and, per
repeat, of the pair run back to back (their median is the steadier figure on a noisy
machine). Prints JSON.

    python benchmarks/serve_load.py [--users 8] [--turns 4] [--repeats 3] [--parsed-events]
                                    [--stream-interval N] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench_io import emit


def _workload(args, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
    rng = random.Random(0)
    system = [rng.randrange(3, vocab) for _ in range(args.system_tokens)]
    turns = [[[rng.randrange(3, vocab) for _ in range(rng.randint(32, 96))] for _ in range(args.users)]
             for _ in range(args.turns)]
    return system, turns


def run_offline(model: str, args, system, turns, tiers: list[str] | None) -> dict:
    from kvtier import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    histories = [list(system) for _ in range(args.users)]
    tokens, answers = 0, []
    with LLM(model, kv_tiers=tiers) as llm:
        start, cpu = time.perf_counter(), time.process_time()
        for turn in turns:
            for h, msg in zip(histories, turn):
                h.extend(msg)
            outs = llm.generate([{"prompt_token_ids": list(h)} for h in histories], params, use_tqdm=False)
            answers.append([(o.outputs[0].token_ids, o.outputs[0].text) for o in outs])
            for h, out in zip(histories, outs):
                h.extend(out.outputs[0].token_ids)
                tokens += len(out.prompt_token_ids) + len(out.outputs[0].token_ids)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        steps, step_s = llm.engine.num_steps, llm.engine.step_seconds
    return {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1), "engine_steps": steps,
            "step_seconds": round(step_s, 2), "cpu_seconds": round(cpu, 2), "answers": answers}


def run_offline_process(model: str, args, tiers: list[str] | None) -> dict:
    """run_offline in a process of its own, as the server has: neither side inherits the
    other's warm allocator and kernel caches."""
    spec = json.dumps({"model": model, "tiers": tiers, "users": args.users, "turns": args.turns,
                       "system_tokens": args.system_tokens, "max_tokens": args.max_tokens})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--offline-child", spec],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"offline run failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _offline_child(spec: str) -> int:
    from kvtier.engine.model_config import load_model_config

    cfg = json.loads(spec)
    args = argparse.Namespace(**{k: cfg[k] for k in ("users", "turns", "system_tokens", "max_tokens")})
    system, turns = _workload(args, load_model_config(cfg["model"]).vocab_size)
    print(json.dumps(run_offline(cfg["model"], args, system, turns, cfg["tiers"])))
    return 0


def _start_server(model: str, tiers: list[str] | None, stream_interval: int = 1) -> tuple[subprocess.Popen, str]:
    # Engine settings as offline's LLM(model): the defaults (max_num_seqs included).
    cmd = [sys.executable, "-m", "kvtier", "serve", "--model", model, "--port", "0",
           "--stream-interval", str(stream_interval)]
    cmd += [f"--kv-tier={t}" for t in tiers] if tiers else ["--no-kv-tiers"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError("kvtier serve exited before listening")


def run_server(model: str, args, system, turns, answers, tiers: list[str] | None) -> dict:
    from openai import OpenAI

    proc, url = _start_server(model, tiers, args.stream_interval)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        histories = [list(system) for _ in range(args.users)]
        ttft, itl, cached = [], [], 0
        tokens, mismatches = 0, 0
        lock = threading.Lock()

        def one(u: int) -> None:
            nonlocal tokens, cached, mismatches
            sent = time.perf_counter()
            stamps, text = [], ""
            common = dict(model=model, prompt=list(histories[u]), max_tokens=args.max_tokens, temperature=0,
                          extra_body={"ignore_eos": True})
            if args.no_stream:  # one response per request: no per-token work on either side
                done = client.completions.create(**common)
                text, usage = done.choices[0].text, done.usage
            elif args.parsed_events:  # the SDK's objects for every event: its full per-event cost
                usage = None
                for chunk in client.completions.create(**common, stream=True, stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].text:
                        stamps.append(time.perf_counter())
                        text += chunk.choices[0].text
                    if getattr(chunk, "usage", None):
                        usage = chunk.usage
            else:
                text, usage = _read_events(client, common, stamps)
            prompt, completion, hit = _usage_numbers(usage)
            with lock:
                if stamps:
                    ttft.append(stamps[0] - sent)
                itl.extend(b - a for a, b in zip(stamps, stamps[1:]))
                tokens += prompt + completion
                cached += hit
                mismatches += text != expected[u][1]

        start, client_cpu, server_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(proc.pid)
        for turn, expected in zip(turns, answers):
            for h, msg in zip(histories, turn):
                h.extend(msg)
            threads = [threading.Thread(target=one, args=(u,)) for u in range(args.users)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for h, (ids, _) in zip(histories, expected):
                h.extend(ids)
        seconds = time.perf_counter() - start
        client_cpu, server_cpu = time.process_time() - client_cpu, _cpu_seconds(proc.pid) - server_cpu
        steps, step_s = _engine_counters(url)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ms = lambda xs, q: round(1e3 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 1)  # noqa: E731
    return {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1), "engine_steps": steps,
            "step_seconds": round(step_s, 2), "cpu_seconds": round(server_cpu, 2),
            "client_cpu_seconds": round(client_cpu, 2), "cached_tokens": cached,
            "ttft_ms_p50": ms(ttft, 0.5) if ttft else None, "ttft_ms_p99": ms(ttft, 0.99) if ttft else None,
            "itl_ms_p50": ms(itl, 0.5) if itl else None, "itl_ms_p99": ms(itl, 0.99) if itl else None,
            "answers_differing_from_offline": mismatches}


def _read_events(client, common: dict, stamps: list[float]) -> tuple[str, dict | None]:
    """A streamed completion read through the OpenAI client's raw response, each event
    parsed with json.loads: the same requests and bytes as the SDK's objects, at a fraction
    of the client's CPU, which on a small machine is taken from the server's cores."""
    text, usage = "", None
    with client.completions.with_streaming_response.create(
            **common, stream=True, stream_options={"include_usage": True}) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("error"):
                raise RuntimeError(f"server error: {event['error']}")
            if event.get("choices") and event["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                text += event["choices"][0]["text"]
            if event.get("usage"):
                usage = event["usage"]
    return text, usage


def _usage_numbers(usage) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of a usage object or dict."""
    if usage is None:
        raise RuntimeError("the response carried no usage")
    if isinstance(usage, dict):
        return (usage["prompt_tokens"], usage["completion_tokens"],
                (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    return usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _engine_counters(url: str) -> tuple[int, float]:
    """Forward passes and their seconds, from the server's /metrics (the start-up probe is
    not counted by the engine, so both sides count the workload alone)."""
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    found = dict(re.findall(r"^kvtier_(engine_steps_total|engine_step_seconds_total) (\S+)$", text, re.M))
    return int(float(found["engine_steps_total"])), float(found["engine_step_seconds_total"])


def _median(runs: list[dict]) -> dict:
    """Per figure, the median over runs; throughputs of each run kept for the spread."""
    row = {key: statistics.median(r[key] for r in runs) for key, value in runs[0].items()
           if isinstance(value, (int, float)) and all(r.get(key) is not None for r in runs)}
    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    if "answers_differing_from_offline" in row:
        row["answers_differing_from_offline"] = sum(r["answers_differing_from_offline"] for r in runs)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the 'small' llama, made in a temp dir)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; figures are medians")
    ap.add_argument("--no-stream", action="store_true",
                    help="non-streaming requests (no TTFT / inter-token figures): the server's cost without SSE")
    ap.add_argument("--parsed-events", action="store_true",
                    help="streaming clients build the OpenAI SDK's objects for every event (default: they read "
                         "the raw event stream through the same client and json.loads each event)")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="the server's --stream-interval: tokens per streamed event after the first")
    ap.add_argument("--configs", default="no_tier,cpu_tier", help="which of no_tier,cpu_tier to run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--offline-child", help=argparse.SUPPRESS)  # run_offline_process's child
    args = ap.parse_args(argv)
    if args.offline_child:
        return _offline_child(args.offline_child)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.stream_interval < 1:
        ap.error("--stream-interval must be at least 1")
    known = {"no_tier": None, "cpu_tier": ["cpu:1GiB"]}
    names = [c for c in args.configs.split(",") if c]
    if not names or any(c not in known for c in names):
        ap.error(f"--configs: choose from {', '.join(known)}")
    configs = [(c, known[c]) for c in names]
    from kvtier.engine.make_model import make_model
    from kvtier.engine.model_config import load_model_config

    result = {"users": args.users, "turns": args.turns, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "client": "non-streaming" if args.no_stream else "sdk objects" if args.parsed_events else "raw events",
              "stream_interval": args.stream_interval}
    with tempfile.TemporaryDirectory(prefix="kvtier-serve-load-") as tmp:
        model = args.model or make_model(os.path.join(tmp, "model"), arch="llama", size="small", seed=0)
        system, turns = _workload(args, load_model_config(model).vocab_size)
        for name, tiers in configs:
            offline, served = [], []
            answers = None
            for r in range(args.repeats):
                # Alternate which side runs first so a slow spell on the machine hits both.
                for side in (("offline", "server") if r % 2 == 0 else ("server", "offline")):
                    if side == "offline" or answers is None:
                        offline.append(run_offline_process(model, args, tiers))
                        answers = offline[-1].pop("answers")
                    if side == "server":
                        served.append(run_server(model, args, system, turns, answers, tiers))
            # Each repeat's pair ran back to back: its ratio cancels the machine's slow drifts,
            # which here move a side's own throughput by up to a third between repeats.
            paired = [s["tokens_per_s"] / o["tokens_per_s"] for o, s in zip(offline, served)]
            result[name] = {"offline": _median(offline), "server": _median(served),
                            "server_over_offline": round(statistics.median(s["tokens_per_s"] for s in served)
                                                         / statistics.median(o["tokens_per_s"] for o in offline), 3),
                            "server_over_offline_paired": round(statistics.median(paired), 3),
                            "paired_ratios": [round(r, 3) for r in paired]}
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
