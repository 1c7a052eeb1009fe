"""The rollout loop and the OpenAI-compatible client: against `atomlab serve` and a scripted stdlib server.
Also the multi-turn `calculator` environment, which the loop has to drive turn by turn."""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from atomlab.envs import load_environment
from atomlab.envs.builtin import Arithmetic
from atomlab.envs.rollout import chat_completions_url, openai_responder, register, run_episodes
from atomlab.envs.tools import Calculator, calculate, tool_result
from atomlab.errors import AtomlabError
from tests.conftest import free_port, serving, step_folder

KEY = "rollout-key"


class Scripted(BaseHTTPRequestHandler):
    """A chat endpoint that answers arithmetic correctly and drives the calculator tool.
    Counts requests in flight; `fail_first` requests get a 503; a wrong key gets a 401."""

    state: dict = {}

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_POST(self) -> None:
        state = self.state
        self.left = False
        with state["lock"]:
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            state["requests"] += 1
            failing = state["requests"] <= state["fail_first"]
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["bodies"].append(body)
            if state["key"] and self.headers.get("Authorization") != f"Bearer {state['key']}":
                return self.reply(401, {"error": {"message": "invalid API key", "type": "authentication_error"}})
            if failing:
                return self.reply(503, {"error": {"message": "busy"}})
            time.sleep(state["delay"])
            if state["malformed"]:
                return self.reply(200, {"id": "x", "choices": []})
            text = answer(body["messages"])
            self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        finally:
            self.leave()

    def leave(self) -> None:
        """Counted out before the reply is written: a client may send its next request as soon as it has
        read this one's answer, before this handler thread gets to run again."""
        if not self.left:
            self.left = True
            with self.state["lock"]:
                self.state["in_flight"] -= 1

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.leave()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def answer(messages: list[dict]) -> str:
    last = messages[-1]["content"]
    if result := re.fullmatch(r"<result>(-?\d+)</result>", last):
        return f"<answer>{result.group(1)}</answer>"
    if question := re.search(r"What is (\d+) × (\d+) \+ (\d+)\?", last):
        return f"<tool>calculator: {question.group(1)} * {question.group(2)} + {question.group(3)}</tool>"
    if question := re.search(r"What is (-?\d+) ([+-]) (-?\d+)\?", last):
        a, op, b = int(question.group(1)), question.group(2), int(question.group(3))
        return f"<answer>{a + b if op == '+' else a - b}</answer>"
    return "I do not know."


@contextmanager
def scripted_server(
    key: str | None = None, delay: float = 0.0, fail_first: int = 0, malformed: bool = False
) -> Iterator[tuple[str, dict]]:
    state = {
        "lock": threading.Lock(),
        "in_flight": 0,
        "max_in_flight": 0,
        "requests": 0,
        "bodies": [],
        "key": key,
        "delay": delay,
        "fail_first": fail_first,
        "malformed": malformed,
    }
    handler = type("Handler", (Scripted,), {"state": state})
    server = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 64})(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


# The loop and the client against the scripted server


def test_rewards_and_concurrency_against_a_scripted_server():
    env = Arithmetic()
    tasks = env.tasks(seed=5, count=8, difficulty=2)
    with scripted_server(delay=0.2) as (url, state):
        respond = openai_responder(url, "scripted", concurrency=4, seed=100, temperature=0.5, max_tokens=32)
        started = time.monotonic()
        rollouts = run_episodes(env, tasks, respond, samples=2)
        elapsed = time.monotonic() - started
    assert len(rollouts) == 16 and [r.task for r in rollouts[:2]] == [tasks[0], tasks[0]]
    assert [r.sample for r in rollouts[:2]] == [0, 1]
    assert all(r.reward == 1.0 and r.turns == 1 and not r.truncated for r in rollouts)
    assert rollouts[0].transcript[-1] == {"role": "assistant", "content": f"<answer>{tasks[0].answer}</answer>"}
    assert 2 <= state["max_in_flight"] <= 4  # requests overlap, and never more than asked
    assert elapsed < 16 * 0.2  # sequential would take 3.2 s
    bodies = state["bodies"]
    assert sorted(b["seed"] for b in bodies) == list(range(100, 116))  # one seed per request: samples differ
    assert {(b["model"], b["temperature"], b["max_tokens"]) for b in bodies} == {("scripted", 0.5, 32)}


def test_multi_turn_tool_use_over_http():
    env = Calculator()
    tasks = env.tasks(seed=1, count=3, difficulty=1)
    with scripted_server() as (url, state):
        rollouts = run_episodes(env, tasks, openai_responder(url, "scripted", concurrency=3))
    assert [r.reward for r in rollouts] == [1.0, 1.0, 1.0] and [r.turns for r in rollouts] == [2, 2, 2]
    assert rollouts[0].transcript == tasks[0].data["gold_transcript"]
    assert state["requests"] == 6  # two turns, each one batch of three


def test_retries_server_errors_then_succeeds():
    env = Arithmetic()
    with scripted_server(fail_first=2) as (url, state):
        rollouts = run_episodes(env, env.tasks(0, 1), openai_responder(url, "scripted", concurrency=1))
    assert rollouts[0].reward == 1.0 and state["requests"] == 3


def test_wrong_key_is_one_clear_error():
    env = Arithmetic()
    with scripted_server(key=KEY) as (url, _):
        with pytest.raises(AtomlabError, match=r"refused the request \(401\): invalid API key.*--api-key") as caught:
            run_episodes(env, env.tasks(0, 3), openai_responder(url, "scripted", api_key="wrong"))
        assert f"{url}/v1/chat/completions" in str(caught.value)
        assert run_episodes(env, env.tasks(0, 1), openai_responder(url, "scripted", api_key=KEY))[0].reward == 1.0


def test_connection_refused_is_one_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AtomlabError, match="connection refused") as caught:
        run_episodes(Arithmetic(), Arithmetic().tasks(0, 2), openai_responder(url, "m"))
    assert url in str(caught.value)


def test_malformed_response_is_one_clear_error():
    with scripted_server(malformed=True) as (url, _):
        with pytest.raises(AtomlabError, match=r"malformed response \(expected choices\[0\]\.message\.content\)"):
            openai_responder(url, "scripted").complete([{"role": "user", "content": "hi"}])


def test_url_forms():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("https://h/api/openai") == "https://h/api/openai/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    with pytest.raises(AtomlabError, match="http"):
        chat_completions_url("h:8000")


def test_rollout_command(tmp_path, capsys):
    top = argparse.ArgumentParser(prog="atomlab")
    envs = top.add_subparsers(dest="command").add_parser("envs").add_subparsers(dest="envs_command")
    register(envs)
    out = tmp_path / "rollouts.jsonl"
    with scripted_server() as (url, _):
        args = top.parse_args(
            ["envs", "rollout", "arithmetic", "--base-url", url, "--model", "scripted", "--count", "5"]
            + ["--samples", "2", "--concurrency", "3", "--difficulty", "3", "--out", str(out)]
        )
        assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "arithmetic-v1 level 3: accuracy 1.000 (10/10 correct" in printed and str(out) in printed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 10 and {line["reward"] for line in lines} == {1.0}
    assert lines[1]["task"] == "arithmetic-v1/seed0/level3/0" and lines[1]["sample"] == 1
    assert lines[0]["messages"][-1]["role"] == "assistant"
    with pytest.raises(AtomlabError, match="difficulty must be 1..3"):
        args.handler(
            top.parse_args(["envs", "rollout", "arithmetic", "--base-url", url, "--model", "m"] + ["--difficulty", "4"])
        )


# The calculator environment


def scripted(replies: list[str]):
    """A generator that gives the same replies, in turn, to every conversation."""

    def respond(conversations: list[list[dict]]) -> list[str]:
        return [replies[sum(m["role"] == "assistant" for m in c)] for c in conversations]

    return respond


def test_calculator_gold_transcript_scores_one():
    env = load_environment("calculator")
    for level in (1, 2, 3):
        task = env.task(4, 0, level)
        gold = [m["content"] for m in task.data["gold_transcript"] if m["role"] == "assistant"]
        [rollout] = run_episodes(env, [task], scripted(gold))
        assert rollout.reward == 1.0 and rollout.turns == 2, rollout.reason
        assert rollout.transcript == task.data["gold_transcript"]  # the tool answered as the gold transcript says
        assert task.solution == gold[-1] and env.verify(task, task.solution).reward == 1.0


def test_calculator_needs_the_final_format():
    env = Calculator()
    task = env.task(0, 0, 1)
    [rollout] = run_episodes(env, [task], scripted([f"The answer is {task.answer}."]))
    assert rollout.reward == 0.0 and rollout.turns == 1 and "no <answer>" in rollout.reason
    [wrong] = run_episodes(env, [task], scripted([f"<answer>{int(task.answer) + 1}</answer>"]))
    assert wrong.reward == 0.0


def test_calculator_too_many_tool_calls_end_truncated():
    env = Calculator()
    [rollout] = run_episodes(env, [env.task(0, 0, 2)], scripted(["<tool>calculator: 1 + 1</tool>"] * 10))
    assert rollout.truncated and rollout.reward == 0.0 and rollout.turns == env.max_turns
    assert rollout.reason == "out of turns"
    assert rollout.transcript[2] == {"role": "user", "content": "<result>2</result>"}


@pytest.mark.parametrize(
    "expression", ["__import__('os').system('true')", "9**9**9", "10**10**10", "(1" * 150, "2**(2**62)", "[1]*10**9"]
)
def test_calculator_refuses_malicious_expressions_fast(expression):
    started = time.perf_counter()
    result = tool_result(expression)
    assert result.startswith("<result>error: ") and time.perf_counter() - started < 0.05


def test_calculator_arithmetic():
    assert calculate("4821 × 7390 + 512") == 4821 * 7390 + 512
    assert calculate("(7 - 10) * 3 // 2") == -5 and calculate("7 / 2") == 3.5 and calculate("8 / 2") == 4
    assert tool_result("1/0") == "<result>error: division by zero</result>"
    assert tool_result("2^8").startswith("<result>error: ^ is not a power")


# Against atomlab's own server, as a client would use it


@pytest.fixture(scope="module")
def atomlab_server(smoke_run):
    with serving(step_folder(smoke_run, "release"), "--api-key", KEY, "--model-name", "smoke") as url:
        yield url


def test_rollouts_against_atomlab_serve(atomlab_server):
    env = Arithmetic()
    tasks = env.tasks(seed=0, count=6)
    respond = openai_responder(atomlab_server, "smoke", api_key=KEY, concurrency=4, max_tokens=12, temperature=0)
    rollouts = run_episodes(env, tasks, respond)
    assert [r.task for r in rollouts] == tasks
    assert all(r.reward in (0.0, 1.0) and r.turns == 1 for r in rollouts)
    # Greedy decoding: the transcript holds exactly what the server says to the same prompt.
    direct = respond.complete(tasks[2].messages)
    assert rollouts[2].transcript == [*tasks[2].messages, {"role": "assistant", "content": direct}]
    with pytest.raises(AtomlabError, match="401"):
        openai_responder(atomlab_server, "smoke", api_key="wrong").complete(tasks[0].messages)
