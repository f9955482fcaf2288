"""Drives the official openai Python SDK against a rate-limited key (run by tests/governance.rs).

Usage: openai_rate_limits.py BASE_URL KEY RPM TPM
The key may make RPM requests and use TPM tokens a minute, and nothing else limits it; the
node's clock starts a second into a minute, so the whole run stays in one minute. Checks that
`with_raw_response` shows Aura's `x-ratelimit-*` headers counting the requests down, and that
request RPM + 1 raises the SDK's `RateLimitError` with OpenAI's `rate_limit_exceeded` code,
a `Retry-After` header and the headers at zero.
Exits 0 when every check passes, 1 on a failed check (with the reason on stderr), 3 when the
openai package cannot be imported.
"""

import sys

try:
    import openai
except ImportError as error:
    print(
        f"openai_rate_limits.py: cannot import openai with {sys.executable} ({error}); "
        "run scripts/test, which makes a venv with the SDK and sets AURA_TEST_PYTHON",
        file=sys.stderr,
    )
    sys.exit(3)


def fail(message):
    print(f"openai_rate_limits.py: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def main():
    base_url, key, rpm, tpm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    # No retries: the SDK would otherwise wait out the 429 itself.
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "Say hello"}]
    tokens_left = []
    for i in range(rpm):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, max_tokens=5
        )
        headers = raw.headers
        check(raw.parse().choices, "an answer without choices")
        check(
            headers.get("x-ratelimit-limit-requests") == str(rpm),
            f"x-ratelimit-limit-requests {headers.get('x-ratelimit-limit-requests')!r}",
        )
        remaining = headers.get("x-ratelimit-remaining-requests")
        check(remaining == str(rpm - 1 - i), f"request {i + 1}: remaining {remaining!r}")
        reset = headers.get("x-ratelimit-reset-requests", "")
        check(
            reset.endswith("s") and 0 < int(reset[:-1]) <= 60,
            f"x-ratelimit-reset-requests {reset!r}",
        )
        check(
            headers.get("x-ratelimit-limit-tokens") == str(tpm),
            f"x-ratelimit-limit-tokens {headers.get('x-ratelimit-limit-tokens')!r}",
        )
        tokens_left.append(int(headers.get("x-ratelimit-remaining-tokens", "-1")))
    check(
        all(0 <= t < tpm for t in tokens_left) and tokens_left == sorted(tokens_left, reverse=True),
        f"x-ratelimit-remaining-tokens did not count down: {tokens_left}",
    )
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=5)
        fail(f"request {rpm + 1} of a {rpm}-a-minute key went through")
    except openai.RateLimitError as error:
        check(error.status_code == 429, f"status {error.status_code}")
        check(error.code == "rate_limit_exceeded", f"code {error.code!r}")
        check(error.type == "requests", f"type {error.type!r}")
        check("requests per minute" in error.message, f"message {error.message!r}")
        headers = error.response.headers
        retry_after = headers.get("retry-after", "")
        check(retry_after.isdigit() and 0 < int(retry_after) <= 60, f"retry-after {retry_after!r}")
        check(
            headers.get("x-ratelimit-remaining-requests") == "0",
            f"x-ratelimit-remaining-requests {headers.get('x-ratelimit-remaining-requests')!r}",
        )
        # A request asking for more tokens than a whole minute has: RateLimitError, type tokens,
    # and no Retry-After (no wait would help).
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=tpm + 1)
        fail("a request larger than the tokens per minute went through")
    except openai.RateLimitError as error:
        check(error.code == "rate_limit_exceeded", f"tokens: code {error.code!r}")
        check(error.type == "tokens", f"tokens: type {error.type!r}")
        check("request too large" in error.message, f"tokens: message {error.message!r}")
        check("retry-after" not in error.response.headers, "tokens: a Retry-After for what no wait fixes")
    # A streamed request is refused the same way.
    try:
        for _ in client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, max_tokens=5, stream=True
        ):
            pass
        fail("a streamed request past the limit went through")
    except openai.RateLimitError as error:
        check(error.code == "rate_limit_exceeded", f"stream: code {error.code!r}")
    print(f"openai_rate_limits.py: ok (openai {openai.__version__}), tokens left {tokens_left}")


if __name__ == "__main__":
    main()
