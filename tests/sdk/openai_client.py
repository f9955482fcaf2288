"""Drives the official openai Python SDK against Aura (run by tests/sdk.rs).

Usage: openai_client.py BASE_URL CHUNKS [quota]
Aura must be in front of the project's mock upstream, which streams CHUNKS content chunks
("tok0 ", "tok1 ", ...). With `quota`, Aura's key limit is spent (0): every request must raise
the SDK's status error for 402 with OpenAI's `insufficient_quota` code instead.
Exits 0 when every check passes, 1 on a failed check (with the reason on stderr), 3 when the
openai package cannot be imported.
"""

import sys

try:
    import openai
except ImportError as error:
    print(
        f"openai_client.py: cannot import openai with {sys.executable} ({error}); "
        "run scripts/test, which makes a venv with the SDK and sets AURA_TEST_PYTHON",
        file=sys.stderr,
    )
    sys.exit(3)


def fail(message):
    print(f"openai_client.py: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def quota(client, messages):
    """A spent key: streamed or not, the SDK raises its status error for 402, quota exhausted."""
    for stream in (False, True):
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=stream)
            fail(f"a request on a spent key went through (stream={stream})")
        except openai.APIStatusError as error:
            check(error.status_code == 402, f"status {error.status_code}, expected 402")
            check(error.code == "insufficient_quota", f"code {error.code!r}")
            check(error.type == "insufficient_quota", f"type {error.type!r}")
            check("budget exhausted" in error.message, f"message {error.message!r}")
    print(f"openai_client.py: quota ok (openai {openai.__version__})")


def main():
    base_url, chunks = sys.argv[1], int(sys.argv[2])
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "Say hello"}]
    if sys.argv[3:] == ["quota"]:
        return quota(client, messages)
    expected = "".join(f"tok{i} " for i in range(chunks))

    # 1. A stream without stream_options: Aura asks the upstream for usage, but the client must
    #    see the stream it asked for: no usage, no chunk with empty choices.
    got = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))
    check(got, "no chunks in a stream")
    for i, chunk in enumerate(got):
        check(chunk.usage is None, f"chunk {i} has usage the client did not ask for: {chunk.usage}")
        check(chunk.choices, f"chunk {i} has empty choices (the usage event leaked): {chunk}")
    content = "".join(c.choices[0].delta.content or "" for c in got)
    check(content == expected, f"streamed content {content!r}, expected {expected!r}")
    check(got[-1].choices[0].finish_reason == "stop", f"last chunk's finish_reason: {got[-1]}")

    # 2. A stream with include_usage: the last chunk carries usage and empty choices.
    got = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    last = got[-1]
    check(last.usage is not None, f"no usage in the last chunk: {last}")
    check(not last.choices, f"the usage chunk has choices: {last}")
    check(last.usage.completion_tokens == chunks, f"completion_tokens {last.usage.completion_tokens}, expected {chunks}")
    check(last.usage.prompt_tokens >= 1, f"prompt_tokens {last.usage.prompt_tokens}")
    check(
        last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens,
        f"total_tokens {last.usage.total_tokens}",
    )
    for i, chunk in enumerate(got[:-1]):
        check(chunk.usage is None, f"chunk {i} before the usage chunk has usage: {chunk.usage}")
    content = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    check(content == expected, f"streamed content {content!r}, expected {expected!r}")

    # 3. Not streamed: usage in the JSON answer.
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    check(resp.usage is not None, f"no usage in a whole answer: {resp}")
    check(resp.usage.completion_tokens == chunks, f"completion_tokens {resp.usage.completion_tokens}, expected {chunks}")
    check(resp.choices[0].message.content == expected, f"content {resp.choices[0].message.content!r}")

    # 4. An upstream error reaches the SDK as the matching exception.
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, extra_headers={"x-mock-status": "429"})
        fail("an upstream 429 did not raise")
    except openai.RateLimitError:
        pass

    print(f"openai_client.py: ok (openai {openai.__version__})")


if __name__ == "__main__":
    main()
