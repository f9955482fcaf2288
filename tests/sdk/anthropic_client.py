"""Drives the official anthropic Python SDK against Aura (run by tests/anthropic.rs).

Usage: anthropic_client.py BASE_URL API_KEY CHUNKS [quota]
Aura must route claude-* models to the project's mock upstream as an `anthropic` upstream; the
mock answers CHUNKS text deltas ("tok0 ", "tok1 ", ...) and the cache counts each request asks
for with x-mock-cache-write / x-mock-cache-read. With `quota`, the key's limit is spent: every
request must raise the SDK's status error for 402, in Anthropic's error shape.
Exits 0 when every check passes, 1 on a failed check (with the reason on stderr), 3 when the
anthropic package cannot be imported.
"""

import sys

try:
    import anthropic
except ImportError as error:
    print(
        f"anthropic_client.py: cannot import anthropic with {sys.executable} ({error}); "
        "run scripts/test, which makes a venv with the SDK and sets AURA_TEST_PYTHON",
        file=sys.stderr,
    )
    sys.exit(3)


def fail(message):
    print(f"anthropic_client.py: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


MODEL = "claude-sonnet-4-20250514"
MESSAGES = [{"role": "user", "content": "Say hello in four words."}]


def quota(client):
    """A spent key: streamed or not, the SDK raises its status error for 402."""
    for stream in (False, True):
        try:
            if stream:
                with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as s:
                    for _ in s.text_stream:
                        pass
            else:
                client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
            fail(f"a request on a spent key went through (stream={stream})")
        except anthropic.APIStatusError as error:
            check(error.status_code == 402, f"status {error.status_code}, not 402")
            body = error.body
            check(isinstance(body, dict), f"error body is not JSON: {body!r}")
            check(body.get("type") == "error", f"not Anthropic's error shape: {body!r}")
            check("type" in body.get("error", {}), f"error without a type: {body!r}")


def main():
    base_url, api_key, chunks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=20)
    if sys.argv[4:] == ["quota"]:
        quota(client)
        return
    want_text = "".join(f"tok{i} " for i in range(chunks))

    # A whole answer, with prompt-cache counts.
    cache = {"x-mock-cache-write": "1000", "x-mock-cache-read": "2000"}
    answer = client.messages.create(
        model=MODEL, max_tokens=64, messages=MESSAGES, extra_headers=cache
    )
    check(answer.content[0].text == want_text, f"text {answer.content[0].text!r}")
    check(answer.usage.output_tokens == chunks, f"usage {answer.usage}")
    check(answer.usage.cache_creation_input_tokens == 1000, f"usage {answer.usage}")
    check(answer.usage.cache_read_input_tokens == 2000, f"usage {answer.usage}")

    # A stream, through the SDK's own stream helper: every text delta, and the final message
    # the SDK assembles from message_start and message_delta.
    with client.messages.stream(
        model=MODEL, max_tokens=64, messages=MESSAGES, extra_headers={"x-mock-cache-write": "300"}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text == want_text, f"streamed text {text!r}")
    check(final.usage.output_tokens == chunks, f"final usage {final.usage}")
    check(final.usage.cache_creation_input_tokens == 300, f"final usage {final.usage}")
    check(final.stop_reason == "end_turn", f"stop reason {final.stop_reason}")

    # Raw events, streamed with create(stream=True): the event types pass through in order.
    events = client.messages.create(
        model=MODEL, max_tokens=64, messages=MESSAGES, stream=True
    )
    kinds = [event.type for event in events]
    check(kinds[0] == "message_start" and kinds[-1] == "message_stop", f"events {kinds}")
    check("message_delta" in kinds, f"events {kinds}")

    # Counting tokens costs nothing and reaches the upstream.
    counted = client.messages.count_tokens(model=MODEL, messages=MESSAGES)
    check(counted.input_tokens > 0, f"count_tokens {counted}")

    # A model no anthropic upstream serves: the SDK's NotFoundError, in Anthropic's shape.
    try:
        client.messages.create(model="gpt-4o-mini", max_tokens=8, messages=MESSAGES)
        fail("a model no anthropic upstream serves was answered")
    except anthropic.NotFoundError as error:
        check(error.body.get("type") == "error", f"not Anthropic's error shape: {error.body!r}")


if __name__ == "__main__":
    main()
